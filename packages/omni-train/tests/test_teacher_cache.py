"""The teacher's top-k logits cached once: equal to running the teacher, resumable when interrupted,
rebuilt when corrupt, and with k = vocabulary the cached loss is the full distillation loss."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from omni_train import TrainConfig, TrainError, train
from omni_train.recipes import CachedDistillObjective, distill_loss, inherit_embeddings, topk_distill_loss
from omni_train.teacher_cache import TeacherCache, tokens_sha256

sys.path.insert(0, str(Path(__file__).parent))
from test_loop import tiny, tokens  # the loop tests' tiny model and token stream


def test_cache_equals_the_teacher_and_resumes(tmp_path):
    teacher, data = tiny(seed=5).eval(), tokens(2000)
    cache = TeacherCache.build(teacher, data, tmp_path / "c", seq_len=16, k=8, teacher_id="t", batch_size=16)
    w = np.array([3, 40, 7])
    vals, ids, lse = cache.lookup(w)
    x = torch.from_numpy(np.stack([data[i * 16 : i * 16 + 16] for i in w]).astype(np.int64))
    with torch.no_grad():
        top = teacher(x).topk(8, dim=-1)
    torch.testing.assert_close(vals, top.values.half().float())
    assert torch.equal(ids, top.indices)
    with torch.no_grad():
        torch.testing.assert_close(lse, torch.logsumexp(teacher(x), -1))

    def stop(what, done, total):
        if done >= 32:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        TeacherCache.build(teacher, data, tmp_path / "r", seq_len=16, k=8, teacher_id="t", batch_size=16,
                           on_progress=stop)  # fmt: skip
    with pytest.raises(TrainError, match="incomplete"):
        TeacherCache.open(
            tmp_path / "r",
            {k: cache.meta[k] for k in ("teacher", "tokens", "seq_len", "k", "temperature", "windows")},
        )
    seen = []
    again = TeacherCache.build(teacher, data, tmp_path / "r", seq_len=16, k=8, teacher_id="t", batch_size=16,
                               on_progress=lambda what, done, total: seen.append(done))  # fmt: skip
    assert seen[0] == 32  # went on where it stopped
    assert np.array_equal(again.values, cache.values) and np.array_equal(again.ids, cache.ids)


def test_corrupt_or_foreign_cache_is_not_trusted(tmp_path):
    teacher, data = tiny(seed=5).eval(), tokens(600)
    c = TeacherCache.build(teacher, data, tmp_path / "c", seq_len=16, k=4, teacher_id="t")
    ident = {k: c.meta[k] for k in ("teacher", "tokens", "seq_len", "k", "temperature", "windows")}
    with pytest.raises(TrainError, match="another teacher"):
        TeacherCache.open(tmp_path / "c", ident | {"teacher": "other"})
    with open(tmp_path / "c" / "ids.i32", "r+b") as f:
        f.truncate(100)
    with pytest.raises(TrainError, match=r"ids\.i32: missing or not"):
        TeacherCache.open(tmp_path / "c", ident)
    rebuilt = TeacherCache.build(teacher, data, tmp_path / "c", seq_len=16, k=4, teacher_id="t")
    assert rebuilt.meta["done"] == rebuilt.meta["windows"] and rebuilt.meta["tokens"] == tokens_sha256(data)


def test_topk_loss_is_the_full_loss_with_every_token_and_keeps_the_tail():
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 64), 3 * torch.randn(2, 5, 64)
    y = torch.randint(0, 64, (2, 5))
    lse = torch.logsumexp(t / 2.0, -1)
    full = t.topk(64, dim=-1)
    torch.testing.assert_close(topk_distill_loss(s, full.values, full.indices, lse, y, 2.0, 0.7),
                               distill_loss(s, t, y, 2.0, 0.7))  # fmt: skip
    lse1 = torch.logsumexp(t, -1)  # T = 1: one log-softmax serves both terms
    torch.testing.assert_close(topk_distill_loss(s, full.values, full.indices, lse1, y, 1.0, 0.5),
                               distill_loss(s, t, y, 1.0, 0.5))  # fmt: skip
    # Top 8 of 64 plus the rest bucket: a student equal to the teacher has zero KL (renormalising over
    # the 8 alone would not), and a student that puts no mass outside the top 8 pays for it.
    top = t.topk(8, dim=-1)
    lse1 = torch.logsumexp(t, -1)
    assert float(topk_distill_loss(t, top.values, top.indices, lse1, y, 1.0, 1.0)) < 1e-5
    greedy = torch.full_like(t, -30.0).scatter(-1, top.indices, top.values)
    assert float(topk_distill_loss(greedy, top.values, top.indices, lse1, y, 1.0, 1.0)) > 0.05


def test_training_from_the_cache_moves_the_student_toward_the_teacher(tmp_path):
    teacher, data, val = tiny(seed=5).eval(), tokens(3000), tokens(800, 1)
    with torch.no_grad():  # a confident teacher: its top 16 tokens hold nearly all of its mass
        teacher.lm_head.weight.mul_(20)
    cfg = TrainConfig(seq_len=16, batch_size=4, steps=30, warmup=2, eval_every=100, eval_batches=2, lr=3e-3)
    cache = TeacherCache.build(
        teacher, data, tmp_path / "c", seq_len=16, k=16, teacher_id="t", temperature=2.0
    )
    with pytest.raises(TrainError, match="temperature"):
        CachedDistillObjective(cache, 64, temperature=1.0)
    student = tiny(seed=1)
    x = torch.from_numpy(val[:257].astype(np.int64))[None, :256]

    def gap() -> float:
        with torch.no_grad():
            return float(torch.nn.functional.kl_div(student(x).log_softmax(-1), teacher(x).log_softmax(-1),
                                                    log_target=True, reduction="batchmean"))  # fmt: skip

    before = gap()
    objective = CachedDistillObjective(cache, 64, temperature=2.0, alpha=1.0)
    train(student, objective, data, val, cfg, tmp_path / "run")
    assert gap() < 0.85 * before


def _decoder(dim: int, vocab: int = 64, tie: bool = True) -> torch.nn.Module:
    from omni_model.config import ModelConfig
    from omni_model.decoder import Decoder

    return Decoder(ModelConfig(vocab_size=vocab, dim=dim, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=32,
                               max_seq_len=32, tie_embeddings=tie))  # fmt: skip


def test_inherited_embeddings_are_the_teachers_best_low_rank_geometry():
    torch.manual_seed(0)
    teacher = _decoder(32)
    with torch.no_grad():  # a teacher whose embedding has structure: a few strong directions
        teacher.embed_tokens.weight.copy_(
            torch.randn(64, 4) @ torch.randn(4, 32) + 0.05 * torch.randn(64, 32)
        )
    student = _decoder(8)
    kept = inherit_embeddings(student, teacher)
    e_t, e_s = teacher.embed_tokens.weight, student.embed_tokens.weight
    u, s, _ = torch.linalg.svd(e_t, full_matrices=False)
    best = (u[:, :8] * s[:8] ** 2) @ u[:, :8].T  # Eckart-Young: the closest rank-8 Gram matrix
    torch.testing.assert_close(e_s @ e_s.T, best, atol=1e-4, rtol=1e-4)
    assert 0.95 < kept <= 1.0 and student.lm_head.weight is e_s  # tied: the head moved with it
    untied = _decoder(8, tie=False)
    inherit_embeddings(untied, teacher)
    torch.testing.assert_close(untied.lm_head.weight, untied.embed_tokens.weight)  # the teacher's tied head
    wide = _decoder(48)
    extra = wide.embed_tokens.weight[:, 32:].clone()
    inherit_embeddings(wide, teacher)
    assert torch.equal(wide.embed_tokens.weight[:, 32:], extra)  # past the teacher's width: as initialised
    with pytest.raises(TrainError, match="vocabulary"):
        inherit_embeddings(_decoder(8, vocab=32), teacher)
