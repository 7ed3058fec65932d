"""Speculative decoding is lossless: greedy output equals plain greedy decoding for every proposer, on
both engines and every KV cache kind; sampled output follows the target's distribution (chi-square
against the exact distribution of a tiny model); bad input is a one-line error."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from omni_model_tests import tiny

import omni_model
from omni_export.errors import ExportError
from omni_export.export import ExportConfig, export_onnx
from omni_export.heads import export_heads
from omni_kv import CacheSpec
from omni_model.errors import CheckpointError, GenerationError
from omni_model.medusa import HeadsConfig, MedusaHeads, save_heads
from omni_model.sampling_config import SamplingConfig
from omni_runtime import EngineError, OrtEngine, generate
from omni_runtime.heads import OrtHeads, TorchHeads
from omni_runtime.speculative import Draft, DraftModel, HeadsProposer, Picker, PromptLookup, verify
from omni_runtime.torch_engine import TorchEngine

TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. " * 4
GREEDY = SamplingConfig(max_new_tokens=40, stop_token_ids=frozenset())


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("spec")
    tiny.save_tiny("llama", root / "hf")
    tiny.save_tiny("llama", root / "draft", seed=5)
    cfg = ExportConfig(weights="float32", parity_prompt_tokens=16, parity_decode_tokens=4)
    export_onnx(root / "hf", root / "onnx", cfg, parity_text=TEXT)
    lm = omni_model.load(root / "hf")
    heads = MedusaHeads(lm.config.dim, HeadsConfig(n_heads=3))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in heads.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    save_heads(heads, heads.config, root / "heads", base="tiny", base_sha256=None, base_dim=lm.config.dim,
               vocab_size=lm.config.vocab_size)  # fmt: skip
    export_heads(root / "heads", root / "onnx", root / "heads-onnx")
    return root


def _prompts(lm) -> list[list[int]]:
    return [
        lm.tokenizer.encode(TEXT[:60]),
        lm.tokenizer.encode("the question: whether the question: whether"),
    ]


def test_onnx_hidden_states_match_torch(models):
    lm = omni_model.load(models / "hf")
    ids = list(range(3, 40))
    lt, ht = TorchEngine(lm).forward_hidden(ids)
    lo, ho = OrtEngine(models / "onnx").forward_hidden(ids)
    assert ht.shape == ho.shape == (len(ids), lm.config.dim)
    assert np.abs(ht - ho).max() < 1e-4 and np.abs(lt - lo).max() < 1e-4
    for engine in (TorchEngine(lm), OrtEngine(models / "onnx", prefill_chunk=16)):  # the last row alone
        last_logits, last_hidden = engine.forward_hidden(ids, last_only=True)
        assert last_logits.shape == (1, lm.config.vocab_size) and last_hidden.shape == (1, lm.config.dim)
        assert np.abs(last_hidden[0] - ht[-1]).max() < 1e-4 and np.abs(last_logits[0] - lt[-1]).max() < 1e-4
    heads_t, heads_o = (
        TorchHeads(lm, models / "heads"),
        OrtHeads(models / "heads-onnx", OrtEngine(models / "onnx")),
    )
    for h in ht[::7]:
        assert (heads_t.top_ids(h)[:, 0] == heads_o.top_ids(h)[:, 0]).all()


@pytest.mark.parametrize("engine_kind", ["torch", "onnx"])
def test_greedy_output_is_identical_for_every_proposer(models, engine_kind):
    lm = omni_model.load(models / "hf")

    def engine(folder=models / "hf"):
        if engine_kind == "torch":
            return TorchEngine(omni_model.load(folder))
        if folder == models / "hf":
            return OrtEngine(models / "onnx")
        return TorchEngine(omni_model.load(folder))  # a draft on the other engine works too

    target = engine()
    heads = (
        TorchHeads(lm, models / "heads")
        if engine_kind == "torch"
        else OrtHeads(models / "heads-onnx", target)
    )
    proposers = {
        "lookup": PromptLookup(min_ngram=1),
        "draft": DraftModel(engine(models / "draft"), lm.config.vocab_size),
        "self": DraftModel(engine(), lm.config.vocab_size),  # the target drafting for itself: all kept
        "heads": HeadsProposer(heads),
    }
    for prompt in _prompts(lm):
        plain = generate(target, prompt, GREEDY)
        for name, proposer in proposers.items():
            for k in (1, 3, 5):
                r = generate(target, prompt, GREEDY, speculative=proposer, draft_tokens=k)
                assert r.token_ids == plain.token_ids, (name, k)
                s = r.speculation
                assert s is not None and s.proposer == proposer.name and s.accepted <= s.drafted
                assert s.accepted + s.steps + 1 >= r.n_generated  # each step yields kept drafts + 1
                if name == "self":
                    assert s.accepted == s.drafted and s.tokens_per_step > 1 + k / 2
    assert proposers["lookup"].propose([1, 2, 3, 9, 1, 2], 3, None, None).tokens == [3, 9, 1]
    assert (
        PromptLookup().propose([5, 6, 7, 5], 3, None, None).tokens == []
    )  # by default 2..4-token matches only
    assert PromptLookup().propose([5, 6, 7, 5, 6], 3, None, None).tokens == [7, 5, 6]


SPECS = {  # small groups, residuals, windows and pages, so that rollbacks cross their boundaries
    "dense": {}, "int8": {}, "kivi": {"group": 16, "residual": 8}, "nf4": {"group": 16, "residual": 8},
    "sink": {"sinks": 4, "window": 24}, "window": {"window": 24},
    "paged": {"page_tokens": 8, "budget_bytes": 2 * 8 * 2 * 2 * 16 * 4},
}  # fmt: skip


@pytest.mark.parametrize("kind", SPECS)
def test_rejected_drafts_roll_back_in_every_cache_kind(models, kind, tmp_path):
    lm = omni_model.load(models / "hf")
    extra = {"spill_dir": str(tmp_path)} if kind == "paged" else {}
    spec = CacheSpec(kind=kind, **SPECS[kind], **extra)
    prompt = _prompts(lm)[0]
    cfg = SamplingConfig(max_new_tokens=30, stop_token_ids=frozenset())
    plain = generate(TorchEngine(lm, cache=spec), prompt, cfg)
    for proposer in (
        PromptLookup(min_ngram=1),  # single-token matches: many drafts, many rejected
        DraftModel(TorchEngine(omni_model.load(models / "draft")), lm.config.vocab_size),
    ):
        r = generate(TorchEngine(lm, cache=spec), prompt, cfg, speculative=proposer, draft_tokens=4)
        # 4-bit caches with a full-precision residual: a verified chunk's queries see the chunk's split of
        # coded and full tokens, so far from the prompt a near-tie of this random model can flip.
        n = 16 if kind in ("kivi", "nf4") else cfg.max_new_tokens
        assert r.token_ids[:n] == plain.token_ids[:n], (kind, proposer.name)
        assert r.speculation.drafted > r.speculation.accepted  # some drafts were rolled back


def _exact_joint(lm, prompt: list[int], cfg: SamplingConfig, n: int) -> dict[tuple[int, ...], float]:
    """The target's exact probability of every n-token continuation under `cfg`'s processing."""
    pick = Picker(cfg, None)
    engine = TorchEngine(lm)
    out: dict[tuple[int, ...], float] = {}

    def walk(seq: tuple[int, ...], prob: float) -> None:
        if len(seq) == n:
            out[seq] = prob
            return
        engine.reset()
        p = pick.probs(engine.forward(prompt + list(seq))[-1], prompt + list(seq))
        for t in np.flatnonzero(p > 0):
            walk((*seq, int(t)), prob * float(p[t]))

    walk((), 1.0)
    return out


def _chi_square_p(counts: dict, exact: dict, n: int) -> float:
    cells = sorted(exact, key=exact.get, reverse=True)
    obs, exp, rest_o, rest_e = [], [], 0, 0.0
    for c in cells:  # cells expecting fewer than 5 draws are pooled into one
        if exact[c] * n >= 5:
            obs.append(counts.get(c, 0))
            exp.append(exact[c] * n)
        else:
            rest_o, rest_e = rest_o + counts.get(c, 0), rest_e + exact[c] * n
    if rest_e > 0:
        obs.append(rest_o)
        exp.append(rest_e)
    o, e = np.array(obs, float), np.array(exp)
    stat = float(((o - e) ** 2 / e).sum())
    return float(torch.special.gammaincc(torch.tensor((len(o) - 1) / 2), torch.tensor(stat / 2)))


@pytest.mark.slow
def test_sampling_follows_the_target_distribution(models):
    lm = omni_model.load(models / "hf")
    near = omni_model.load(models / "hf")  # a draft close to the target: most drafts kept, some not
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in near.model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05 * p.std())
    draft_engine = TorchEngine(near)
    cfg = SamplingConfig(max_new_tokens=3, temperature=1.3, top_k=3, stop_token_ids=frozenset(), seed=0)
    prompt = lm.tokenizer.encode("the question: whether the question: whether the")
    exact = _exact_joint(lm, prompt, cfg, 3)
    assert abs(sum(exact.values()) - 1) < 1e-6
    n = 3000
    target = TorchEngine(lm)
    # sampled drafts (q = the draft's distribution) and greedy ones (q = a point mass, as prompt lookup
    # and heads propose)
    for proposer in (DraftModel(draft_engine, lm.config.vocab_size),
                     DraftModel(draft_engine, lm.config.vocab_size, greedy=True)):  # fmt: skip
        counts: dict[tuple[int, ...], int] = {}
        drafted = accepted = 0
        for seed in range(n):
            r = generate(target, prompt, SamplingConfig(**{**cfg.__dict__, "seed": seed}), speculative=proposer,
                         draft_tokens=2)  # fmt: skip
            counts[r.token_ids] = counts.get(r.token_ids, 0) + 1
            drafted, accepted = drafted + r.speculation.drafted, accepted + r.speculation.accepted
        assert drafted > 0 and 0 < accepted < drafted, proposer.greedy  # both branches of the rule ran
        assert _chi_square_p(counts, exact, n) > 1e-3, proposer.greedy


def test_verify_rule_on_a_known_distribution():
    """Point-mass drafts: kept with probability p(x), else a draw from p without x."""
    cfg = SamplingConfig(temperature=1.0, top_k=0, top_p=1.0, stop_token_ids=frozenset())
    logits = np.log(np.array([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]], np.float32))
    pick = Picker(cfg, np.random.default_rng(0))
    firsts = [verify(logits, Draft([1]), [], pick) for _ in range(20000)]
    kept = np.mean([n == 1 for n, _ in firsts])
    assert abs(kept - 0.3) < 0.015
    rejected = np.array([t for n, t in firsts if n == 0])
    assert set(rejected) <= {0, 2} and abs(np.mean(rejected == 0) - 0.5 / 0.7) < 0.02
    # First-token marginal: 0.3 kept + 0.7 * residual -> exactly p
    first = np.array([1 if n == 1 else t for n, t in firsts])
    assert np.allclose(np.bincount(first, minlength=3) / len(first), [0.5, 0.3, 0.2], atol=0.015)


def test_bad_input_is_one_line(models, tmp_path):
    lm = omni_model.load(models / "hf")
    prompt = _prompts(lm)[0]
    for k in (0, 17, 2.0, True):
        with pytest.raises(GenerationError, match=r"draft tokens must be an integer in 1\.\.16") as e:
            generate(TorchEngine(lm), prompt, GREEDY, speculative=PromptLookup(), draft_tokens=k)
        assert "\n" not in str(e.value)
    with pytest.raises(
        GenerationError, match=f"vocabulary has 300 tokens; the target's has {lm.config.vocab_size}"
    ):
        other = tmp_path / "other"
        tiny.save_tiny("llama", other, vocab_size=300)
        DraftModel(TorchEngine(omni_model.load(other)), lm.config.vocab_size)
    with pytest.raises(CheckpointError, match="heads trained for another base"):
        big = tmp_path / "big"
        tiny.save_tiny("llama", big, hidden_size=96)
        TorchHeads(omni_model.load(big), models / "heads")
    # heads exported for one ONNX export are refused by another
    shutil.copytree(models / "onnx", tmp_path / "onnx2")
    m = json.loads((tmp_path / "onnx2" / "manifest.json").read_text())
    (tmp_path / "onnx2" / "manifest.json").write_text(json.dumps({**m, "source": "elsewhere"}))
    with pytest.raises(EngineError, match="heads exported for another model export"):
        OrtHeads(models / "heads-onnx", OrtEngine(tmp_path / "onnx2"))
    with pytest.raises(EngineError, match="not a readable heads manifest"):
        OrtHeads(tmp_path, OrtEngine(models / "onnx"))


@pytest.mark.parametrize("weights", ["float32", "int4"])
def test_heads_with_a_reduced_vocabulary_score_only_the_kept_tokens(models, tmp_path, weights):
    """Heads at init are the identity, so head logits are the decoder's own: the reduced graph's best token
    must be the decoder's best among the kept ones (float MatMul and MatMulNBits heads alike)."""
    lm = omni_model.load(models / "hf")
    v = lm.config.vocab_size
    onnx = models / "onnx"
    if weights == "int4":
        onnx = tmp_path / "int4"
        export_onnx(models / "hf", onnx, ExportConfig(weights="int4", parity_prompt_tokens=8, parity_decode_tokens=2),
                    parity_text=TEXT)  # fmt: skip
    heads = MedusaHeads(lm.config.dim, HeadsConfig(n_heads=2))
    counts = np.random.default_rng(0).integers(0, 1000, v)
    save_heads(heads, heads.config, tmp_path / "heads", base="tiny", base_sha256=None, base_dim=lm.config.dim,
               vocab_size=v, token_counts=counts)  # fmt: skip
    m = export_heads(tmp_path / "heads", onnx, tmp_path / "heads-onnx", vocab_size=64)
    assert m["drafted_vocab"] == 64
    keep = np.sort(np.argsort(-counts, kind="stable")[:64])
    engine = OrtEngine(onnx)
    logits, hidden = engine.forward_hidden(list(range(5, 30)))
    oh = OrtHeads(tmp_path / "heads-onnx", engine)
    for row in range(0, 25, 4):
        top = oh.top_ids(hidden[row])
        assert set(top.ravel()) <= set(keep.tolist())
        assert (top[:, 0] == keep[np.argmax(logits[row][keep])]).all()
    with pytest.raises(ExportError, match=r"token-counts\.npy"):
        export_heads(models / "heads", onnx, tmp_path / "x", vocab_size=64)


