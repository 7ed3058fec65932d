"""Keyframe tokens plus in-betweens: code/token conversion, the resized tokenizer, the filled clip."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from omni_media.errors import MediaError
from omni_media.image_tokenizer import ImageTokenizer, ImageTokenizerConfig
from omni_media.interpolate import TrainConfig
from omni_media.keyframes import (
    at_size,
    clip_tokens,
    codes_to_tokens,
    fill_between,
    keyframe_experiment,
    tokens_to_codes,
)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _tokenizer() -> ImageTokenizer:
    torch.manual_seed(0)
    return ImageTokenizer(ImageTokenizerConfig(widths=(8, 16), levels=(8, 5, 5))).eval()


def test_codes_and_tokens_are_inverse_and_snap_to_the_nearest_code():
    tok = _tokenizer()
    tokens = torch.randint(0, tok.vocab_size, (4, 7, 7))
    codes = tokens_to_codes(tok, tokens)
    assert codes.shape == (4, 3, 7, 7)
    assert torch.equal(codes_to_tokens(tok, codes), tokens)
    step = 1 / torch.tensor([4.0, 2.0, 2.0]).view(1, 3, 1, 1)  # a grid step per channel
    assert torch.equal(codes_to_tokens(tok, codes + 0.4 * step), tokens)  # nearer to the same point
    assert torch.equal(
        codes_to_tokens(tok, torch.full((1, 3, 7, 7), 9.0)), torch.full((1, 7, 7), tok.vocab_size - 1)
    )


def test_at_size_shares_the_weights():
    tok = _tokenizer()
    big = at_size(tok, 64)
    assert big.grid == (16, 16)
    img = torch.rand(2, 1, 28, 28)
    canvas = torch.zeros(2, 1, 64, 64)
    canvas[:, :, 16:44, 16:44] = img
    with torch.no_grad():
        # 16 px = 4 tokens in; the outer ring of the small image's tokens saw its zero padding instead
        assert torch.equal(big.encode(canvas)[:, 5:11, 5:11], tok.encode(img)[:, 1:, 1:])
    with pytest.raises(ValueError, match="divisible"):
        at_size(tok, 30)


def test_fill_between_keeps_keyframes_and_blends_identical_ones_to_themselves():
    tok = _tokenizer()
    keys = torch.randint(0, tok.vocab_size, (2, 3, 7, 7))
    keys[:, 2] = keys[:, 1]
    out = fill_between(tok, None, keys, every=4)
    assert out.shape == (2, 9, 7, 7)
    assert torch.equal(out[:, ::4], keys)
    assert all(torch.equal(out[:, i], keys[:, 1]) for i in range(4, 9))


def test_experiment_reports_every_figure():
    rng = np.random.default_rng(0)
    clips = np.zeros((24, 9, 32, 32), np.uint8)
    for n in range(24):  # a bright square sliding right
        y, x0 = rng.integers(0, 24), rng.integers(0, 8)
        for t in range(9):
            clips[n, t, y : y + 8, x0 + 2 * t : x0 + 2 * t + 8] = 255
    model, fig = keyframe_experiment(_tokenizer(), clips[:20], clips[20:], every=4,
                                     train=TrainConfig(steps=20, batch_size=8), hidden=8)  # fmt: skip
    assert fig["frames"] == 9 and fig["token_fraction"] == pytest.approx(3 / 9)
    assert all(np.isfinite(fig[k]) for k in ("psnr_interpolator", "psnr_linear_blend", "psnr_hold_keyframe"))
    assert fig["psnr_all_frames_tokenized"] > 0 and model.config.channels == 3
    with pytest.raises(MediaError, match="every must be >= 2"):
        keyframe_experiment(_tokenizer(), clips[:4], clips[4:6], every=1)
    with pytest.raises(MediaError, match="clips must be uint8"):
        clip_tokens(_tokenizer(), clips.astype(np.float32))
