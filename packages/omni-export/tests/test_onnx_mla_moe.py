"""Latent attention, MoE layers and media embeddings in the ONNX decoder graph, against the PyTorch decoder.

Tiny seeded models with wide random weights (so that every tensor shows in the logits): float32
graphs match the plain and the fused decoder within 1e-4 over a prompt and cached decode steps; a
graph with media placeholders takes their rows from `media_embeds` exactly as
Decoder.hidden_states(embeds=...) does; int8 weights (MatMulNBits, experts dense) match a decoder
holding the dequantized weights; export_onnx writes an MLA+MoE folder with a latent cache manifest.
"""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from omni_model_tests.tiny import VOCAB, byte_tokenizer

import omni_model
from omni_export.errors import UnsupportedExportError
from omni_export.export import ExportConfig, _quantize_experts, export_onnx
from omni_export.onnx_decoder import GraphOptions, build_decoder_graph
from omni_export.onnx_sparse import dense
from omni_export.weights import quantized_weights
from omni_model.config import MLAConfig, ModelConfig, RopeConfig
from omni_model.decoder import Decoder
from omni_model.fused import fuse_for_inference
from omni_model.tokenizer import Tokenizer
from omni_moe import MoEConfig

BASE = dict(vocab_size=VOCAB, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, norm_eps=1e-6,
            max_seq_len=128, bos_token_id=256, eos_token_id=257)  # fmt: skip
MLA = MLAConfig(kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, q_lora_rank=24)
DEEPSEEK_MOE = dict(n_experts=8, top_k=2, expert_dim=32, router="sigmoid", n_group=2, topk_group=1,
                    routed_scaling_factor=2.5, score_correction_bias=True, n_shared_experts=1)  # fmt: skip
YARN = RopeConfig(
    theta=50000.0, type="yarn", factor=4.0, original_max_position=32, mscale=1.0, mscale_all_dim=0.7
)
CONFIGS = {
    # Full-rank query, biases on q/kv/o, an explicit softmax scale.
    "mla": ModelConfig(**BASE | {"n_kv_heads": 4}, qkv_bias=True, attention_scale=0.3,
                       mla=MLAConfig(kv_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)),
    # Qwen2-MoE style: softmax router, renormalised, a gated shared expert; layer 1 stays dense.
    "moe-softmax": ModelConfig(**BASE, moe=MoEConfig(n_experts=4, top_k=2, expert_dim=32, n_shared_experts=1,
                                                      shared_expert_gate=True, dense_layers=(1,))),
    # Mixtral-like without renormalisation, scaled: the weights do not sum to one.
    "moe-softmax-raw": ModelConfig(**BASE, moe=MoEConfig(n_experts=4, top_k=2, expert_dim=32, norm_topk_prob=False,
                                                          routed_scaling_factor=1.5)),
    "moe-deepseek": ModelConfig(**BASE, moe=MoEConfig(**DEEPSEEK_MOE)),
    # DeepSeek-V3 in small: low-rank query, YaRN with mscale, sigmoid groups, a dense first layer.
    "mla-moe": ModelConfig(**BASE | {"n_kv_heads": 4}, rope=YARN, mla=MLA,
                           moe=MoEConfig(**DEEPSEEK_MOE | {"norm_topk_prob": False}, first_k_dense_replace=1)),
}  # fmt: skip
PLACEHOLDERS = (300, 301)


def random_model(cfg: ModelConfig, seed: int = 0) -> Decoder:
    torch.manual_seed(seed)
    model = Decoder(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2 if p.ndim > 1 else 1.0)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # so that the bias changes which experts win
                b.normal_(0, 0.1)
    return model


def session(cfg: ModelConfig, tensors: dict, **opts) -> ort.InferenceSession:
    graph = build_decoder_graph(cfg, tensors, GraphOptions(max_seq_len=128, **opts))
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(graph.SerializeToString(), so, providers=["CPUExecutionProvider"])


