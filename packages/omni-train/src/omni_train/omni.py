"""An any-to-any OmniCoder model trained end to end on the digit world, in a wall-clock budget.

The model is an MLA + MoE `omni_model.Decoder` over `omni_data`'s layout, with three small encoders
(`omni_media.encoders`) trained with it; the media tokenizers that write its outputs (image tokenizer,
codec, keyframe interpolator) are trained first and frozen. `train_omni` draws one task per step
(weighted), scores the answer tokens, and follows a warmup + cosine schedule over the time budget
rather than a step count, so a run ends when its budget does whatever the machine's speed. It
checkpoints every few minutes and resumes from the last checkpoint after an interruption.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from omni_model.config import MLAConfig, ModelConfig
from omni_model.decoder import Decoder
from omni_moe import MoEConfig
from omni_train.errors import TrainError
from omni_train.omni_data import TASKS, WORDS, Batch, WorldData, make_batch, media_vocab, task_size


@dataclass(frozen=True)
class OmniConfig:
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    kv_lora_rank: int = 64
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    n_experts: int = 4
    top_k: int = 2
    expert_dim: int = 256
    n_shared_experts: int = 1
    first_k_dense: int = 1
    image_grid: int = 2  # the image encoder's g x g embeddings per image or frame
    encoder_width: int = 32
    speech_width: int = 128

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if f.name == "first_k_dense" else 1):
                raise TrainError(f"OmniConfig.{f.name} must be a positive integer, got {v!r}")

    def model_config(self) -> ModelConfig:
        vocab = media_vocab()
        return ModelConfig(
            vocab_size=vocab.size, dim=self.dim, n_layers=self.n_layers, n_heads=self.n_heads,
            n_kv_heads=self.n_heads, ffn_dim=2 * self.dim, max_seq_len=1024, tie_embeddings=True,
            mla=MLAConfig(self.kv_lora_rank, self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim),
            moe=MoEConfig(n_experts=self.n_experts, top_k=self.top_k, expert_dim=self.expert_dim,
                          n_shared_experts=self.n_shared_experts, first_k_dense_replace=self.first_k_dense,
                          router="sigmoid", score_correction_bias=True),
            eos_token_id=WORDS.index("<|end|>"),
        )  # fmt: skip


class OmniModel(nn.Module):
    """The decoder and the encoders whose features fill its placeholder spans."""

    def __init__(self, config: OmniConfig):
        from omni_media.encoders import ClipEncoder, ImageEncoder, SpeechEncoder

        super().__init__()
        self.config, self.vocab = config, media_vocab()
        self.decoder = Decoder(config.model_config())
        self.image = ImageEncoder(config.dim, config.encoder_width, config.image_grid)
        self.video = ClipEncoder(config.dim, config.encoder_width, config.image_grid)
        self.speech = SpeechEncoder(config.dim, config.speech_width)

    @property
    def n_image_tokens(self) -> int:
        return self.image.n_tokens

    def encoders(self) -> dict[str, nn.Module]:
        return {"image": self.image, "video": self.video, "audio": self.speech}

    def embed(self, ids: Tensor, media: dict[str, Tensor]) -> Tensor:
        """(B, T) ids -> (B, T, D) embeddings, each modality's placeholders replaced (in order) by its
        encoder's features of media[modality] (one input per row)."""
        x = self.decoder.embed_tokens(ids)
        for m, inputs in media.items():
            f = self.encoders()[m](inputs)  # (B, n, D)
            mask = ids == self.vocab.marker(m, "pad")
            if int(mask.sum()) != f.shape[0] * f.shape[1]:
                raise TrainError(
                    f"{m}: {int(mask.sum())} placeholders for {f.shape[0]} x {f.shape[1]} features"
                )
            x = x.masked_scatter(mask.unsqueeze(-1), f.to(x.dtype))
        return x

    def forward(self, ids: Tensor, media: dict[str, Tensor]) -> Tensor:
        return self.decoder.logits(self.decoder.hidden_states(ids, embeds=self.embed(ids, media)))


# ---------------------------------------------------------------------------------------------------- training


