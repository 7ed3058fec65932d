"""MoE checkpoints through omni_model.load: bad MoE configs and weights give one-line typed errors,
and the loaded layers route sparsely (each token reaches exactly top_k experts)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import omni_model
from omni_model import CheckpointError, ConfigError
from omni_moe import MoELayer

from .tiny import VOCAB, save_tiny

QWEN3_MOE = {"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32}


@pytest.fixture(scope="module")
def qwen3_moe(tmp_path_factory):
    folder = tmp_path_factory.mktemp("moe") / "qwen3_moe"
    save_tiny("qwen3_moe", folder, **QWEN3_MOE)
    return folder


def test_moe_layers_route_each_token_to_top_k_experts(qwen3_moe):
    lm = omni_model.load(qwen3_moe, fuse=False)
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        lm.model(ids)
    moes = [m for m in lm.model.modules() if isinstance(m, MoELayer)]
    assert len(moes) == lm.config.n_layers
    for m in moes:
        assert int(m.last_counts.sum()) == ids.numel() * QWEN3_MOE["num_experts_per_tok"]
        assert (m.last_counts > 0).sum() > 1  # random weights: tokens spread over several experts


def test_top_k_above_experts_is_a_config_error(qwen3_moe, tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    for f in qwen3_moe.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((folder / "config.json").read_text())
    cfg["num_experts_per_tok"] = 99
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError) as info:
        omni_model.load(folder)
    msg = str(info.value)
    assert "\n" not in msg and str(folder / "config.json") in msg and "top_k" in msg


def test_missing_expert_projection_is_a_checkpoint_error(qwen3_moe, tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    for f in qwen3_moe.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    weights = load_file(folder / "model.safetensors")
    del weights["model.layers.0.mlp.experts.3.up_proj.weight"]
    save_file(weights, folder / "model.safetensors")
    with pytest.raises(CheckpointError) as info:
        omni_model.load(folder)
    msg = str(info.value)
    assert "\n" not in msg and str(folder) in msg and "up_proj" in msg
