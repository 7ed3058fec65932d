"""What is trained and against what: language modelling (pretraining, LoRA, continued training of an
upcycled MoE) and distillation from a teacher (Hinton et al. 2015: KL on temperature-softened
logits, plus cross-entropy on the data), and the student presets.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from omni_model.config import MLAConfig, ModelConfig, RopeConfig
from omni_moe import MoEConfig
from omni_train.errors import TrainError
from omni_train.loop import Batch, lm_loss, perplexity


class LMObjective:
    """Next-token cross-entropy on the data."""

    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, float]]:
        return lm_loss(model(x), y), {}

    def evaluate(self, model: nn.Module, batches: Iterator[Batch]) -> dict[str, float]:
        return perplexity(model, batches)


def distill_loss(student: Tensor, teacher: Tensor, y: Tensor, temperature: float, alpha: float) -> Tensor:
    """alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(student, y), per token mean.
    The T^2 keeps the soft term's gradient scale independent of T (Hinton et al.)."""
    v = student.shape[-1]
    s, t = student.reshape(-1, v).float(), teacher.reshape(-1, v).float()
    log_s = F.log_softmax(s / temperature, -1)
    kl = F.kl_div(log_s, F.log_softmax(t / temperature, -1), log_target=True, reduction="batchmean")
    ce = F.nll_loss(log_s, y.reshape(-1)) if temperature == 1 else F.cross_entropy(s, y.reshape(-1))
    return alpha * temperature**2 * kl + (1 - alpha) * ce


@dataclass
class DistillObjective:
    """The teacher runs in no-grad on each micro-batch (its cost counts against the budget)."""

    teacher: nn.Module
    temperature: float = 1.0
    alpha: float = 0.5

    def __post_init__(self) -> None:
        if not self.temperature > 0 or not 0 <= self.alpha <= 1:
            raise TrainError(
                f"need temperature > 0 and 0 <= alpha <= 1, got {self.temperature}, {self.alpha}"
            )
        self.teacher.eval().requires_grad_(False)

    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, float]]:
        with torch.no_grad():
            t = self.teacher(x)
        s = model(x)
        if s.shape[-1] != t.shape[-1]:
            raise TrainError(
                f"the student's vocabulary ({s.shape[-1]}) differs from the teacher's ({t.shape[-1]})"
            )
        loss = distill_loss(s, t, y, self.temperature, self.alpha)
        return loss, {}

    def evaluate(self, model: nn.Module, batches: Iterator[Batch]) -> dict[str, float]:
        return perplexity(model, batches)


def topk_distill_loss(student: Tensor, t_values: Tensor, t_ids: Tensor, t_lse: Tensor, y: Tensor,
                      temperature: float, alpha: float) -> Tensor:  # fmt: skip
    """distill_loss with the teacher known by its top-k logits and the logsumexp of all of them (at
    the temperature): the KL over k + 1 outcomes, the k tokens and "any other token", so the tail keeps
    the mass the teacher gives it (renormalising over the k alone teaches the student that the text's
    next token is never outside the teacher's top k, which wrecks its perplexity)."""
    v, k = student.shape[-1], t_values.shape[-1]
    s = student.reshape(-1, v).float()
    t_values, t_ids, t_lse = t_values.reshape(-1, k), t_ids.reshape(-1, k), t_lse.reshape(-1, 1)
    log_s = F.log_softmax(s / temperature, -1)
    log_s_top = log_s.gather(1, t_ids)  # (N, k)
    log_t_top = (t_values / temperature - t_lse).clamp(max=0.0)  # (N, k), exact log-probabilities
    eps = 1e-6
    log_t_rest = torch.log1p(-log_t_top.exp().sum(-1).clamp(max=1 - eps))  # (N,)
    log_s_rest = torch.log1p(-log_s_top.exp().sum(-1).clamp(max=1 - eps))
    kl = (log_t_top.exp() * (log_t_top - log_s_top)).sum(-1) + log_t_rest.exp() * (log_t_rest - log_s_rest)
    # At T = 1 the softened distribution is the plain one: one log-softmax over the vocabulary serves both
    # terms (the largest tensor of a small student's step, and its backward).
    ce = F.nll_loss(log_s, y.reshape(-1)) if temperature == 1 else F.cross_entropy(s, y.reshape(-1))
    return alpha * temperature**2 * kl.mean() + (1 - alpha) * ce


