"""MoE and latent-attention checkpoints from transformers, through omni_model's importer, in the ONNX graph.

The graph's cached decode against the transformers model itself (not only omni_model's decoder):
DeepSeek-V3 with YaRN's mscale in the softmax scale and grouped sigmoid routing, Qwen2-MoE with its
gated shared expert. Kept apart from test_onnx_mla_moe because importing transformers takes seconds.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from omni_model_tests.tiny import VOCAB, save_tiny

import omni_model
from omni_export.onnx_decoder import GraphOptions, build_decoder_graph


@pytest.mark.parametrize(
    "kind, overrides",
    [
        ("deepseek_v3", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
                                          "mscale": 1.0, "mscale_all_dim": 0.8}}),
        ("qwen2_moe", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                       "shared_expert_intermediate_size": 48}),
    ],
)  # fmt: skip
def test_transformers_checkpoints_decode_as_transformers_does(tmp_path, kind, overrides):
    hf = save_tiny(kind, tmp_path / "m", **overrides)
    lm = omni_model.load(tmp_path / "m", fuse=False)
    weights = {k: v.detach().numpy() for k, v in lm.model.state_dict().items()}
    s = ort.InferenceSession(build_decoder_graph(lm.config, weights, GraphOptions(max_seq_len=64)).SerializeToString(),
                             providers=["CPUExecutionProvider"])  # fmt: skip
    ids = np.random.default_rng(6).integers(0, VOCAB, (1, 24))
    with torch.no_grad():
        ref = hf(torch.from_numpy(ids)).logits.numpy()
    names = [o.name for o in s.get_outputs()]
    past = {
        i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32)
        for i in s.get_inputs()
        if "past" in i.name
    }
    got = []
    for a, b in [(0, 16)] + [(t, t + 1) for t in range(16, 24)]:  # a prompt, then cached steps
        feeds = {"input_ids": ids[:, a:b], "attention_mask": np.ones((1, b), np.int64),
                 "logits_to_keep": np.array(0, np.int64), **past}  # fmt: skip
        out = dict(zip(names, s.run(None, feeds), strict=True))
        for k, old in past.items():  # latent caches return the new entries only, head caches everything
            new = out[k.replace("past_key_values.", "present.")]
            past[k] = np.concatenate([old, new], 2) if lm.config.mla is not None else new
        got.append(out["logits"])
    assert np.abs(np.concatenate(got, 1) - ref).max() <= 1e-4