def test_onnx_int8_kv_graph_rolls_back_exactly(models, tmp_path):
    """The int8-cache graph codes each token on its own (no full-precision residual): speculative greedy
    output equals plain greedy output on it too."""
    lm = omni_model.load(models / "hf")
    cfg = ExportConfig(weights="float32", kv="int8", parity_prompt_tokens=8, parity_decode_tokens=2)
    export_onnx(models / "hf", tmp_path / "int8kv", cfg, parity_text=TEXT)
    target = OrtEngine(tmp_path / "int8kv")
    for prompt in _prompts(lm):
        plain = generate(target, prompt, GREEDY)
        for proposer in (
            PromptLookup(min_ngram=1),
            DraftModel(TorchEngine(omni_model.load(models / "draft")), lm.config.vocab_size),
        ):
            r = generate(target, prompt, GREEDY, speculative=proposer, draft_tokens=3)
            assert r.token_ids == plain.token_ids, proposer.name
            assert r.speculation.drafted > r.speculation.accepted


def test_exact_engine_computes_a_position_the_same_in_any_call(models, tmp_path):
    """4-bit weights, int8 activations: with `exact`, a position's logits and hidden state are the same
    bits whether a call computes it alone, as a decode step, or among 2..6 rows (a verification), and
    greedy speculative output equals plain greedy output for every draft length."""
    lm = omni_model.load(models / "hf")
    cfg = ExportConfig(weights="int4", parity_prompt_tokens=8, parity_decode_tokens=2)
    export_onnx(models / "hf", tmp_path / "int4", cfg, parity_text=TEXT)
    e = OrtEngine(tmp_path / "int4", exact=True)
    ids = lm.tokenizer.encode(TEXT)[:40]
    e.forward(ids[:10])
    steps = [e.forward_hidden([t], last_only=True) for t in ids[10:]]
    one_logits = np.concatenate([s[0] for s in steps])
    one_hidden = np.concatenate([s[1] for s in steps])
    assert one_logits.shape == (30, lm.config.vocab_size) and e.seq_len == 40
    for rows in (2, 3, 6):
        e.rollback(30)
        parts = [e.forward_hidden(ids[s : min(s + rows, 40)]) for s in range(10, 40, rows)]
        assert np.array_equal(np.concatenate([p[0] for p in parts]), one_logits), rows
        assert np.array_equal(np.concatenate([p[1] for p in parts]), one_hidden), rows
    e.rollback(1)  # a last-row-only call of one token is padded too
    assert np.array_equal(e.forward([ids[-1]])[0], one_logits[-1])
    full = OrtEngine(tmp_path / "int4", exact=True, max_seq_len=12)  # no room for the copy: one row alone
    full.forward(ids[:11])
    assert full.forward([ids[11]]).shape == (1, lm.config.vocab_size) and full.seq_len == 12
    for prompt in _prompts(lm):
        plain = generate(e, prompt, GREEDY)
        for proposer in (
            PromptLookup(min_ngram=1),
            DraftModel(TorchEngine(omni_model.load(models / "draft")), lm.config.vocab_size),
        ):
            for k in (1, 3, 5):
                r = generate(e, prompt, GREEDY, speculative=proposer, draft_tokens=k)
                assert r.token_ids == plain.token_ids, (proposer.name, k)


