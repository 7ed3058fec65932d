"""Medusa heads on tiny decoders: zero init is the base's next-token head, the loop trains the heads alone
(on the base's own greedy continuations) and lifts their accuracy, save/load round-trips, bad files and
other bases give one-line TrainErrors, and batched cached greedy decoding equals uncached decoding."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from omni_model.config import ModelConfig
from omni_model.decoder import Decoder
from omni_model.errors import CheckpointError, ConfigError
from omni_train import TrainConfig, TrainError, train
from omni_train.heads import (
    HeadedModel,
    HeadsConfig,
    HeadsObjective,
    MedusaHeads,
    greedy_continuations,
    head_accuracy,
    load_heads,
    sample_prompts,
    save_heads,
)

V, D, SHA = 32, 32, "ab" * 32


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny matmuls: on a busy 2-core machine a second intra-op thread only spins waiting for a core.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(seed: int = 0, dim: int = D, eos: int | None = None) -> Decoder:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=V, dim=dim, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64,
                      eos_token_id=eos)  # fmt: skip
    return Decoder(cfg).eval()


def counter_base() -> Decoder:
    """A base whose greedy next token is mostly the current one + 1 (mod V): lm_head row j is the
    embedding of j-1, and the blocks' small random weights only perturb the embedding. Its greedy
    continuations are counters, which heads can learn (token t+k+1 is the current one + k + 1)."""
    base = tiny()
    with torch.no_grad():
        e = torch.randn(V, D, generator=torch.Generator().manual_seed(0))
        base.embed_tokens.weight.copy_(e)
        base.lm_head.weight.copy_(torch.roll(e, 1, 0))  # (V, D): row j = e[j-1]
    return base


def randomize(heads: MedusaHeads, seed: int = 1) -> MedusaHeads:
    """Non-zero blocks, as after training, so that the heads differ from the base."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in heads.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return heads


def test_config_and_objective_validate():
    for bad in ({"n_heads": 0}, {"layers": 0}, {"n_heads": 2.0}, {"n_heads": True}, {"layers": 10**6}):
        with pytest.raises(ConfigError, match="HeadsConfig") as e:
            HeadsConfig(**bad)
        assert "\n" not in str(e.value)
    with pytest.raises(TrainError, match="decay"):
        HeadsObjective(decay=0)
    with pytest.raises(TrainError, match="seq_len > n_heads"):
        HeadsObjective().loss(HeadedModel(tiny(), MedusaHeads(D, HeadsConfig(n_heads=3))), *_batch(3))
    with pytest.raises(TrainError, match="heads of dim 16 for a base of dim 32"):
        HeadedModel(tiny(), MedusaHeads(16, HeadsConfig()))