@dataclass(frozen=True)
class OmniTrainConfig:
    budget_s: float = 3600.0  # wall clock of the decoder's training, resumes included
    lr: float = 2e-3
    min_lr: float = 1e-4
    warmup_s: float = 60.0
    weight_decay: float = 0.05
    tokens_per_batch: int = 4096  # sequences per batch: this over the task's sequence length
    max_batch: int = 64
    balance_rate: float = 1e-3  # the MoE routers' bias update per step (auxiliary-loss-free)
    task_weights: tuple[tuple[str, float], ...] = (
        ("image_to_text", 1.0), ("speech_to_text", 1.5), ("video_to_text", 1.5),
        ("text_to_image", 2.0), ("text_to_speech", 2.0), ("text_to_video", 2.0),
    )  # fmt: skip
    drop_condition: float = 0.1  # generation prompts trained without their condition (for guidance)
    checkpoint_every_s: float = 300.0
    max_steps: int | None = None  # stop earlier than the budget (and schedule over the steps)
    log_every: int = 100  # steps between lines of metrics.jsonl
    seed: int = 0

    def __post_init__(self) -> None:
        if not (self.budget_s > 0 and 0 < self.min_lr <= self.lr and self.warmup_s >= 0):
            raise TrainError("need budget_s > 0, 0 < min_lr <= lr and warmup_s >= 0")
        if not 0 <= self.drop_condition < 1:
            raise TrainError(f"drop_condition must be in [0, 1), got {self.drop_condition}")
        if self.log_every < 1:
            raise TrainError(f"log_every must be >= 1, got {self.log_every}")
        if self.max_steps is not None and self.max_steps < 1:
            raise TrainError(f"max_steps must be >= 1, got {self.max_steps}")
        names = [t for t, _ in self.task_weights]
        if sorted(names) != sorted(TASKS) or any(w < 0 for _, w in self.task_weights):
            raise TrainError(f"task_weights must give each of {TASKS} a weight >= 0")

    def lr_at(self, elapsed_s: float, step: int = 0) -> float:
        """Warmup for warmup_s, then cosine to min_lr at the end of the budget (or of max_steps, when
        that comes first: the schedule follows whichever is further along)."""
        if elapsed_s < self.warmup_s:
            return self.lr * max(elapsed_s, 1.0) / max(self.warmup_s, 1.0)
        frac = min(1.0, (elapsed_s - self.warmup_s) / max(1.0, self.budget_s - self.warmup_s))
        if self.max_steps is not None:
            frac = max(frac, step / self.max_steps)
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1 + math.cos(math.pi * frac))


@dataclass
class OmniEvent:
    kind: str  # step, checkpoint, done
    step: int
    elapsed_s: float
    budget_s: float
    data: dict[str, Any] = field(default_factory=dict)


def sequence_length(task: str, model: OmniModel, data: WorldData) -> int:
    rng = np.random.default_rng(0)
    return make_batch(task, data, np.zeros(1, np.int64), model.vocab, rng, model.n_image_tokens).ids.shape[1]


def loss_of(model: OmniModel, batch: Batch) -> Tensor:
    logits = model(batch.ids, batch.media)
    return F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), ignore_index=-100)


