"""Token merging and the projector: which patch lands where, and the shapes a language model receives."""

from __future__ import annotations

import pytest
import torch

from omni_media.errors import MediaError
from omni_media.projector import Projector, ProjectorConfig, pixel_shuffle, stack_frames


def test_pixel_shuffle_gathers_each_block():
    b, side, d, r = 2, 6, 3, 3
    x = torch.randn(b, side * side, d)
    y = pixel_shuffle(x, r)
    assert y.shape == (b, (side // r) ** 2, d * r * r)
    grid = x.reshape(b, side, side, d)
    for i in range(side // r):
        for j in range(side // r):
            block = grid[:, i * r : (i + 1) * r, j * r : (j + 1) * r]  # (B, r, r, D)
            torch.testing.assert_close(y[:, i * (side // r) + j], block.reshape(b, -1), rtol=0, atol=0)


def test_pixel_shuffle_refuses_other_grids():
    with pytest.raises(MediaError, match="square grid"):
        pixel_shuffle(torch.randn(1, 12, 4), 2)
    with pytest.raises(MediaError, match="divisible by 4"):
        pixel_shuffle(torch.randn(1, 36, 4), 4)


def test_stack_frames_drops_the_remainder():
    x = torch.arange(2 * 7 * 2, dtype=torch.float32).reshape(2, 7, 2)
    y = stack_frames(x, 3)
    assert y.shape == (2, 2, 6)
    torch.testing.assert_close(y[0, 1], x[0, 3:6].reshape(-1))


@pytest.mark.parametrize(("kind", "n", "expect"), [("image", 64, 16), ("audio", 50, 25)])
def test_projector_shapes(kind, n, expect):
    cfg = ProjectorConfig(in_dim=8, out_dim=12, merge=2, kind=kind)
    assert cfg.tokens(n) == expect
    out = Projector(cfg)(torch.randn(3, n, 8))
    assert out.shape == (3, expect, 12)


def test_projector_config_names_the_field():
    with pytest.raises(ValueError, match="merge"):
        ProjectorConfig(in_dim=8, out_dim=8, merge=0)
    with pytest.raises(ValueError, match="kind"):
        ProjectorConfig(in_dim=8, out_dim=8, kind="video")
