"""What every generate loop shares and nothing in it needs torch: the result, and stop strings."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

FinishReason = Literal["length", "stop_token", "stop_string"]


@dataclass(frozen=True)
class GenerationResult:
    token_ids: tuple[int, ...]  # generated tokens, without the prompt and without a final stop token
    finish_reason: FinishReason
    prefill_seconds: float  # the prompt's forward and the first token's sampling
    decode_seconds: float  # every later forward and sampling
    n_prompt: int
    n_generated: int
    text: str | None = None  # set by generate_text: the decoded text, without any stop string

    @property
    def decode_steps(self) -> int:
        """Forwards after the prefill: one per sampled token after the first (a stop token counts)."""
        return max(self.n_generated + (self.finish_reason == "stop_token") - 1, 0)

    @property
    def decode_tokens_per_second(self) -> float:
        return self.decode_steps / self.decode_seconds if self.decode_seconds > 0 else 0.0

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.n_prompt / self.prefill_seconds if self.prefill_seconds > 0 else 0.0


class StopStringFilter:
    """Streams text while watching for stop strings; never lets out any part of one.

    `push(text)` returns the text that is now safe to show. The held-back tail is the longest suffix
    that is a proper prefix of some stop string, so a stop string can only start at or after the
    text already shown, and searching from there finds the first occurrence.
    """

    def __init__(self, stop_strings: Sequence[str]) -> None:
        self.stop_strings = tuple(stop_strings)
        self.text = ""  # everything pushed, cut at the stop string once one is found
        self.shown = 0  # characters of `text` already returned
        self.stopped = False

    def push(self, new: str) -> str:
        """Add decoded text; return what may be shown now (nothing after a stop string)."""
        if self.stopped or not new:
            return ""
        self.text += new
        return self._advance(final=False)

    def flush(self) -> str:
        """Settle what is still held back at the end of generation and return what may be shown."""
        return "" if self.stopped else self._advance(final=True)

    def _advance(self, final: bool) -> str:
        # A stop string found at `hit` is the first one only if no stop string can still start before
        # it: one whose beginning ends the text (held back) might complete with the next piece.
        hits = [i for s in self.stop_strings if (i := self.text.find(s, self.shown)) >= 0]
        pending = len(self.text) if final else len(self.text) - self._held_back()
        if hits and min(hits) <= pending:
            self.stopped = True
            self.text = self.text[: min(hits)]
            return self._release(len(self.text))
        return self._release(pending)

    def _held_back(self) -> int:
        tail = self.text[self.shown :]
        longest = 0
        for s in self.stop_strings:
            for n in range(min(len(s) - 1, len(tail)), longest, -1):
                if tail.endswith(s[:n]):
                    longest = n
                    break
        return longest

    def _release(self, end: int) -> str:
        piece = self.text[self.shown : end]
        self.shown = max(self.shown, end)
        return piece
