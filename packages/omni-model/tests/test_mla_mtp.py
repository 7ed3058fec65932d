"""Latent attention and multi-token prediction: DeepSeek-V3 checkpoints beyond logits parity.

The absorbed path equals the naive one within 1e-5; the cache holds only latents and rotary keys;
MTP modules load from the checkpoint when present and match transformers' MtpModel; bad DeepSeek
configs and weights give one-line errors naming the field or tensor.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import omni_model
from omni_kv import LatentKVCache
from omni_model import CheckpointError, ConfigError
from omni_model.config import MLAConfig, ModelConfig
from omni_model.decoder import Decoder
from omni_moe import MoEConfig

from .loading import bad
from .tiny import VOCAB, save_tiny, save_tiny_mtp


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory):
    """A tiny DeepSeek-V3 folder with two MTP modules, and the transformers references."""
    folder = tmp_path_factory.mktemp("deepseek") / "ds"
    ref = save_tiny("deepseek_v3", folder, num_nextn_predict_layers=2)
    mtp = save_tiny_mtp(ref, folder)
    return folder, ref, mtp


def ids(batch: int, n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("fuse", [False, True])
def test_absorbed_equals_naive(deepseek, fuse):
    lm = omni_model.load(deepseek[0], fuse=fuse)
    model, x = lm.model, ids(2, 48)
    outs = {}
    with torch.no_grad():
        for mode in ("naive", "absorbed"):
            model.set_attention_mode(mode)
            cache = model.make_cache(batch_size=2)
            steps = [model(x[:, :32], cache=cache)] + [
                model(x[:, i : i + 1], cache=cache) for i in range(32, 48)
            ]
            outs[mode] = (model(x), torch.cat(steps, dim=1))
    for i, what in enumerate(("full forward", "cached decode")):
        err = (outs["naive"][i] - outs["absorbed"][i]).abs().max().item()
        assert err <= 1e-5, f"{what}: absorbed differs from naive by {err:.2e}"


def test_latent_cache_holds_only_latents_and_rope_keys(deepseek):
    lm = omni_model.load(deepseek[0])
    cache = lm.model.make_cache(max_len=64)
    mla = lm.config.mla
    assert isinstance(cache, LatentKVCache)
    assert cache.bytes_per_token() == lm.config.kv_bytes_per_token() == 2 * (32 + 8) * 4
    with torch.no_grad():
        lm.model(ids(1, 10), cache=cache)
    assert cache.seq_len == 10 and cache.joint(0).shape == (1, 10, mla.kv_lora_rank + mla.qk_rope_head_dim)
    cache.rollback(3)
    with torch.no_grad():  # decoding on after a rollback equals a fresh forward over the same tokens
        x = ids(1, 9, seed=3)
        lm.model(x[:, 7:], cache=cache)
        fresh = lm.model.make_cache()
        lm.model(torch.cat([ids(1, 10)[:, :7], x[:, 7:]], dim=1), cache=fresh)
    assert torch.allclose(cache.joint(1), fresh.joint(1), atol=1e-6)


def test_mtp_modules_load_and_match_transformers(deepseek):
    folder, ref, ref_mtp = deepseek
    lm = omni_model.load(folder, fuse=False)
    assert lm.config.mtp_depth == 2 and len(lm.model.mtp) == 2
    x = ids(2, 24, seed=5)
    t = x.shape[1]
    with torch.no_grad():
        logits, mtp_logits = lm.model.forward_mtp(x)
        out = ref(x, output_hidden_states=True)
        h = out.hidden_states[-1]  # the final-normed states, what MtpModel is fed
        expected = []
        for k in range(2):  # depth k+1 reads token i+k+1 at position i+k+1
            n = t - k - 1
            pos = torch.arange(k + 1, k + 1 + n)[None].expand(2, n)
            h = ref_mtp.forward_layer(k, h[:, :n], pos, None, input_ids=x[:, k + 1 :])
            expected.append(ref_mtp._project_to_logits(h))
    assert (logits - out.logits).abs().max().item() <= 1e-4
    assert [m.shape for m in mtp_logits] == [(2, t - 1, VOCAB), (2, t - 2, VOCAB)]
    for k, (got, want) in enumerate(zip(mtp_logits, expected, strict=True)):
        err = (got - want).abs().max().item()
        assert err <= 1e-4, f"MTP module {k + 1}: max |logits difference| {err:.2e}"
    fused = omni_model.load(folder)  # the inference form keeps the modules and their outputs
    with torch.no_grad():
        _, fused_mtp = fused.model.forward_mtp(x)
    assert max((a - b).abs().max().item() for a, b in zip(fused_mtp, mtp_logits, strict=True)) <= 1e-4


def test_checkpoint_without_mtp_weights_loads_without_modules(tmp_path):
    save_tiny("deepseek_v3", tmp_path / "ds", num_nextn_predict_layers=1)
    lm = omni_model.load(tmp_path / "ds")
    assert lm.config.mtp_depth == 0 and len(lm.model.mtp) == 0
    logits, mtp = lm.model.forward_mtp(ids(1, 8))
    assert logits.shape == (1, 8, VOCAB) and mtp == []


def test_fresh_mtp_modules_for_training():
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=4, ffn_dim=48, mtp_depth=3,
                      moe=MoEConfig(n_experts=4, top_k=2, expert_dim=16, first_k_dense_replace=1),
                      mla=MLAConfig(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8))  # fmt: skip
    model = Decoder(cfg)
    assert sum(p.numel() for p in model.parameters()) == cfg.n_params()
    x = torch.randint(0, 64, (2, 12))
    logits, mtp = model.forward_mtp(x)
    assert logits.shape == (2, 12, 64) and [m.shape[1] for m in mtp] == [11, 10, 9]
    # Depth d's row i predicts token i+d+1; its last row lies past the sequence (a draft, no target).
    loss = sum(
        torch.nn.functional.cross_entropy(m[:, :-1].flatten(0, 1), x[:, d + 1 :].flatten())
        for d, m in enumerate(mtp, start=1)
    )
    loss.backward()  # every module gets a gradient
    assert all(m.eh_proj.weight.grad is not None for m in model.mtp)


def test_config_mapping_of_deepseek(deepseek):
    c = omni_model.load(deepseek[0]).config
    assert c.attention == "mla" and c.mla == MLAConfig(32, 16, 8, 12, q_lora_rank=24)
    assert c.moe is not None and (c.moe.router, c.moe.n_group, c.moe.topk_group) == ("sigmoid", 2, 1)
    assert [c.is_moe_layer(i) for i in range(c.n_layers)] == [False, True]
    assert c.softmax_scale == pytest.approx(24**-0.5)


# ---------------------------------------------------------------------------------- bad input


@pytest.fixture
def folder(deepseek, tmp_path) -> Path:
    return Path(shutil.copytree(deepseek[0], tmp_path / "ds"))


def edit(folder: Path, **changes) -> None:
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    "changes, names",
    [
        ({"kv_lora_rank": 0}, ["kv_lora_rank", "0"]),
        ({"kv_lora_rank": None}, ["kv_lora_rank", "None"]),
        ({"qk_head_dim": 25}, ["qk_head_dim", "qk_nope_head_dim + qk_rope_head_dim"]),
        ({"head_dim": 6}, ["head_dim", "qk_rope_head_dim"]),
        ({"qk_rope_head_dim": 7, "head_dim": 7, "qk_head_dim": 23}, ["qk_rope_head_dim", "even"]),
        ({"num_experts_per_tok": 9}, ["top_k", "n_experts"]),
        ({"n_group": 3}, ["n_group"]),
        ({"num_nextn_predict_layers": -1}, ["num_nextn_predict_layers"]),
    ],
)
def test_bad_deepseek_config(folder, changes, names):
    edit(folder, **changes)
    bad(ConfigError, folder, "config.json", *names)


def test_missing_expert_weight(folder):
    state = load_file(folder / "model.safetensors")
    del state["model.layers.1.mlp.experts.3.up_proj.weight"]
    save_file(state, folder / "model.safetensors")
    bad(CheckpointError, folder, "layer 1", "up_proj")


def test_misshapen_latent_projection(folder):
    state = load_file(folder / "model.safetensors")
    state["model.layers.0.self_attn.kv_b_proj.weight"] = torch.zeros(7, 32)
    save_file(state, folder / "model.safetensors")
    bad(CheckpointError, folder, "layers.0.self_attn.kv_b_proj.weight", "(7, 32)")


def test_incomplete_mtp_module(folder):
    state = load_file(folder / "mtp.safetensors")
    del state["model.layers.3.eh_proj.weight"]
    save_file(state, folder / "mtp.safetensors")
    bad(CheckpointError, folder, "mtp.1.eh_proj.weight")


def test_dataclass_is_frozen():
    cfg = MLAConfig(16, 8, 4, 8)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.kv_lora_rank = 3  # type: ignore[misc]