class Runner:
    """Feeds a graph's cache back: whole present outputs for grouped-query layers, appended new
    entries for latent ones (the graph reads the first total - new positions of what it is given)."""

    def __init__(self, s: ort.InferenceSession, cfg: ModelConfig) -> None:
        self.s, self.latent = s, cfg.mla is not None
        self.names = [o.name for o in s.get_outputs()]
        pasts = [i for i in s.get_inputs() if i.name.startswith("past_key_values.")]
        self.past = {i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32) for i in pasts}
        if self.latent:  # capacity buffers longer than what is valid, as an engine binds them
            self.past = {k: np.full((1, 1, 5, v.shape[3]), 7.0, np.float32) for k, v in self.past.items()}
        self.n = 0

    def __call__(
        self, ids: np.ndarray, keep: int = 0, media: np.ndarray | None = None
    ) -> dict[str, np.ndarray]:
        t = ids.shape[1]
        feeds = {"input_ids": ids, "attention_mask": np.ones((1, self.n + t), np.int64),
                 "logits_to_keep": np.array(keep, np.int64), **self.past}  # fmt: skip
        if media is not None:
            feeds["media_embeds"] = media
        out = dict(zip(self.names, self.s.run(None, feeds), strict=True))
        for k in self.past:
            new = out[k.replace("past_key_values.", "present.")]
            if self.latent:
                assert new.shape[2] == t  # the new tokens only
                valid = self.past[k][:, :, : self.n]
                self.past[k] = np.concatenate([valid, new, np.full_like(new[:, :, :3], 7.0)], axis=2)
            else:
                self.past[k] = new
        self.n += t
        return out


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request):
    cfg = CONFIGS[request.param]
    model = random_model(cfg)
    weights = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    fused = random_model(cfg)
    fuse_for_inference(fused)
    return request.param, cfg, model, fused, session(cfg, weights)


def test_prefill_and_cached_decode_match_pytorch(case):
    name, cfg, model, fused, s = case
    ids = np.random.default_rng(0).integers(0, VOCAB, (1, 40))
    with torch.no_grad():
        ref = model(torch.from_numpy(ids)).numpy()
        ref_fused = fused(torch.from_numpy(ids)).numpy()
    full = Runner(s, cfg)(ids)["logits"]
    for what, r in (("plain", ref), ("fused", ref_fused)):
        err = np.abs(full - r).max()
        assert err <= 1e-4, f"{name}: prefill differs from the {what} decoder by {err:.2e}"
    run = Runner(s, cfg)
    steps = [run(ids[:, :24])["logits"], run(ids[:, 24:27])["logits"]]  # a 3-token chunk on a cache
    steps += [run(ids[:, t : t + 1])["logits"] for t in range(27, 40)]
    err = np.abs(np.concatenate(steps, axis=1) - ref).max()
    assert err <= 1e-4, f"{name}: cached decode differs by {err:.2e}"
    last = Runner(s, cfg)(ids, keep=1)
    assert last["logits"].shape == (1, 1, VOCAB) and np.abs(last["logits"][:, 0] - ref[:, -1]).max() <= 1e-4


def test_latent_cache_holds_latents_and_rotary_keys():
    cfg = CONFIGS["mla-moe"]
    model = random_model(cfg)
    s = session(cfg, {k: v.detach().numpy() for k, v in model.state_dict().items()})
    ins = {i.name: i.shape for i in s.get_inputs()}
    assert ins["past_key_values.0.key"][1:] == [1, "capacity", 32] and ins["past_key_values.1.value"][3] == 8
    ids = np.random.default_rng(2).integers(0, VOCAB, (1, 6))
    out = Runner(s, cfg)(ids)
    cache = model.make_cache()
    with torch.no_grad():
        model(torch.from_numpy(ids), cache=cache)
    joint = cache.joint(1).numpy()  # (1, S, rank + rope): what the PyTorch decoder caches
    assert np.abs(out["present.1.key"][:, 0] - joint[..., :32]).max() <= 1e-5
    assert np.abs(out["present.1.value"][:, 0] - joint[..., 32:]).max() <= 1e-5


def test_media_embeds_replace_exactly_the_placeholder_rows():
    cfg = CONFIGS["mla-moe"]
    model = random_model(cfg)
    weights = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    s = session(cfg, weights, media_placeholders=PLACEHOLDERS)
    ids = np.random.default_rng(3).integers(0, 256, (1, 12))
    ids[0, 3:6], ids[0, 9] = 300, 301
    media = np.random.default_rng(4).normal(0, 1, (1, 12, cfg.dim)).astype(np.float32)
    with torch.no_grad():
        embeds = model.embed_tokens(torch.from_numpy(ids)).clone()
        hit = torch.from_numpy(np.isin(ids, PLACEHOLDERS))
        embeds[hit] = torch.from_numpy(media)[hit]
        h = model.hidden_states(torch.from_numpy(ids), embeds=embeds)
        ref = model.logits(h).numpy()
    out = Runner(s, cfg)(ids, media=media)
    assert (
        np.abs(out["logits"] - ref).max() <= 1e-4 and np.abs(out["hidden_states"] - h.numpy()).max() <= 1e-4
    )
    other = media.copy()
    other[~np.isin(ids, PLACEHOLDERS)] = 1e3  # rows at text positions are never read
    assert np.array_equal(Runner(s, cfg)(ids, media=other)["logits"], out["logits"])
    zeros = Runner(s, cfg)(ids, media=np.zeros_like(media))["logits"]
    assert np.abs(zeros[0, :3] - ref[0, :3]).max() <= 1e-4 and np.abs(zeros[0, 3:] - ref[0, 3:]).max() > 1e-2
    with pytest.raises(Exception, match="media_embeds"):  # ORT's own check of the declared width
        Runner(s, cfg)(ids, media=np.zeros((1, 12, cfg.dim + 1), np.float32))