def _batch(t: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randint(0, V, (2, t + 1), generator=torch.Generator().manual_seed(0))
    return x[:, :-1], x[:, 1:]


def test_zero_init_heads_are_the_base_next_token_head():
    base, x = tiny(), _batch(12)[0]
    model = HeadedModel(base, MedusaHeads(D, HeadsConfig(n_heads=3, layers=2)))
    logits, heads = model(x)
    assert heads.shape == (3, 2, 12, V)
    assert torch.equal(logits, base(x))
    for z in heads:  # head k at t predicts what the base predicts at t, before training
        assert torch.equal(z, logits)
        assert torch.equal(z.argmax(-1), base(x).argmax(-1))
    # so against the base's greedy token one step further on, head 1 is right only where the base repeats
    acc = head_accuracy(base, model.heads, np.arange(200, dtype=np.uint16) % V, 16, 4)
    assert acc["head1_acc"] < 0.2 and set(acc) >= {"head3_acc", "head3_acc_text", "mean_accepted"}


def test_soft_and_hard_losses():
    model = HeadedModel(tiny(), randomize(MedusaHeads(D, HeadsConfig(n_heads=2))))
    x, y = _batch(10)
    hard, info = HeadsObjective().loss(model, x, y)
    soft, _ = HeadsObjective(soft=True, decay=1.0).loss(model, x, y)
    logits, heads = model(x)
    ce = [torch.nn.functional.cross_entropy(heads[k - 1, :, : 10 - k].reshape(-1, V),
                                            logits[:, k:].argmax(-1).reshape(-1)) for k in (1, 2)]  # fmt: skip
    assert torch.allclose(hard, (ce[0] + 0.8 * ce[1]) / 1.8)
    assert info["head2_loss"] == pytest.approx(float(ce[1].detach()), rel=1e-5)
    assert soft > 0 and hard.requires_grad
    zero = HeadedModel(tiny(), MedusaHeads(D, HeadsConfig(n_heads=2)))
    assert (
        float(HeadsObjective(soft=True).loss(zero, x, y)[0].detach()) > 0
    )  # the base at t is not the base at t+k


def test_training_on_greedy_continuations_lifts_head_accuracy_and_keeps_the_base(tmp_path):
    base = counter_base()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    text = np.random.default_rng(0).integers(0, V, 4000).astype(np.uint16)
    data = greedy_continuations(base, sample_prompts(text, 64, 4, seed=0), 28, 32)
    val = greedy_continuations(base, sample_prompts(text, 16, 4, seed=1), 28, 16)
    assert data.dtype == np.uint16 and len(data) == 64 * 32
    heads = MedusaHeads(D, HeadsConfig(n_heads=3))
    start = head_accuracy(base, heads, val, 16, 8)
    cfg = TrainConfig(seq_len=16, batch_size=8, steps=30, warmup=2, lr=3e-2, weight_decay=0.0, eval_every=100,
                      eval_batches=4)  # fmt: skip
    result = train(HeadedModel(base, heads), HeadsObjective(), data, val, cfg, tmp_path / "run")
    end = head_accuracy(base, heads, val, 16, 8)
    for k in (1, 2, 3):
        assert start[f"head{k}_acc"] < 0.1 and end[f"head{k}_acc"] > 0.6, (k, start, end)
    assert end["mean_accepted"] > 1.0 and result.metrics["head1_acc"] == pytest.approx(end["head1_acc"])
    for k, v in base.state_dict().items():  # the base is bit-identical and frozen
        assert torch.equal(v, before[k]), k
    assert not any(p.requires_grad for p in base.parameters()) and not base.training
    saved = load_file(tmp_path / "run" / "checkpoint" / "model.safetensors")
    assert set(saved) == set(dict(heads.named_parameters(prefix="heads")))  # only the heads are trained


def test_save_load_round_trip_and_untrusted_files(tmp_path):
    base, cfg = tiny(), HeadsConfig(n_heads=2, layers=2)
    heads = randomize(MedusaHeads(D, cfg))
    out = save_heads(heads, cfg, tmp_path / "heads", base="tiny", base_sha256=SHA, base_dim=D, vocab_size=V)
    assert sorted(p.name for p in out.iterdir()) == ["heads.json", "heads.safetensors"]
    save_heads(heads, cfg, out, base="tiny", base_sha256=SHA, base_dim=D, vocab_size=V)  # replaces its own
    loaded = load_heads(out, base, base_sha256=SHA)
    x = _batch(12)[0]
    a, b = HeadedModel(base, heads)(x), HeadedModel(base, loaded)(x)
    assert loaded.config == cfg and torch.equal(a[1], b[1]) and not torch.equal(a[1][0], a[0])

    def fails(match: str, folder=out, model=base, sha: str | None = None) -> None:
        with pytest.raises(CheckpointError, match=match) as e:
            load_heads(folder, model, base_sha256=sha)
        assert "\n" not in str(e.value)

    fails("heads trained for another base", sha="cd" * 32)
    fails("heads trained for another base", model=tiny(dim=64))
    meta = json.loads((out / "heads.json").read_text())

    def edit(**changes) -> None:
        (out / "heads.json").write_text(json.dumps({**meta, **changes}))

    edit(vocab_size=V + 1)
    fails("heads trained for another base")
    edit(config={"n_heads": 3, "layers": 2})
    fails(r"missing tensor .blocks.2.0.linear.bias. \(4 missing in all\)")
    edit(config={"n_heads": "2", "layers": 2})
    fails("HeadsConfig.n_heads must be an integer")
    edit(dim=[32])
    fails("'dim' must be a positive integer")
    edit(format="other")
    fails("not an OmniCoder Medusa heads file")
    (out / "heads.json").write_text("{not json")
    fails("not readable JSON")
    edit()
    tensors = load_file(out / "heads.safetensors")
    save_file({**tensors, "blocks.0.0.linear.weight": torch.zeros(D, D + 1)}, out / "heads.safetensors")
    fails(r"has shape \(32, 33\), the heads need \(32, 32\)")
    save_file(
        {**tensors, "blocks.0.0.linear.bias": torch.full((D,), float("nan"))}, out / "heads.safetensors"
    )
    fails("not finite floating point")
    save_file({**tensors, "extra": torch.zeros(1)}, out / "heads.safetensors")
    fails("unexpected tensor 'extra'")
    (out / "heads.safetensors").write_bytes(b"garbage")
    fails("not a readable safetensors file")
    fails("no heads.json", folder=tmp_path)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x").write_text("keep me")
    with pytest.raises(CheckpointError, match="not a Medusa heads folder"):
        save_heads(heads, cfg, tmp_path / "other", base="tiny", base_sha256=None, base_dim=D, vocab_size=V)
    with pytest.raises(CheckpointError, match="of dim 32; the call says"):
        save_heads(heads, cfg, tmp_path / "h2", base="tiny", base_sha256=None, base_dim=64, vocab_size=V)


def _uncached(base: Decoder, prompt: torch.Tensor, n: int) -> list[int]:
    seq = prompt.tolist()
    for _ in range(n):
        seq.append(int(base(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt) :]


def test_greedy_continuations_equal_uncached_decoding():
    base = tiny(seed=3)
    prompts = sample_prompts(np.arange(500, dtype=np.uint16) % V, 5, 6, seed=2)
    assert prompts.shape == (5, 6) and torch.equal(prompts, sample_prompts(np.arange(500) % V, 5, 6, seed=2))
    conts = [_uncached(base, p, 10) for p in prompts]
    seen = []
    stream = greedy_continuations(base, prompts, 10, 2, on_progress=lambda *a: seen.append(a))
    assert stream.tolist() == [t for p, c in zip(prompts, conts, strict=True) for t in [*p.tolist(), *c]]
    assert seen[-1] == ("generating", 5, 5)
    # with an EOS id: each continuation ends at its first EOS, or gets one appended
    eos = conts[0][3]
    base.config = replace(base.config, eos_token_id=eos)
    cut = [c[: c.index(eos) + 1] if eos in c else [*c, eos] for c in conts]
    stream = greedy_continuations(base, prompts, 10, 4)
    assert stream.tolist() == [t for p, c in zip(prompts, cut, strict=True) for t in [*p.tolist(), *c]]
    with pytest.raises(TrainError, match="exceed the base's context"):
        greedy_continuations(base, prompts, 60, 2)
    with pytest.raises(TrainError, match="outside the vocabulary"):
        greedy_continuations(base, prompts + V, 4, 2)
    with pytest.raises(TrainError, match="integer tensor"):
        greedy_continuations(base, prompts.float(), 4, 2)


def test_chat_prompts_wrap_passages_in_the_template(tmp_path):
    from omni_model_tests import tiny as tiny_models

    from omni_model.tokenizer import Tokenizer
    from omni_train.heads import INSTRUCTIONS, chat_prompts

    tiny_models.byte_tokenizer(tmp_path)
    tok = Tokenizer.from_hf_folder(tmp_path)
    text = np.array(tok.encode("O Romeo, Romeo, wherefore art thou Romeo? " * 20), dtype=np.uint16)
    groups = chat_prompts(tok, text, 20, 12, seed=3)
    assert sum(len(g) for g in groups) == 20 and len(groups) == len(INSTRUCTIONS)
    windows = sample_prompts(text, 20, 12, seed=3)
    for i, g in enumerate(groups):
        rendered = tok.decode(g[0].tolist())
        assert INSTRUCTIONS[i] in rendered and "user" in rendered and rendered.rstrip().endswith("assistant")
        assert tok.decode(windows[i].tolist()) in rendered  # the passage, spliced in as it was


def test_heads_over_a_reduced_vocabulary_train_and_report_token_ids(tmp_path):
    base = counter_base()
    text = np.random.default_rng(0).integers(0, V, 4000).astype(np.uint16)
    data = greedy_continuations(base, sample_prompts(text, 64, 4, seed=0), 28, 32)
    val = greedy_continuations(base, sample_prompts(text, 16, 4, seed=1), 28, 16)
    vocab = torch.from_numpy(np.sort(np.argsort(-np.bincount(data, minlength=V), kind="stable")[: V // 2]))
    heads = MedusaHeads(D, HeadsConfig(n_heads=2))
    model = HeadedModel(base, heads, vocab)
    logits, z = model(torch.from_numpy(data[:16].astype(np.int64))[None])
    assert z.shape == (2, 1, 16, len(vocab)) and logits.shape == (1, 16, V)
    cfg = TrainConfig(seq_len=16, batch_size=8, steps=30, warmup=2, lr=3e-2, weight_decay=0.0, eval_every=100,
                      eval_batches=4)  # fmt: skip
    result = train(model, HeadsObjective(), data, val, cfg, tmp_path / "run")
    # half the tokens are kept, so about half the targets can be drafted; ids are mapped back before comparing
    assert 0.35 < result.metrics["head1_acc"] <= 0.6
    with pytest.raises(TrainError, match="non-empty 1-D set of token ids"):
        HeadedModel(base, heads, torch.tensor([V]))
    with pytest.raises(TrainError, match="needs the whole vocabulary"):
        HeadsObjective(soft=True).head_losses(logits, z, vocab)