def test_tree_verification_is_greedy_identical_on_the_torch_engine(models):
    lm = omni_model.load(models / "hf")
    heads = TorchHeads(lm, models / "heads")
    tree = [(0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0)]
    kept = 0
    for prompt in _prompts(lm):
        for spec in (None, CacheSpec(kind="int8"), CacheSpec(kind="paged", page_tokens=8)):
            target = TorchEngine(lm, cache=spec)
            plain = generate(target, prompt, GREEDY)
            for k in (1, 2, 3):
                r = generate(target, prompt, GREEDY, speculative=HeadsProposer(heads, tree), draft_tokens=k)
                assert r.token_ids == plain.token_ids, (spec, k)
                assert r.speculation.proposer == "heads, tree of 7"
                kept += r.speculation.accepted
    assert kept > 0  # kept paths were fed again and decoding went on from them
    with pytest.raises(GenerationError, match="its prefix a path too"):
        HeadsProposer(heads, [(0, 1)])
    with pytest.raises(EngineError, match="tree verification needs the PyTorch engine"):
        generate(OrtEngine(models / "onnx"), _prompts(lm)[0], GREEDY,
                 speculative=HeadsProposer(OrtHeads(models / "heads-onnx", OrtEngine(models / "onnx")), [(0,)]))  # fmt: skip