@pytest.mark.parametrize("name, bits", [("mla-moe", 4), ("mla-moe", 8), ("moe-softmax", 8)])
def test_quantized_weights_match_the_dequantized_decoder(name, bits):
    """MatMulNBits projections (MLA's included) and the dense wide-expert form against a decoder that
    holds exactly the weights the graph multiplies by (float compute: accuracy_level 1)."""
    cfg = CONFIGS[name]
    model = random_model(cfg)
    weights = quantized_weights(model.state_dict(), cfg, None, bits, 32, False)
    _quantize_experts(weights, cfg, bits, 32, False)
    s = session(cfg, weights, weights=f"int{bits}", accuracy_level=1)
    state = {}
    for k, w in weights.items():
        if k.endswith("experts.gate_up_proj"):
            e, i = cfg.moe.n_experts, cfg.moe.expert_dim  # type: ignore[union-attr]
            w1 = dense(w)  # (2EI, D): every gate row, then every up row
            state[k] = torch.from_numpy(
                np.concatenate([w1[: e * i].reshape(e, i, -1), w1[e * i :].reshape(e, i, -1)], 1)
            )
        elif k.endswith("experts.down_proj"):
            state[k] = torch.from_numpy(
                dense(w).reshape(cfg.dim, cfg.moe.n_experts, -1).transpose(1, 0, 2).copy()
            )  # type: ignore[union-attr]
        else:
            state[k] = torch.from_numpy(dense(w).reshape(model.state_dict()[k].shape))
    assert not isinstance(weights["layers.1.self_attn.o_proj.weight"], np.ndarray)  # really packed
    model.load_state_dict(state)
    ids = np.random.default_rng(5).integers(0, VOCAB, (1, 24))
    with torch.no_grad():
        ref = model(torch.from_numpy(ids)).numpy()
    run = Runner(s, cfg)
    got = np.concatenate(
        [run(ids[:, :16])["logits"]] + [run(ids[:, t : t + 1])["logits"] for t in range(16, 24)], 1
    )
    assert np.abs(got - ref).max() <= 1e-3


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("mla_moe")
    byte_tokenizer(root)
    folder = root / "ckpt"
    omni_model.save(random_model(CONFIGS["mla-moe"]), folder, tokenizer=Tokenizer.from_hf_folder(root))
    return folder


def test_export_onnx_writes_a_latent_cache_folder(checkpoint, tmp_path):
    cfg = ExportConfig(weights="float32", parity_prompt_tokens=12, parity_decode_tokens=6,
                       media_placeholders=PLACEHOLDERS)  # fmt: skip
    m = export_onnx(
        checkpoint, tmp_path / "onnx", cfg, parity_text="To be, or not to be, that is the question."
    )
    assert m["kv"]["layout"] == "latent" and (m["kv"]["latent_dim"], m["kv"]["rope_dim"]) == (32, 8)
    assert m["kv"]["bytes_per_token"] == 2 * (32 + 8) * 4 and "n_kv_heads" not in m["kv"]
    assert m["inputs"]["media_embeds"] == "media_embeds" and m["media_placeholders"] == [300, 301]
    p = m["parity"]
    assert p["max_abs_logits_diff_prefill"] <= 1e-4 and p["max_abs_logits_diff_decode"] <= 1e-4
    assert p["greedy_tokens_agreeing"] == p["greedy_tokens_compared"] == 7
    assert json.loads((tmp_path / "onnx" / "manifest.json").read_text())["kv"] == m["kv"]

    q = export_onnx(checkpoint, tmp_path / "int4", ExportConfig(weights="int4", parity_prompt_tokens=12,
                    parity_decode_tokens=2), parity_text="To be, or not to be, that is the question.")  # fmt: skip
    assert q["quantization"]["tensors_quantized_from_float"] > 0 and q["weight_bytes"] < m["weight_bytes"] / 3


def test_what_the_export_refuses_is_one_line(checkpoint, tmp_path):
    cfg = CONFIGS["mla-moe"]
    cases = [
        (lambda: GraphOptions(media_placeholders=[300]), "tuple of token ids"),  # type: ignore[arg-type]
        (
            lambda: build_decoder_graph(cfg, {}, GraphOptions(media_placeholders=(VOCAB,))),
            "past the vocabulary",
        ),
        (lambda: build_decoder_graph(cfg, {}, GraphOptions(kv="int8")), "latent attention"),
        (lambda: export_onnx(checkpoint, tmp_path / "x", ExportConfig(kv="int8")), "latent attention"),
    ]
    for make, what in cases:
        with pytest.raises(UnsupportedExportError, match=what) as info:
            make()
        assert "\n" not in str(info.value)
    assert not (tmp_path / "x").exists()
