"""The training loop: AdamW with warmup and cosine decay, gradient accumulation and clipping, optional
bfloat16 autocast, a wall-clock budget, checkpoints that resume bit-for-bit, JSON-lines metrics, periodic
validation, and data parallelism when started by torchrun.

What is trained and how the loss is formed is an `Objective` (recipes.py: language modelling,
distillation, MTP heads); the loop only runs it. Progress goes to a callback, never to stdout.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from omni_train.checkpoint import load_checkpoint, read_state, save_checkpoint
from omni_train.data import Batches, val_batches
from omni_train.errors import TrainError

Batch = tuple[Tensor, Tensor]


@dataclass(frozen=True)
class TrainConfig:
    seq_len: int = 256
    batch_size: int = 8  # sequences per process per micro-step
    grad_accum: int = 1  # micro-steps per optimizer step
    lr: float = 1e-3
    min_lr: float = 1e-4  # where the cosine ends
    warmup: int = 20  # steps of linear warmup
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    clip: float = 1.0  # max gradient norm; 0: off
    steps: int | None = None  # None: as many as the budget allows
    budget_s: float | None = None  # wall-clock budget of the whole run, resumes included
    eval_every: int = 100  # steps
    eval_batches: int = 16
    save_every_s: float = 600.0
    bf16: bool = False  # bfloat16 autocast for the forward pass (CPU)
    balance_rate: float = 1e-3  # MoE auxiliary-loss-free bias update per step; 0: off
    seed: int = 0

    def __post_init__(self) -> None:
        if self.budget_s is not None and not self.budget_s > 0:
            raise TrainError(f"the time budget must be positive, got {self.budget_s} s")
        if self.steps is None and self.budget_s is None:
            raise TrainError("give a number of steps or a time budget")
        if self.steps is not None and self.steps < 1:
            raise TrainError(f"steps must be >= 1, got {self.steps}")
        for name in ("seq_len", "batch_size", "grad_accum", "eval_every", "eval_batches"):
            if getattr(self, name) < 1:
                raise TrainError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (self.lr > 0 and 0 <= self.min_lr <= self.lr):
            raise TrainError(f"need 0 < lr and 0 <= min_lr <= lr, got lr={self.lr}, min_lr={self.min_lr}")
        if self.warmup < 0 or self.clip < 0 or self.weight_decay < 0 or self.balance_rate < 0:
            raise TrainError("warmup, clip, weight_decay and balance_rate must be >= 0")

    def lr_at(self, step: int, total: int) -> float:
        """Linear warmup to lr, then cosine to min_lr at step `total`."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        frac = min(1.0, (step - self.warmup) / max(1, total - self.warmup))
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1 + math.cos(math.pi * frac))


class Objective(Protocol):
    """What a recipe trains: the loss of one micro-batch, and the validation figures."""

    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, float]]: ...

    def evaluate(self, model: nn.Module, batches: Iterator[Batch]) -> dict[str, float]: ...


def lm_loss(logits: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))


@torch.no_grad()
def perplexity(model: nn.Module, batches: Iterator[Batch]) -> dict[str, float]:
    nll, n = 0.0, 0
    for x, y in batches:
        logits = model(x)
        nll += float(
            F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1), reduction="sum")
        )
        n += y.numel()
    if n == 0:
        raise TrainError("no validation tokens: the validation split is shorter than one sequence")
    return {"val_loss": nll / n, "val_ppl": math.exp(nll / n), "val_tokens": n}


@dataclass
class Event:
    kind: str  # plan, step, eval, checkpoint, done
    step: int
    steps: int
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainResult:
    steps: int
    tokens: int
    elapsed_s: float
    stopped: str  # steps, budget, interrupted
    metrics: dict[str, float]
    checkpoint: Path


