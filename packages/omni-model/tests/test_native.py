"""omnicoder folders: `omni_model.save` then `omni_model.load` gives the same config, logits and tokenizer.

Configs round-trip exactly through JSON (nested configs and tuples included); a bad manifest or
weights file is a one-line typed error naming the file and the key; a failed save leaves the
destination as it was.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import omni_model
from omni_model import CheckpointError, ConfigError
from omni_model.config import MLAConfig, ModelConfig, RopeConfig
from omni_model.decoder import Decoder
from omni_model.fused import fuse_for_inference
from omni_model.native import MANIFEST, WEIGHTS, config_from_dict, config_to_dict, read_config
from omni_model.tokenizer import Tokenizer
from omni_moe import MoEConfig

from .loading import bad
from .tiny import VOCAB, byte_tokenizer

LLAMA = ModelConfig(vocab_size=VOCAB, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, norm_eps=1e-6,
                    max_seq_len=128, bos_token_id=256, eos_token_id=257)  # fmt: skip
TIED = ModelConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, n_kv_heads=1, ffn_dim=48,
                   tie_embeddings=True, qkv_bias=True, qk_norm=True, sliding_window=8,
                   sliding_layers=(1,))  # fmt: skip
DEEPSEEK = ModelConfig(
    vocab_size=VOCAB, dim=32, n_layers=3, n_heads=4, n_kv_heads=4, ffn_dim=48, mtp_depth=2, max_seq_len=256,
    rope=RopeConfig(theta=50000.0, type="yarn", factor=4.0, original_max_position=64, mscale=1.0),
    moe=MoEConfig(n_experts=4, top_k=2, expert_dim=16, router="sigmoid", n_group=2, topk_group=1,
                  routed_scaling_factor=2.5, score_correction_bias=True, n_shared_experts=1,
                  first_k_dense_replace=1, dense_layers=(2,)),
    mla=MLAConfig(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, q_lora_rank=12),
)  # fmt: skip
CONFIGS = {"llama": LLAMA, "tied": TIED, "mla-moe-mtp": DEEPSEEK}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    folder = tmp_path_factory.mktemp("tok")
    byte_tokenizer(folder)
    return Tokenizer.from_hf_folder(folder)


def random_model(cfg: ModelConfig, seed: int = 0) -> Decoder:
    """Weights drawn wide (norm gains and biases too), so that every tensor shows in the logits."""
    torch.manual_seed(seed)
    model = Decoder(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2 if p.ndim > 1 else 1.0)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0, 0.1)
    return model


def ids(n: int = 20) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, n), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tokenizer) -> Path:
    """A saved tiny Llama, for tests to copy and break."""
    folder = tmp_path_factory.mktemp("native") / "llama"
    omni_model.save(random_model(LLAMA), folder, tokenizer=tokenizer)
    return folder


@pytest.fixture
def folder(saved, tmp_path) -> Path:
    return Path(shutil.copytree(saved, tmp_path / "model"))


def edit(folder: Path, change) -> Path:
    path = folder / MANIFEST
    manifest = json.loads(path.read_text())
    change(manifest["config"])
    path.write_text(json.dumps(manifest))
    return path


# ---- round trips -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CONFIGS)
def test_config_round_trips_through_json(name):
    cfg = CONFIGS[name]
    back = config_from_dict(json.loads(json.dumps(config_to_dict(cfg))))
    assert back == cfg
    assert type(back.rope.theta) is float and type(back.rope.factor) is float
    assert back.sliding_layers is None or type(back.sliding_layers) is tuple
    assert back.moe is None or type(back.moe.dense_layers) is tuple


@pytest.mark.parametrize("name", CONFIGS)
def test_save_then_load_gives_the_same_logits(name, tmp_path, tokenizer):
    cfg = CONFIGS[name]
    model, x = random_model(cfg), ids()
    meta = {"trained_by": "omni-train", "steps": 3}
    out = omni_model.save(model, tmp_path / "ckpt", tokenizer=tokenizer, meta=meta)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [MANIFEST, WEIGHTS, "tokenizer.json", "tokenizer_config.json", "generation_config.json"]
    )
    assert read_config(out) == (cfg, meta)
    with safe_open(str(out / WEIGHTS), framework="pt") as f:
        assert ("lm_head.weight" in f.keys()) is not cfg.tie_embeddings  # noqa: SIM118 - no __contains__
    plain, fused = omni_model.load(out, fuse=False), omni_model.load(out, fuse=True)
    assert plain.config == cfg and plain.tokenizer.encode("héllo") == tokenizer.encode("héllo")
    with torch.no_grad():  # main logits and, with MTP modules, theirs
        want, got = model.forward_mtp(x), plain.model.forward_mtp(x)
        assert len(got[1]) == cfg.mtp_depth
        assert all(torch.equal(a, b) for a, b in zip([got[0], *got[1]], [want[0], *want[1]], strict=True))
        err = (fused.model(x) - want[0]).abs().max().item()
        assert err <= 1e-4, f"fused: max |logits difference| {err:.2e}"
    if cfg.tie_embeddings:
        assert plain.model.lm_head.weight is plain.model.embed_tokens.weight


def test_bfloat16_weights_stay_bfloat16(tmp_path, tokenizer):
    model = random_model(TIED).to(torch.bfloat16)
    omni_model.save(model, tmp_path / "bf16", tokenizer=tokenizer)
    assert json.loads((tmp_path / "bf16" / MANIFEST).read_text())["dtype"] == "bfloat16"
    lm = omni_model.load(tmp_path / "bf16", dtype=torch.bfloat16, fuse=False)
    assert all(torch.equal(a, b) for a, b in zip(lm.model.parameters(), model.parameters(), strict=True))


def test_fused_model_is_refused_with_a_hint(tmp_path):
    model = fuse_for_inference(random_model(LLAMA))
    with pytest.raises(CheckpointError, match="fuse=False"):
        omni_model.save(model, tmp_path / "fused")
    assert not (tmp_path / "fused").exists()


def test_latent_attention_model_saves_fused(tmp_path, tokenizer):
    """Fusing leaves latent-attention blocks' names and weights as they are, so they save as the plain one."""
    model, x = random_model(dataclasses.replace(DEEPSEEK, moe=None, mtp_depth=0)), ids()
    with torch.no_grad():
        want = model(x)
    omni_model.save(fuse_for_inference(model), tmp_path / "ds", tokenizer=tokenizer)
    with torch.no_grad():
        assert torch.equal(omni_model.load(tmp_path / "ds", fuse=False).model(x), want)