def test_tree_rule_keeps_the_target_distribution():
    """Point-mass children tried in order (kept with r(x), else removed from r): the first token is
    distributed as p whatever the children are."""
    cfg = SamplingConfig(temperature=1.0, top_k=0, top_p=1.0, stop_token_ids=frozenset())
    p = np.array([0.4, 0.3, 0.2, 0.1])
    logits = np.log(np.tile(p, (4, 1))).astype(np.float32)
    pick = Picker(cfg, np.random.default_rng(0))
    draft = Draft([1, 0, 2], None, [-1, -1, 0])  # children 1 then 0 at the root; 2 under the first
    from omni_runtime.speculative import verify_tree

    firsts = []
    for _ in range(20000):
        path, t = verify_tree(logits, draft, [], pick)
        firsts.append(draft.tokens[path[0]] if path else t)
    assert np.allclose(np.bincount(firsts, minlength=4) / len(firsts), p, atol=0.012)


def test_every_tree_path_computes_what_its_sequence_would(models):
    lm = omni_model.load(models / "hf")
    prefix, tokens, parents = [5, 9, 11, 40], [7, 8, 9, 10, 12], [-1, 0, 0, 1, 2]
    engine = TorchEngine(lm)
    engine.forward(prefix)
    logits, hidden = engine.forward_tree(tokens, parents)
    engine.rollback(len(tokens))
    for leaf, path in ((3, [0, 1, 3]), (4, [0, 2, 4])):
        seq_logits, seq_hidden = engine.forward_hidden([tokens[i] for i in path])
        engine.rollback(len(path))
        assert (
            np.abs(seq_hidden - hidden[path]).max() < 1e-4
            and np.abs(seq_logits[-1] - logits[leaf]).max() < 1e-4
        )
    with pytest.raises(EngineError, match="a parent before it"):
        engine.forward_tree([1, 2], [-1, 1])
    assert engine.seq_len == len(prefix)