def train_omni(model: OmniModel, data: WorldData, config: OmniTrainConfig, work: Path | None = None,
               on_event: Callable[[OmniEvent], None] | None = None) -> dict[str, Any]:  # fmt: skip
    """Train `model` on `data` for `config.budget_s` seconds of wall clock. With `work`, a checkpoint
    is kept there (every `checkpoint_every_s` and at the end), a run that finds one resumes it, and
    `metrics.jsonl` gets each task's recent loss every `log_every` steps."""
    from omni_moe import MoELayer
    from omni_moe.balance import update_bias
    from omni_train.checkpoint import load_checkpoint, read_state, save_checkpoint

    emit = on_event or (lambda e: None)
    names = {id(p): n for n, p in model.named_parameters()}
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=config.lr, betas=(0.9, 0.95))  # fmt: skip
    tasks = [t for t, w in config.task_weights if w > 0]
    weights = np.array([w for t, w in config.task_weights if w > 0])
    batch_of = {t: max(1, min(config.max_batch, config.tokens_per_batch // sequence_length(t, model, data)))
                for t in tasks}  # fmt: skip
    step, spent, tokens = 0, 0.0, 0
    ckpt = None if work is None else Path(work) / "checkpoint"
    # What a checkpoint must match to be resumed: the model and what shapes the data and the updates.
    # The budget and the bookkeeping may change (a resumed command has less time left after its setup).
    clock = ("budget_s", "warmup_s", "checkpoint_every_s", "log_every", "max_steps")
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k not in clock}
    identity = {"model": dataclasses.asdict(model.config), "train": json.loads(json.dumps(settings))}
    if ckpt is not None and (ckpt / "state.json").is_file():
        state = read_state(ckpt)
        if state.get("identity") != identity:
            raise TrainError(
                f"{ckpt}: a checkpoint of another run (model or settings differ); remove it to restart"
            )
        load_checkpoint(ckpt, model, opt, names)
        step, spent, tokens = int(state["step"]), float(state["elapsed_s"]), int(state["tokens"])

    def state(elapsed_s: float) -> dict[str, Any]:
        return {"identity": identity, "step": step, "tokens": tokens, "elapsed_s": elapsed_s,
                "plan": {"batch_sizes": batch_of}, "data": {"sizes": {t: task_size(t, data) for t in tasks}}}  # fmt: skip

    rng = np.random.default_rng([config.seed, step])  # a resumed run draws fresh batches, reproducibly
    moe = [m for m in model.modules() if isinstance(m, MoELayer)]
    losses: dict[str, list[float]] = {t: [] for t in tasks}
    model.train()
    if work is not None:
        Path(work).mkdir(parents=True, exist_ok=True)
    t0, last_save = time.monotonic() - spent, time.monotonic()
    while (elapsed := time.monotonic() - t0) < config.budget_s and step < (config.max_steps or step + 1):
        task = tasks[int(rng.choice(len(tasks), p=weights / weights.sum()))]
        rows = rng.integers(0, task_size(task, data), batch_of[task])
        batch = make_batch(task, data, rows, model.vocab, rng, model.n_image_tokens,
                           drop_condition=config.drop_condition)  # fmt: skip
        for g in opt.param_groups:
            g["lr"] = config.lr_at(elapsed, step)
        loss = loss_of(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if config.balance_rate > 0:
            for m in moe:
                if m.gate.e_score_correction_bias is not None:
                    update_bias(m.gate.e_score_correction_bias, m.last_counts, config.balance_rate)
        step += 1
        tokens += int((batch.ids != WORDS.index("<|pad|>")).sum())
        losses[task].append(float(loss.detach()))
        emit(OmniEvent("step", step, elapsed, config.budget_s, {"task": task, "loss": losses[task][-1]}))
        if work is not None and step % config.log_every == 0:  # each task's recent mean loss
            line = {"step": step, "elapsed_s": round(elapsed, 1), "tokens": tokens,
                    "loss": {t: round(float(np.mean(v[-20:])), 4) for t, v in losses.items() if v}}  # fmt: skip
            with open(Path(work) / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(line) + "\n")
        if ckpt is not None and time.monotonic() - last_save >= config.checkpoint_every_s:
            save_checkpoint(ckpt, model, opt, names, state(time.monotonic() - t0))
            last_save = time.monotonic()
            emit(OmniEvent("checkpoint", step, time.monotonic() - t0, config.budget_s))
    elapsed = time.monotonic() - t0
    if ckpt is not None:
        save_checkpoint(ckpt, model, opt, names, state(elapsed))
    model.eval()
    final = {t: float(np.mean(v[-20:])) for t, v in losses.items() if v}
    emit(OmniEvent("done", step, elapsed, config.budget_s, {"loss": final}))
    return {"steps": step, "tokens": tokens, "elapsed_s": elapsed, "final_loss": final,
            "batch_sizes": batch_of}  # fmt: skip
