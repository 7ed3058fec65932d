"""omni-media's one error type: bad media or a checkpoint that does not fit, said in one line."""

from __future__ import annotations


class MediaError(ValueError):
    """An input (image, audio, checkpoint folder) that cannot be used; the message names it."""
