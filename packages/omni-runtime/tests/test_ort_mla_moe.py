"""OrtEngine on a latent-attention MoE export: the latent cache, media embeddings and greedy decoding.

A tiny DeepSeek-V3-shaped omnicoder checkpoint (low-rank query, sigmoid routing in groups with a
selection bias, a shared expert, a dense first layer) exported with media placeholders decodes token
for token as the PyTorch decoder does; a prefill with `media_embeds` matches
Decoder.hidden_states(embeds=...) across prefill chunks; bad media input is a one-line EngineError.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from omni_model_tests.tiny import VOCAB, byte_tokenizer

import omni_model
from omni_export.export import ExportConfig, export_onnx
from omni_model.config import MLAConfig, ModelConfig
from omni_model.decoder import Decoder
from omni_model.generate import generate as torch_generate
from omni_model.sampling_config import SamplingConfig
from omni_model.tokenizer import Tokenizer
from omni_moe import MoEConfig
from omni_runtime import EngineError, OrtEngine, generate

CFG = ModelConfig(
    vocab_size=VOCAB, dim=64, n_layers=2, n_heads=4, n_kv_heads=4, ffn_dim=96, norm_eps=1e-6, max_seq_len=128,
    bos_token_id=256, eos_token_id=257,
    mla=MLAConfig(kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, q_lora_rank=24),
    moe=MoEConfig(n_experts=8, top_k=2, expert_dim=32, router="sigmoid", n_group=2, topk_group=1,
                  routed_scaling_factor=2.5, score_correction_bias=True, n_shared_experts=1, first_k_dense_replace=1),
)  # fmt: skip
PLACEHOLDERS = (300, 301)
TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer."


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("mla_moe")
    torch.manual_seed(0)
    model = Decoder(CFG).eval()
    with torch.no_grad():  # wide weights, so that every tensor shows in the logits
        for p in model.parameters():
            p.normal_(0, 0.2 if p.ndim > 1 else 1.0)
        model.layers[1].mlp.gate.e_score_correction_bias.normal_(0, 0.1)
    byte_tokenizer(root)
    omni_model.save(model, root / "ckpt", tokenizer=Tokenizer.from_hf_folder(root))
    # Text-only generation needs a graph without placeholders: one that has them feeds zeros for a
    # placeholder the model writes, where PyTorch would look its embedding up.
    small = {"parity_prompt_tokens": 8, "parity_decode_tokens": 2}
    for name, weights, media in (
        ("onnx", "float32", ()),
        ("media", "float32", PLACEHOLDERS),
        ("int4", "int4", PLACEHOLDERS),
    ):
        config = ExportConfig(weights=weights, media_placeholders=media, **small)  # type: ignore[arg-type]
        export_onnx(root / "ckpt", root / name, config, parity_text=TEXT)
    return root / "ckpt", root / "onnx", root / "media", root / "int4"


def test_greedy_generation_matches_pytorch(exported):
    ckpt, folder, _, _ = exported
    cfg = SamplingConfig(max_new_tokens=24, stop_token_ids=frozenset())
    prompt = list(TEXT.encode()[:20])
    for fuse in (False, True):
        ref = torch_generate(omni_model.load(ckpt, fuse=fuse).model, prompt, cfg).token_ids
        assert generate(OrtEngine(folder, threads=1), prompt, cfg).token_ids == ref, f"fuse={fuse}"


def test_cached_steps_chunks_and_rollback(exported):
    ckpt, folder, _, _ = exported
    ids = list(np.random.default_rng(0).integers(0, 256, 30))
    with torch.no_grad():
        ref = omni_model.load(ckpt, fuse=False).model(torch.tensor([ids]))[0].numpy()
    e = OrtEngine(folder, threads=1, prefill_chunk=8)
    assert np.abs(e.forward(ids, last_only=False) - ref).max() <= 1e-4  # four chunks
    e.reset()
    steps = [e.forward(ids[:20], last_only=False)] + [e.forward([t]) for t in ids[20:25]]
    e.rollback(3)
    steps = steps[:3] + [e.forward([t]) for t in ids[22:]]
    assert e.seq_len == 30 and np.abs(np.concatenate(steps) - ref).max() <= 1e-4


def test_media_prefill_matches_spliced_embeddings(exported):
    ckpt, _, folder, _ = exported
    model = omni_model.load(ckpt, fuse=False).model
    ids = list(np.random.default_rng(1).integers(0, 256, 14))
    ids[4:9] = [300] * 5
    ids[11] = 301
    media = np.random.default_rng(2).normal(0, 1, (14, CFG.dim)).astype(np.float32)
    hit = torch.tensor(np.isin(ids, PLACEHOLDERS))
    cache = model.make_cache()
    with torch.no_grad():
        embeds = model.embed_tokens(torch.tensor([ids])).clone()
        embeds[0, hit] = torch.from_numpy(media)[hit]
        h = model.hidden_states(torch.tensor([ids]), cache=cache, embeds=embeds)
        ref = [model.logits(h)[0].numpy()]
        ref += [model(torch.tensor([[t]]), cache=cache)[0].numpy() for t in (5, 77, 300)]  # text after: zeros
    e = OrtEngine(folder, threads=1, prefill_chunk=5)  # the media rows are cut with the chunks
    got = [e.forward(ids, last_only=False, media_embeds=media)] + [e.forward([t]) for t in (5, 77)]
    got.append(e.forward([300], media_embeds=np.zeros((1, 1, CFG.dim), np.float32)))
    assert np.abs(got[0] - ref[0]).max() <= 1e-4
    assert np.abs(np.concatenate(got[1:3]) - np.concatenate(ref[1:3])).max() <= 1e-4
    assert np.abs(got[3] - ref[3]).max() > 1e-2  # a placeholder fed zeros is not its embedding
    e.reset()
    logits, hidden = e.forward_hidden(ids, media_embeds=media[None])
    assert np.abs(logits - ref[0]).max() <= 1e-4 and np.abs(hidden - h[0].numpy()).max() <= 1e-4


def test_int4_export_decodes_as_it_prefills(exported):
    """Packed MLA projections and dense quantized experts behind the latent cache (their numbers are
    held to the dequantized decoder in omni-export's test_onnx_mla_moe)."""
    ids = list(np.random.default_rng(3).integers(0, 256, 12))
    e = OrtEngine(exported[3], threads=1)
    whole = e.forward(ids, last_only=False)
    e.reset()
    steps = np.concatenate([e.forward(ids[:6], last_only=False)] + [e.forward([t]) for t in ids[6:]])
    assert np.abs(steps - whole).max() <= 1e-3  # int8 activations: rounding depends on the rows per call


def test_bad_media_and_manifests_are_one_line_errors(exported, tmp_path):
    _, plain, folder, _ = exported
    e = OrtEngine(folder, threads=1)
    bad = [
        np.zeros((4, CFG.dim + 1), np.float32),  # wrong width
        np.zeros((3, CFG.dim), np.float32),  # wrong length
        np.zeros((4, CFG.dim), np.int64),  # not float
    ]
    for media in bad:
        with pytest.raises(EngineError, match="media_embeds") as info:
            e.forward([1, 2, 300, 4], media_embeds=media)
        assert "\n" not in str(info.value)
    assert e.seq_len == 0
    with pytest.raises(EngineError, match="no media_embeds"):
        OrtEngine(plain, threads=1).forward([1, 2], media_embeds=np.zeros((2, CFG.dim), np.float32))
    for change, what in (
        (lambda kv: kv.update(layout="paged"), "kv.layout"),
        (lambda kv: kv.pop("rope_dim"), "rope_dim"),
    ):
        m = tmp_path / what
        shutil.copytree(folder, m)
        data = json.loads((m / "manifest.json").read_text())
        change(data["kv"])
        (m / "manifest.json").write_text(json.dumps(data))
        with pytest.raises(EngineError, match=what) as info:
            OrtEngine(m)
        assert "\n" not in str(info.value)
