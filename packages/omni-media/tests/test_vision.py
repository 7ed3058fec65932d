"""Parity of omni_media.vision / omni_media.image with transformers on tiny random SigLIP and CLIP models,
and refusal of bad images and bad checkpoint folders with a one-line MediaError naming the input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from omni_media.errors import MediaError
from omni_media.image import ImageProcessor, open_image
from omni_media.vision import VisionConfig, load_vision

transformers = pytest.importorskip("transformers")

TINY = dict(
    image_size=32,
    patch_size=8,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
)
TOL = 1e-4


def _randomise(model: torch.nn.Module) -> None:
    # Random init leaves biases and LayerNorms at 0/1; perturb everything so each tensor matters.
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))


def _save(model: torch.nn.Module, folder: Path) -> Path:
    _randomise(model)
    model.eval().save_pretrained(folder, safe_serialization=True)
    return folder


def _siglip(use_head: bool):
    return transformers.SiglipVisionModel(transformers.SiglipVisionConfig(vision_use_head=use_head, **TINY))


def _clip():
    return transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**TINY))


def _compare(
    ref: torch.nn.Module, folder: Path, size: int = 32, interpolate: bool = False
) -> dict[str, float]:
    _, ours = load_vision(folder)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(pixel_values=x, interpolate_pos_encoding=interpolate)
        got = ours(x, interpolate_pos_encoding=interpolate)
    diffs = {"last_hidden_state": (got.last_hidden_state - want.last_hidden_state).abs().max().item()}
    if want.pooler_output is None:
        assert got.pooled is None
    else:
        diffs["pooled"] = (got.pooled - want.pooler_output).abs().max().item()
    assert got.last_hidden_state.shape == want.last_hidden_state.shape
    assert all(d <= TOL for d in diffs.values()), diffs
    return diffs


@pytest.mark.parametrize(
    "make", [lambda: _siglip(True), lambda: _siglip(False), _clip], ids=["siglip-head", "siglip", "clip"]
)
def test_vision_model_parity(make, tmp_path):
    ref = make()
    _compare(ref, _save(ref, tmp_path))


@pytest.mark.parametrize("kind", ["siglip", "clip"])
def test_full_model_parity(kind, tmp_path):
    text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, vocab_size=99,
                bos_token_id=0, eos_token_id=1, pad_token_id=1)  # fmt: skip
    if kind == "siglip":
        full = transformers.SiglipModel(transformers.SiglipConfig(vision_config=TINY, text_config=text))
    else:
        full = transformers.CLIPModel(
            transformers.CLIPConfig(vision_config=TINY, text_config=text, projection_dim=16)
        )
    _save(full, tmp_path)
    cfg, _ = load_vision(tmp_path)
    assert cfg.kind == kind and cfg.num_layers == 2 and cfg.use_head == (kind == "siglip")
    _compare(full.vision_model, tmp_path)


@pytest.mark.parametrize("make", [lambda: _siglip(True), _clip], ids=["siglip", "clip"])
def test_interpolated_positions(make, tmp_path):
    ref = make()
    _compare(ref, _save(ref, tmp_path), size=48, interpolate=True)
    _, ours = load_vision(tmp_path)
    with pytest.raises(ValueError, match="interpolate_pos_encoding"):
        ours(torch.zeros(1, 3, 48, 48))


def _random_image(w: int, h: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (h, w, len(mode)), dtype=np.uint8).squeeze(), mode)


@pytest.mark.parametrize("kind", ["siglip", "clip"])
def test_processor_matches_transformers(kind):
    # transformers 5 names the Pillow-backed processors *Pil (the plain names need torchvision).
    if kind == "siglip":
        ref = transformers.SiglipImageProcessorPil(size={"height": 32, "width": 32})
    else:
        ref = transformers.CLIPImageProcessorPil(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
        )
    ours = ImageProcessor.for_config(kind, 32)
    images = [_random_image(57, 41), _random_image(40, 90, "RGBA")]
    got = ours(images)
    want = torch.stack([ref(im, return_tensors="pt")["pixel_values"][0] for im in images])
    assert got.shape == want.shape == (2, 3, 32, 32) and got.dtype == torch.float32
    assert (got - want).abs().max().item() <= TOL
    arr = np.asarray(images[0])
    assert torch.equal(ours(arr), got[:1])


def test_open_image(tmp_path):
    good = tmp_path / "ok.png"
    _random_image(20, 10, "RGBA").save(good)
    assert open_image(good).mode == "RGB" and open_image(good).size == (20, 10)

    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:-200])
    text = tmp_path / "notes.png"
    text.write_text("not an image\n")
    for bad in (truncated, text, tmp_path / "missing.png"):
        with pytest.raises(MediaError) as e:
            open_image(bad)
        assert str(bad) in str(e.value) and "\n" not in str(e.value)


def _one_line(e: pytest.ExceptionInfo, *parts: str) -> None:
    msg = str(e.value)
    assert "\n" not in msg and all(p in msg for p in parts), msg


def test_bad_folders(tmp_path):
    with pytest.raises(MediaError) as e:
        load_vision(tmp_path)
    _one_line(e, str(tmp_path), "config.json")

    good = _save(_clip(), tmp_path / "good")
    cfg = json.loads((good / "config.json").read_text())

    wrong_type = tmp_path / "wrong_type"
    wrong_type.mkdir()
    (wrong_type / "config.json").write_text(json.dumps({**cfg, "hidden_size": "32"}))
    (wrong_type / "model.safetensors").write_bytes((good / "model.safetensors").read_bytes())
    with pytest.raises(MediaError) as e:
        load_vision(wrong_type)
    _one_line(e, str(wrong_type / "config.json"), "hidden_size")

    wrong_shape = tmp_path / "wrong_shape"
    wrong_shape.mkdir()
    (wrong_shape / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 48}))
    (wrong_shape / "model.safetensors").write_bytes((good / "model.safetensors").read_bytes())
    with pytest.raises(MediaError) as e:
        load_vision(wrong_shape)
    _one_line(e, str(wrong_shape), "fc1", "(64, 32)", "(48, 32)")

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps(cfg))
    # Not a real pickle: if anything tried to unpickle it, it would fail differently.
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04 not loaded")
    with pytest.raises(MediaError) as e:
        load_vision(pickled)
    _one_line(e, str(pickled), "pytorch_model.bin", "never loaded")


def test_config_checks(tmp_path):
    origin = tmp_path / "config.json"
    with pytest.raises(MediaError, match="model_type"):
        VisionConfig.from_hf({"model_type": "vit"}, origin)
    with pytest.raises(MediaError, match="vision_config: num_attention_heads"):
        VisionConfig.from_hf({"model_type": "siglip", "vision_config": {"num_attention_heads": True}}, origin)
    with pytest.raises(MediaError, match="divisible"):
        VisionConfig.from_hf(
            {"model_type": "clip_vision_model", "hidden_size": 30, "num_attention_heads": 4}, origin
        )
    cfg = VisionConfig.from_hf({"model_type": "siglip", "vision_config": {}}, origin)
    assert (cfg.image_size, cfg.patch_size, cfg.hidden_act, cfg.use_head) == (
        224,
        16,
        "gelu_pytorch_tanh",
        True,
    )