@dataclass
class CachedDistillObjective:
    """Distillation from a TeacherCache: the teacher's top-k logits of each served window, read from
    disk, so no teacher runs during training."""

    cache: Any  # omni_train.teacher_cache.TeacherCache
    vocab_size: int
    temperature: float = 1.0
    alpha: float = 0.5

    def __post_init__(self) -> None:
        if not self.temperature > 0 or not 0 <= self.alpha <= 1:
            raise TrainError(
                f"need temperature > 0 and 0 <= alpha <= 1, got {self.temperature}, {self.alpha}"
            )
        if self.cache.temperature != self.temperature:
            raise TrainError(
                f"{self.cache.folder}: cached at temperature {self.cache.temperature}, not {self.temperature}"
            )
        self._batches: Any = None

    def bind_batches(self, batches: Any) -> None:
        self._batches = batches

    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, float]]:
        values, ids, lse = self.cache.lookup(self._batches.last_windows)
        if values.shape[:2] != x.shape or int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size:
            raise TrainError(
                f"{self.cache.folder}: cached teacher logits do not fit this batch (corrupt cache)"
            )
        return topk_distill_loss(model(x), values, ids, lse, y, self.temperature, self.alpha), {}

    def evaluate(self, model: nn.Module, batches: Iterator[Batch]) -> dict[str, float]:
        return perplexity(model, batches)


@torch.no_grad()
def inherit_embeddings(student: nn.Module, teacher: nn.Module) -> float:
    """Start the student's token embedding (and an untied head) from the teacher's, cut to the student's
    width: the teacher's embedding E (V, D_t) projected on its top D_s right singular vectors, E @ V_k,
    the rank-D_s matrix whose rows' inner products are closest to the teacher's (Eckart-Young). Tokens
    the teacher embeds alike start alike, and a tied head starts with the teacher's output geometry, so
    the steps a small budget affords go to the layers instead of relearning the vocabulary (weight
    inheritance, as DistilBERT starts from its teacher's layers). Returns the share of E's energy kept."""
    e_s, e_t = student.embed_tokens.weight, teacher.embed_tokens.weight
    if e_s.shape[0] != e_t.shape[0]:
        raise TrainError(
            f"the student's vocabulary ({e_s.shape[0]}) differs from the teacher's ({e_t.shape[0]})"
        )
    d = min(e_s.shape[1], e_t.shape[1])
    _, sv, vh = torch.linalg.svd(e_t.float(), full_matrices=False)  # E = U S Vh
    basis = vh[:d].T  # (D_t, d)
    e_s[:, :d] = (e_t.float() @ basis).to(e_s.dtype)  # columns past the teacher's width keep their init
    head_s, head_t = student.lm_head.weight, teacher.lm_head.weight
    if head_s is not e_s:  # an untied head: the teacher's, in the same basis
        head_s[:, :d] = (head_t.float() @ basis).to(head_s.dtype)
    return float((sv[:d] ** 2).sum() / (sv**2).sum())


def student_config(preset: str, teacher: ModelConfig) -> ModelConfig:
    """A student sharing the teacher's vocabulary, special tokens and rope base.

    - `mla-moe-30m`: 6 layers of dim 256, MLA (latent 64), MoE of 8 experts top-2 plus a shared expert
      after one dense layer, sigmoid routing with DeepSeek-V3's bias; about 30M parameters, 20M active.
    - `dense-30m`: the same stack with dense SwiGLU FFNs and grouped-query attention.
    """
    base = ModelConfig(vocab_size=teacher.vocab_size, dim=256, n_layers=6, n_heads=4, n_kv_heads=2,
                       ffn_dim=768, max_seq_len=teacher.max_seq_len, rope=RopeConfig(theta=teacher.rope.theta),
                       tie_embeddings=True, bos_token_id=teacher.bos_token_id,
                       eos_token_id=teacher.eos_token_id, norm_eps=teacher.norm_eps)  # fmt: skip
    if preset == "dense-30m":
        return base
    if preset == "mla-moe-30m":
        moe = MoEConfig(n_experts=8, top_k=2, expert_dim=256, router="sigmoid", score_correction_bias=True,
                        n_shared_experts=1, first_k_dense_replace=1)  # fmt: skip
        mla = MLAConfig(kv_lora_rank=64, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64)
        return replace(base, moe=moe, mla=mla)
    raise TrainError(f"no student preset {preset!r}; choose from {', '.join(PRESETS)}")


PRESETS = ("mla-moe-30m", "dense-30m")
