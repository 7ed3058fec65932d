"""omni_media.image_tokenizer and omni_media.digits: shapes, determinism, checkpoints refused with a
one-line MediaError, torch.export of both halves, and short training runs that must really learn."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from omni_media.digits import ClassifierTrainConfig, accuracy, as_float_images, train_digit_classifier
from omni_media.errors import MediaError
from omni_media.image_tokenizer import (
    ImageTokenizer,
    ImageTokenizerConfig,
    TrainConfig,
    evaluate_image_tokenizer,
    load_image_tokenizer,
    psnr,
    reconstruct,
    save_image_tokenizer,
    train_image_tokenizer,
)

TINY = ImageTokenizerConfig(image_size=16, channels=1, widths=(8, 16), res_blocks=1, levels=(4, 5, 3))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny models gain nothing from threads, and on a busy machine OpenMP's spinning workers make a
    # 1 s training test take 100 s.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tiny(seed: int = 0, config: ImageTokenizerConfig = TINY) -> ImageTokenizer:
    torch.manual_seed(seed)
    tok = ImageTokenizer(config).eval()
    with torch.no_grad():
        tok.encoder[-1].weight.mul_(30)  # at init the latents sit near 0, all one code; spread them out
    return tok


def _images(n: int, size: int = 16, channels: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(seed))


def _strokes(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic 16x16 uint8 'digits': a bright bar, horizontal or vertical (the class), at a random place."""
    rng = np.random.default_rng(seed)
    images = np.zeros((n, 16, 16), np.uint8)
    labels = rng.integers(0, 2, n)
    for img, label, at in zip(images, labels, rng.integers(2, 14, n), strict=True):
        if label:
            img[2:14, at - 1 : at + 1] = 255
        else:
            img[at - 1 : at + 1, 2:14] = 255
    return images, labels