def _world() -> tuple[int, int]:
    return (
        (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    )


def init_distributed() -> tuple[int, int]:
    """Join the process group when started by torchrun (it sets WORLD_SIZE, RANK and the rendezvous
    address for each process); gloo, the CPU backend. Returns (rank, world); (0, 1) when alone."""
    if dist.is_available() and not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")
    return _world()


def rank() -> int:
    return _world()[0]


def barrier() -> None:
    if _world()[1] > 1:
        dist.barrier()


def _moe_layers(model: nn.Module) -> list[nn.Module]:
    from omni_moe import MoELayer

    return [m for m in model.modules() if isinstance(m, MoELayer)]


def _plan(cfg: TrainConfig, step_s: float, eval_s: float, world: int) -> dict[str, Any]:
    """Steps from the budget: each step costs step_s, plus an evaluation every eval_every steps and a
    final one; 5% of the budget is kept for checkpoints."""
    steps = cfg.steps
    if cfg.budget_s is not None:
        per = step_s + eval_s / cfg.eval_every
        fit = int((0.95 * cfg.budget_s - eval_s) / per)
        steps = max(1, fit if steps is None else min(steps, fit))
    tokens = steps * cfg.grad_accum * cfg.batch_size * cfg.seq_len * world
    return {"steps": steps, "steps_limit": cfg.steps, "tokens": tokens, "step_s": step_s, "eval_s": eval_s, "world": world,
            "expected_s": steps * step_s + eval_s * (steps // cfg.eval_every + 1), "budget_s": cfg.budget_s}  # fmt: skip


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


class _Stop:
    """SIGINT/SIGTERM set a flag; the loop finishes the step, checkpoints and returns."""

    def __init__(self) -> None:
        self.flag = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _Stop:
        try:
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._set)
        except ValueError:  # not the main thread: no handlers, the caller stops us
            pass
        return self

    def _set(self, signum: int, frame: Any) -> None:
        self.flag = True

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def train(model: nn.Module, objective: Objective, train_tokens: np.ndarray, val_tokens: np.ndarray,
          cfg: TrainConfig, out: str | Path, *, resume: bool = False, identity: dict[str, Any] | None = None,
          on_event: Callable[[Event], None] | None = None) -> TrainResult:  # fmt: skip
    """Train the parameters of `model` that require grad. `out` gets plan.json, metrics.jsonl and
    checkpoint/; `identity` (JSON: what is trained, from what) must match on resume."""
    out = Path(out)
    emit = on_event or (lambda e: None)
    rank, world = _world()
    lead = rank == 0
    ckpt = out / "checkpoint"
    identity = {"train": {k: v for k, v in asdict(cfg).items() if k not in ("steps", "budget_s")},
                "world": world, **(identity or {})}  # fmt: skip
    state: dict[str, Any] | None = None
    if resume:
        state = read_state(ckpt)
        if state.get("identity") != json.loads(json.dumps(identity)):
            raise TrainError(f"{ckpt}: a checkpoint of another run (its model, data or training config "
                             "differ from this one); start afresh without --resume or use another --out")  # fmt: skip
    torch.manual_seed(cfg.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise TrainError("the model has no trainable parameters")
    names = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    decay = [p for p in params if p.ndim >= 2]
    rest = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": rest, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), foreach=False)  # fmt: skip
    batches = Batches(train_tokens, cfg.seq_len, cfg.batch_size, seed=cfg.seed, rank=rank, world=world)
    step, tokens, elapsed = 0, 0, 0.0
    if state is not None:
        load_checkpoint(ckpt, model, opt, names)
        batches.load_state(state["data"])
        step, tokens, elapsed = state["step"], state["tokens"], float(state["elapsed_s"])
    wrapped = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        wrapped = DDP(model, find_unused_parameters=bool(_moe_layers(model)))
    moe = _moe_layers(model)

    def val() -> dict[str, float]:
        model.eval()
        try:
            with torch.autocast("cpu", torch.bfloat16, enabled=cfg.bf16):
                return objective.evaluate(model, val_batches(val_tokens, cfg.seq_len, cfg.batch_size,
                                                             limit=cfg.eval_batches))  # fmt: skip
        finally:
            model.train()

    def micro(x: Tensor, y: Tensor, sync: bool) -> tuple[float, dict[str, float]]:
        ctx = wrapped.no_sync() if world > 1 and not sync else contextlib.nullcontext()
        with ctx:
            with torch.autocast("cpu", torch.bfloat16, enabled=cfg.bf16):
                loss, info = objective.loss(wrapped, x, y)
            (loss / cfg.grad_accum).backward()
        return float(loss.detach()), info

    model.train()
    if state is not None:
        plan = state["plan"]
        if (plan.get("steps_limit"), plan.get("budget_s")) != (cfg.steps, cfg.budget_s):
            # a longer (or shorter) run asked for on resume: the schedule is re-planned from the timings
            plan = _plan(cfg, plan["step_s"], plan["eval_s"], world)
            if lead:
                _write_json(out / "plan.json", {"plan": plan, "config": asdict(cfg), "identity": identity})
    else:  # plan: time one step (its gradients thrown away, the data position and RNG untouched)
        rng = torch.get_rng_state()
        probe = Batches(train_tokens, cfg.seq_len, cfg.batch_size, seed=cfg.seed, rank=rank, world=world)
        if hasattr(objective, "bind_batches"):
            objective.bind_batches(probe)
        it = iter(probe)
        t0 = time.perf_counter()
        micro(*next(it), sync=True)
        t1 = time.perf_counter()
        micro(*next(it), sync=True)
        step_s = (time.perf_counter() - t1 + (t1 - t0)) / 2 * cfg.grad_accum
        opt.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        if lead:
            with torch.no_grad():
                objective.evaluate(
                    model.eval(), val_batches(val_tokens, cfg.seq_len, cfg.batch_size, limit=1)
                )
            model.train()
        eval_s = (time.perf_counter() - t0) * cfg.eval_batches
        torch.set_rng_state(rng)
        plan = _plan(cfg, step_s, eval_s, world)
        if world > 1:  # every rank runs the plan of rank 0
            box = [plan]
            dist.broadcast_object_list(box, src=0)
            plan = box[0]
        if lead:
            out.mkdir(parents=True, exist_ok=True)
            _write_json(out / "plan.json", {"plan": plan, "config": asdict(cfg), "identity": identity})
    if hasattr(objective, "bind_batches"):  # an objective with per-window sidecars (cached teacher logits)
        objective.bind_batches(batches)
    total = plan["steps"]
    emit(Event("plan", step, total, plan))
    metrics_path = out / "metrics.jsonl"
    if lead:
        out.mkdir(parents=True, exist_ok=True)
        if state is not None and metrics_path.exists():  # drop rows past the checkpoint
            rows = [
                r for r in metrics_path.read_text().splitlines() if r and json.loads(r).get("step", 0) <= step
            ]
            metrics_path.write_text("".join(r + "\n" for r in rows))
    log = metrics_path.open("a") if lead else None

    def record(row: dict[str, Any]) -> None:
        if log is not None:
            log.write(json.dumps(row) + "\n")
            log.flush()

    def checkpoint() -> None:
        if lead:
            save_checkpoint(ckpt, model, opt, names, {"step": step, "tokens": tokens, "elapsed_s": elapsed,
                            "plan": plan, "data": batches.state(), "identity": identity, "metrics": last})  # fmt: skip
            emit(Event("checkpoint", step, total, {"path": str(ckpt)}))
        if world > 1:
            dist.barrier()

    last: dict[str, float] = {}
    stopped = "steps"
    start = time.perf_counter() - elapsed
    saved = time.perf_counter()
    it = iter(batches)
    per_step = cfg.grad_accum * cfg.batch_size * cfg.seq_len * world
    with _Stop() as stop:
        while step < total:
            lr = cfg.lr_at(step, total)
            for g in opt.param_groups:
                g["lr"] = lr
            t0 = time.perf_counter()
            losses, info = [], {}
            counts = [torch.zeros_like(m.last_counts) for m in moe]
            for a in range(cfg.grad_accum):
                loss, info = micro(*next(it), sync=a == cfg.grad_accum - 1)
                losses.append(loss)
                for c, m in zip(counts, moe, strict=True):
                    c += m.last_counts
            if world > 1:
                for c in counts:
                    dist.all_reduce(c)
            norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip) if cfg.clip > 0 else None
            opt.step()
            opt.zero_grad(set_to_none=True)
            if cfg.balance_rate > 0:
                from omni_moe.balance import update_bias

                for c, m in zip(counts, moe, strict=True):
                    if m.gate.e_score_correction_bias is not None:
                        update_bias(m.gate.e_score_correction_bias, c, cfg.balance_rate)
            step += 1
            tokens += per_step
            loss = sum(losses) / len(losses)
            if world > 1:
                box = torch.tensor([loss])
                dist.all_reduce(box)
                loss = float(box) / world
            now = time.perf_counter()
            elapsed = now - start
            row = {"step": step, "loss": loss, "lr": lr, "tokens": tokens, "elapsed_s": elapsed,
                   "tok_s": per_step / (now - t0), **info}  # fmt: skip
            if norm is not None:
                row["grad_norm"] = float(norm)
            if moe:
                row["expert_load"] = [c.tolist() for c in counts]
            record(row)
            emit(Event("step", step, total, row))
            over = cfg.budget_s is not None and elapsed >= 0.95 * cfg.budget_s
            flag = torch.tensor([float(stop.flag or over)])
            if world > 1:
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if step % cfg.eval_every == 0 and step < total and not flag:
                last = val() if lead else {}
                record({"step": step, **last})
                emit(Event("eval", step, total, last))
            if flag:
                stopped = "interrupted" if stop.flag else "budget"
                break
            if now - saved >= cfg.save_every_s:
                checkpoint()
                saved = time.perf_counter()
        last = val() if lead else {}
        record({"step": step, "final": True, **last})
        emit(Event("eval", step, total, last))
        elapsed = time.perf_counter() - start
        checkpoint()
    if log is not None:
        log.close()
    result = TrainResult(step, tokens, elapsed, stopped, last, ckpt)
    emit(Event("done", step, total, {"stopped": stopped, **last}))
    return result