# ---- bad folders -------------------------------------------------------------------------------------------


def test_truncated_weights(folder):
    data = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(data[: len(data) // 2])
    bad(CheckpointError, folder, WEIGHTS)


def test_wrong_type(folder):
    path = edit(folder, lambda c: c.update(dim="64"))
    bad(ConfigError, folder, path, "config.dim", "'64'")


def test_wrong_nested_type(folder):
    path = edit(folder, lambda c: c["rope"].update(truncate=1))
    bad(ConfigError, folder, path, "config.rope.truncate")


def test_bool_is_not_an_integer(folder):
    path = edit(folder, lambda c: c.update(n_layers=True))
    bad(ConfigError, folder, path, "config.n_layers")


def test_missing_key(folder):
    path = edit(folder, lambda c: c.pop("n_heads"))
    bad(ConfigError, folder, path, "'n_heads'")


def test_unknown_key(folder):
    path = edit(folder, lambda c: c["rope"].update(thetta=1.0))
    bad(ConfigError, folder, path, "config.rope", "'thetta'")


def test_out_of_bounds_value(folder):
    path = edit(folder, lambda c: c.update(moe={"n_experts": 2, "top_k": 3, "expert_dim": 8}))
    bad(ConfigError, folder, path, "config.moe", "top_k")


def test_weights_that_do_not_fit_the_config(folder):
    edit(folder, lambda c: c.update(ffn_dim=80))
    bad(CheckpointError, folder, "gate_proj")


def test_newer_version(folder):
    path = folder / MANIFEST
    path.write_text(json.dumps({**json.loads(path.read_text()), "version": 2}))
    bad(CheckpointError, folder, path, "version 2")


def test_saved_without_tokenizer(tmp_path):
    omni_model.save(random_model(LLAMA), tmp_path / "bare")
    bad(omni_model.TokenizerError, tmp_path / "bare", "tokenizer.json")


# ---- atomic writes -----------------------------------------------------------------------------------------


def test_interrupted_save_leaves_nothing(tmp_path, saved, tokenizer, monkeypatch):
    def fail(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr("omni_model.native.save_file", fail)
    with pytest.raises(OSError, match="No space"):
        omni_model.save(random_model(LLAMA), tmp_path / "new", tokenizer=tokenizer)
    assert list(tmp_path.iterdir()) == []  # neither the folder nor the temporary one

    existing = Path(shutil.copytree(saved, tmp_path / "old"))
    before = {p.name: p.read_bytes() for p in existing.iterdir()}
    with pytest.raises(OSError, match="No space"):
        omni_model.save(random_model(LLAMA, seed=1), existing, tokenizer=tokenizer)
    assert {p.name: p.read_bytes() for p in existing.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["old"]


def test_save_replaces_only_our_folders(tmp_path, tokenizer):
    out = tmp_path / "ckpt"
    omni_model.save(random_model(LLAMA), out, tokenizer=tokenizer)
    model, x = random_model(TIED, seed=1), ids()
    omni_model.save(model, out, tokenizer=tokenizer)  # one of ours: replaced
    with torch.no_grad():
        assert torch.equal(omni_model.load(out, fuse=False).model(x), model(x))
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="not overwriting"):
        omni_model.save(model, other)
    assert [p.name for p in other.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "notes"]