def _blobs(n: int, seed: int = 0) -> np.ndarray:
    """Synthetic 16x16 uint8 images: one Gaussian blob of random place and width."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:16, 0:16]
    centre, sigma = rng.uniform(3, 13, (n, 2, 1, 1)), rng.uniform(1.5, 3.5, (n, 1, 1))
    blob = np.exp(-((yy - centre[:, 0]) ** 2 + (xx - centre[:, 1]) ** 2) / (2 * sigma**2))  # (n, 16, 16)
    return (255 * blob).astype(np.uint8)


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="image_size"):
        ImageTokenizerConfig(image_size=30, widths=(8, 16))  # 30 is not divisible by 4
    with pytest.raises(ValueError, match="levels"):
        ImageTokenizerConfig(levels=(8, 1))
    with pytest.raises(ValueError, match="widths"):
        ImageTokenizerConfig(widths=())
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="loss"):
        TrainConfig(loss="bce")


def test_default_config_is_a_7x7_grid_of_1000_codes():
    tok = ImageTokenizer(ImageTokenizerConfig())
    assert tok.grid == (7, 7) and tok.vocab_size == 1000
    tokens = tok.encode(_images(2, 28))
    assert tokens.shape == (2, 7, 7) and tokens.dtype == torch.int64


def test_shapes_and_token_range():
    tok = _tiny()
    x = _images(5)
    tokens = tok.encode(x)
    assert tok.grid == (4, 4) and tok.vocab_size == 60
    assert tokens.shape == (5, 4, 4) and tokens.dtype == torch.int64
    assert int(tokens.min()) >= 0 and int(tokens.max()) < tok.vocab_size
    assert len(torch.unique(tokens)) > 1
    with torch.no_grad():
        images = tok.decode(tokens)
    assert images.shape == (5, 1, 16, 16)
    assert float(images.min()) >= 0 and float(images.max()) <= 1
    recon, tokens2 = tok(x)
    assert torch.equal(tokens, tokens2)
    # decode from tokens reproduces the training path's reconstruction (the token -> code map is exact)
    torch.testing.assert_close(recon.clamp(0, 1), images)


def test_decode_matches_fsq_codes_for_every_token():
    tok = _tiny()
    every = torch.arange(tok.vocab_size).reshape(-1, 1, 1).expand(-1, *tok.grid)
    torch.testing.assert_close(tok._codes(every), tok.fsq.indices_to_codes(every), rtol=0, atol=0)


def test_encode_decode_is_deterministic():
    tok = _tiny()
    x = _images(4)
    a = tok.decode(tok.encode(x))
    b = tok.decode(tok.encode(x))
    assert torch.equal(a, b)
    assert not torch.equal(tok.encode(x), tok.encode(_images(4, seed=1)))


def test_bad_inputs_are_media_errors():
    tok = _tiny()
    with pytest.raises(MediaError, match="images must be"):
        tok.encode(_images(2, size=20))
    with pytest.raises(MediaError, match="tokens must be"):
        tok.decode(torch.zeros(2, 3, 4, dtype=torch.int64))
    with pytest.raises(MediaError, match=r"\[0, 60\)"):
        tok.decode(torch.full((1, 4, 4), 60))
    with pytest.raises(MediaError, match="uint8"):
        as_float_images(np.zeros((2, 16, 16), np.float32))


def test_save_load_roundtrip_is_exact(tmp_path: Path):
    tok = _tiny(seed=3)
    path = save_image_tokenizer(tok, tmp_path / "tok.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["tok.safetensors"]  # no temp file left behind
    loaded = load_image_tokenizer(path)
    assert loaded.config == tok.config
    for (k, v), (k2, v2) in zip(tok.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2)
    x = _images(3)
    assert torch.equal(loaded.encode(x), tok.encode(x))
    assert torch.equal(loaded.decode(tok.encode(x)), tok.decode(tok.encode(x)))


def _one_line_error(path: Path) -> str:
    with pytest.raises(MediaError) as e:
        load_image_tokenizer(path)
    msg = str(e.value)
    assert str(path) in msg and "\n" not in msg
    return msg


def test_truncated_file_is_refused(tmp_path: Path):
    path = save_image_tokenizer(_tiny(), tmp_path / "tok.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert "not a readable safetensors" in _one_line_error(path)


def test_not_safetensors_and_missing_file_are_refused(tmp_path: Path):
    path = tmp_path / "tok.safetensors"
    path.write_bytes(b"\x80\x04K\x01.")  # a pickle: never unpickled
    assert "not a readable safetensors" in _one_line_error(path)
    _one_line_error(tmp_path / "absent.safetensors")


def _config_dict() -> dict:
    return json.loads(json.dumps(asdict(TINY)))


def _rewrite(path: Path, config: dict | None, extra: dict[str, torch.Tensor] | None = None) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(str(path)) | (extra or {})
    meta = {} if config is None else {"format": "omni-image-tokenizer/1", "config": json.dumps(config)}
    save_file(state, str(path), metadata=meta)


def test_missing_or_wrong_config_is_refused(tmp_path: Path):
    path = save_image_tokenizer(_tiny(), tmp_path / "tok.safetensors")
    _rewrite(path, None)
    assert "no image tokenizer config" in _one_line_error(path)

    path = save_image_tokenizer(_tiny(), tmp_path / "wider.safetensors")
    _rewrite(path, {**_config_dict(), "widths": [8, 32]})
    assert "has shape" in _one_line_error(path)

    path = save_image_tokenizer(_tiny(), tmp_path / "levels.safetensors")
    _rewrite(path, {**_config_dict(), "levels": [4, 5]})  # one latent channel fewer
    assert "has shape" in _one_line_error(path)

    path = save_image_tokenizer(_tiny(), tmp_path / "bad.safetensors")
    _rewrite(path, {**_config_dict(), "image_size": 18})
    assert "bad image tokenizer config" in _one_line_error(path)

    path = save_image_tokenizer(_tiny(), tmp_path / "extra.safetensors")
    _rewrite(path, _config_dict(), {"head.weight": torch.zeros(2)})
    assert "unknown tensors" in _one_line_error(path)

    path = save_image_tokenizer(_tiny(), tmp_path / "fewer.safetensors")
    _rewrite(path, {**_config_dict(), "res_blocks": 2})
    assert "missing tensors" in _one_line_error(path)


@pytest.mark.export
@pytest.mark.slow
def test_torch_export_of_both_halves_matches_eager():
    tok = _tiny(seed=1)
    x = _images(2)
    batch = torch.export.Dim("batch", min=1, max=64)
    enc = torch.export.export(tok.encoder_module(), (x,), dynamic_shapes=({0: batch},), strict=False)
    tokens = tok.encode(_images(3, seed=2))
    dec = torch.export.export(tok.decoder_module(), (tokens,), dynamic_shapes=({0: batch},), strict=False)
    x3 = _images(3, seed=2)
    assert torch.equal(enc.module()(x3), tok.encode(x3))
    torch.testing.assert_close(dec.module()(tokens), tok.decode(tokens), rtol=0, atol=1e-6)


def test_training_lowers_the_reconstruction_loss():
    losses: list[float] = []
    train = TrainConfig(steps=60, batch_size=32, lr=3e-3, seed=0)
    tok = train_image_tokenizer(_blobs(512), TINY, train, on_progress=lambda step, loss: losses.append(loss))
    assert len(losses) == 60
    torch.manual_seed(0)
    before = ImageTokenizer(TINY)  # the initialisation train_image_tokenizer starts from
    x = as_float_images(_blobs(256, seed=1))  # held out
    psnr_before, psnr_after = psnr(reconstruct(before, x)[0], x), psnr(reconstruct(tok, x)[0], x)
    # Untrained, and an all-black guess, both give ~11 dB; 60 steps reach ~21 dB on held-out blobs.
    assert psnr_after > psnr_before + 5 and psnr_after > psnr(torch.zeros_like(x), x) + 5, psnr_after
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10])


def test_training_is_deterministic_given_the_seed():
    images = _blobs(128)
    train = TrainConfig(steps=5, batch_size=16, seed=7)
    a, b = train_image_tokenizer(images, TINY, train), train_image_tokenizer(images, TINY, train)
    for v, w in zip(a.state_dict().values(), b.state_dict().values(), strict=True):
        assert torch.equal(v, w)


def test_classifier_learns_and_evaluation_reports_figures():
    images, labels = _strokes(512)
    clf = train_digit_classifier(images, labels, ClassifierTrainConfig(steps=40, batch_size=32))
    test_images, test_labels = _strokes(256, seed=1)
    assert accuracy(clf, test_images, test_labels) > 0.9  # chance is 0.5
    figures = evaluate_image_tokenizer(_tiny(), clf, test_images, test_labels)
    assert figures["tokens_per_image"] == 16 and 0 < figures["codebook_usage"] <= 1
    assert figures["accuracy_original"] > 0.9
    assert math.isfinite(figures["psnr_db"])


def test_psnr_known_values():
    a = np.zeros((2, 4, 4))
    assert psnr(a, a) == math.inf
    assert psnr(a, a + 0.1) == pytest.approx(20.0)
    assert psnr(a, a + 0.01) == pytest.approx(40.0)
    assert psnr(a, a + 25.5, max_value=255) == pytest.approx(20.0)
    with pytest.raises(MediaError, match="equal shapes"):
        psnr(a, np.zeros((2, 4)))
