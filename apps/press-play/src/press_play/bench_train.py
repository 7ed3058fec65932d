"""The omni-train figures on SmolLM2 and Shakespeare (`just bench --suite train`):

- LoRA for a fixed wall-clock budget on a few plays: held-out-play perplexity before and after.
- Medusa-style heads on the frozen base, self-distilled on its greedy continuations for a fixed budget:
  top-1 agreement of head k (token t+k+1) with the base's greedy token, on held-out text and on the
  base's own greedy continuations of held-out prompts (what speculative decoding accepts).

Held-out plays are never trained on; the budgets are wall-clock on `threads` threads.
"""

from __future__ import annotations

import math
import statistics
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from omni_model.zoo import DEFAULT_MODEL
from press_play.bench_retrieval import plays

SECTION = "train"
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class TrainBenchConfig:
    model: str = DEFAULT_MODEL
    train_plays: tuple[str, ...] = ("hamlet", "othello", "lear", "romeo_and_juliet")
    held_out: tuple[str, ...] = ("macbeth", "tempest", "twelfth_night")
    eval_tokens: int = 8192  # per held-out play: its first tokens, in seq_len windows
    seq_len: int = 256
    lora_minutes: float = 10.0
    lora_rank: int = 8
    lora_batch: int = 4
    lora_lr: float = 1e-3
    heads_minutes: float = 10.0
    n_heads: int = 3
    heads_batch: int = 8
    heads_lr: float = 1e-3
    prompts: int = 256
    prompt_len: int = 32
    new_tokens: int = 96
    held_prompts: int = 32
    threads: int = 2
    quick: bool = False

    @classmethod
    def quick_config(cls, **overrides: Any) -> TrainBenchConfig:
        """Seconds, not minutes, and a few hundred tokens: for tests and a smoke run, not for numbers."""
        return cls(**{"train_plays": ("hamlet",), "held_out": ("macbeth",), "eval_tokens": 128, "seq_len": 32,
                      "lora_minutes": 0.05, "lora_batch": 2, "heads_minutes": 0.05, "heads_batch": 2, "prompts": 4,
                      "prompt_len": 8, "new_tokens": 8, "held_prompts": 2, "quick": True, **overrides})  # fmt: skip


@dataclass
class TrainReport:
    config: TrainBenchConfig
    machine: dict[str, Any]
    tokens: dict[str, int] = field(default_factory=dict)
    lora: dict[str, Any] = field(default_factory=dict)
    heads: dict[str, Any] = field(default_factory=dict)


def _ppl(model, tokens: np.ndarray, seq_len: int) -> float:
    from omni_train.data import val_batches
    from omni_train.loop import perplexity

    model.eval()
    return perplexity(model, val_batches(tokens, seq_len, 4))["val_ppl"]


def _held_tokens(lm, config: TrainBenchConfig, paths: dict[str, Path]) -> dict[str, np.ndarray]:
    return {n: np.asarray(lm.tokenizer.encode(paths[n].read_text(encoding="utf-8"))[: config.eval_tokens + 1],
                          np.int64) for n in config.held_out}  # fmt: skip


def run_train_bench(config: TrainBenchConfig, on_progress: Progress | None = None) -> TrainReport:
    import torch

    from omni_train import TrainConfig
    from omni_train import run as recipes
    from omni_train.heads import HeadsConfig, greedy_continuations, head_accuracy, sample_prompts
    from omni_train.lora import LoRAConfig
    from press_play.bench import machine_info

    report = on_progress or (lambda what, done, total: None)
    torch.set_num_threads(config.threads)
    rep = TrainReport(config, machine_info(config.threads))
    paths = plays()
    missing = [n for n in (*config.train_plays, *config.held_out) if n not in paths]
    if missing:
        raise ValueError(f"no play named {', '.join(missing)} in the corpus")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # ---- LoRA
        report("LoRA: before", 0, 4)
        lm = recipes.load_base(config.model)
        held = _held_tokens(lm, config, paths)
        data = recipes.dataset([paths[n] for n in config.train_plays], lm, tmp / "data")
        rep.tokens = {"train": int(data.train.size), "validation": int(data.val.size),
                      "held_out": sum(int(t.size - 1) for t in held.values())}  # fmt: skip
        before = {n: _ppl(lm.model, t, config.seq_len) for n, t in held.items()}
        cfg = TrainConfig(seq_len=config.seq_len, batch_size=config.lora_batch, lr=config.lora_lr,
                          min_lr=config.lora_lr / 10, warmup=5, budget_s=60 * config.lora_minutes,
                          eval_every=10**9, eval_batches=4)  # fmt: skip
        lcfg = LoRAConfig(rank=config.lora_rank, alpha=2.0 * config.lora_rank)

        def lora_progress(e) -> None:
            if e.kind == "step":
                report("LoRA: training", e.step, e.steps)

        r = recipes.lora(lm, data, cfg, tmp / "lora", lcfg, on_event=lora_progress)
        report("LoRA: after", 2, 4)
        after = {n: _ppl(lm.model, t, config.seq_len) for n, t in held.items()}
        params = sum(p.numel() for p in lm.model.parameters() if p.requires_grad)
        rep.lora = {"steps": r.steps, "tokens": r.tokens, "elapsed_s": r.elapsed_s, "stopped": r.stopped,
                    "params": params, "config": asdict(lcfg), "before": before, "after": after,
                    "before_all": _pooled(before, held), "after_all": _pooled(after, held)}  # fmt: skip
        del lm
        # ---- heads
        report("heads: greedy continuations", 2, 4)
        lm = recipes.load_base(config.model)
        hcfg = HeadsConfig(n_heads=config.n_heads)
        cfg = TrainConfig(seq_len=config.seq_len // 2, batch_size=config.heads_batch, lr=config.heads_lr,
                          min_lr=config.heads_lr / 10, warmup=5, budget_s=60 * config.heads_minutes,
                          eval_every=10**9, eval_batches=2)  # fmt: skip

        def heads_progress(e) -> None:
            if e.kind == "step":
                report("heads: training", e.step, e.steps)

        r = recipes.heads(lm, data, cfg, tmp / "heads", hcfg, prompts=config.prompts, prompt_len=config.prompt_len,
                          new_tokens=config.new_tokens, on_event=heads_progress)  # fmt: skip
        from omni_train.heads import load_heads

        heads = load_heads(tmp / "heads" / "heads", lm.model)
        report("heads: held-out accuracy", 3, 4)
        text = np.concatenate([t for t in held.values()])
        on_text = head_accuracy(lm.model, heads, text, config.seq_len // 2, 4)
        prompts = sample_prompts(text, config.held_prompts, config.prompt_len, seed=1)
        stream = greedy_continuations(lm.model, prompts, config.new_tokens, batch_size=32)
        on_greedy = head_accuracy(lm.model, heads, stream, config.seq_len // 2, 4)
        rep.heads = {"steps": r.steps, "tokens": r.tokens, "elapsed_s": r.elapsed_s, "stopped": r.stopped,
                     "params": sum(p.numel() for p in heads.parameters()), "config": asdict(hcfg),
                     "train_stream": int(np.load(tmp / "heads" / "continuations.npy").size),
                     "text": on_text, "greedy": on_greedy, "greedy_tokens": int(stream.size)}  # fmt: skip
    report("done", 4, 4)
    return rep


def _pooled(ppl: dict[str, float], held: dict[str, np.ndarray]) -> float:
    """Token-weighted perplexity over the plays."""
    n = {k: v.size - 1 for k, v in held.items()}
    return math.exp(sum(n[k] * math.log(ppl[k]) for k in ppl) / sum(n.values()))


def render_train_section(rep: TrainReport) -> str:
    c, m, t, lo, h = rep.config, rep.machine, rep.tokens, rep.lora, rep.heads
    lines = [
        f"<!-- bench:{SECTION}:start -->",
        "## omni-train on SmolLM2 and Shakespeare: LoRA and Medusa-style heads",
        "",
        f"- Machine: {m['cpu']}, {m['cores']} cores; {c.threads} threads; Python {m['python']}; torch {m['torch']}; "
        f"{m['date']}",
        "- Command: `just bench --suite train` (= `uv run python -m press_play.bench --suite train`)"
        + (" — QUICK smoke run, not figures" if c.quick else ""),
        f"- Training text: {', '.join(c.train_plays)} ({t['train']:,} tokens, {t['validation']:,} of them held for "
        f"the loop's validation by document). Held out, never trained on: {', '.join(c.held_out)}, the first "
        f"{c.eval_tokens:,} tokens of each ({t['held_out']:,} in all), in {c.seq_len}-token windows.",
        "",
        f"### LoRA: {c.lora_minutes:g} minutes on {len(c.train_plays)} plays",
        "",
        f"Rank {lo['config']['rank']}, alpha {lo['config']['alpha']:g} on {', '.join(lo['config']['targets'][:7])} "
        f"({lo['params']:,} trainable parameters); AdamW lr {c.lora_lr:g}, {c.lora_batch} x {c.seq_len} tokens per "
        f"step: {lo['steps']} steps, {lo['tokens']:,} tokens in {lo['elapsed_s'] / 60:.1f} min (stopped: {lo['stopped']}).",
        "",
        "| held-out play | perplexity, SmolLM2 | after LoRA | change |",
        "|---|---:|---:|---:|",
    ]
    for n in c.held_out:
        b, a = lo["before"][n], lo["after"][n]
        lines.append(f"| {n} | {b:.2f} | {a:.2f} | {100 * (a / b - 1):+.1f}% |")
    b, a = lo["before_all"], lo["after_all"]
    lines += [f"| all | {b:.2f} | {a:.2f} | {100 * (a / b - 1):+.1f}% |", ""]
    lines += [
        f"### MTP heads (Medusa-style) on the frozen base: {c.heads_minutes:g} minutes",
        "",
        f"{c.n_heads} heads, one residual block each on the final hidden state, sharing the frozen lm_head "
        f"({h['params']:,} parameters). Trained on the base's greedy continuations ({c.prompts} prompts of "
        f"{c.prompt_len} tokens from the training plays, {c.new_tokens} new tokens each: {h['train_stream']:,} "
        f"tokens), targets the base's own greedy tokens: {h['steps']} steps, {h['tokens']:,} tokens in "
        f"{h['elapsed_s'] / 60:.1f} min (stopped: {h['stopped']}). Head k proposes token t+k+1 (the base "
        "itself gives t+1); agreement = its top-1 equals the base's greedy token there, which is what "
        "greedy speculative decoding accepts.",
        "",
        "| head | predicts | agrees with the base, held-out text | agrees, base's greedy continuations of held-out prompts | equals the text's token |",
        "|---|---|---:|---:|---:|",
    ]  # fmt: skip
    for k in range(1, c.n_heads + 1):
        lines.append(f"| {k} | t+{k + 1} | {h['text'][f'head{k}_acc']:.1%} | {h['greedy'][f'head{k}_acc']:.1%} | "
                     f"{h['text'][f'head{k}_acc_text']:.1%} |")  # fmt: skip
    if "mean_accepted" in h["greedy"]:
        lines += ["", f"Mean run of accepted drafts from head 1 on the greedy continuations "
                      f"({h['greedy_tokens']:,} tokens): {h['greedy']['mean_accepted']:.2f} tokens per step "
                      "(measured on the stream, not in a decoding loop). DeepSeek-V3 reports 85-90% acceptance of "
                      "its second token at frontier scale."]  # fmt: skip
    lines += ["", f"<!-- bench:{SECTION}:end -->", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------ distillation

DISTILL_SECTION = "train-distill"
DISTILL_TARGET = 15.0  # % lower held-out perplexity than from scratch


@dataclass(frozen=True)
class DistillBenchConfig:
    model: str = DEFAULT_MODEL  # the teacher
    student: str = "mla-moe-30m"
    train_plays: tuple[str, ...] = ("hamlet", "othello", "lear", "romeo_and_juliet", "as_you_like_it",
                                    "merchant_of_venice")  # fmt: skip
    held_out: tuple[str, ...] = ("macbeth", "tempest", "twelfth_night")
    eval_tokens: int = 8192
    minutes: float = 30.0  # each student's wall clock, one thread each, both at once (the example)
    seq_len: int = 256
    batch_size: int = 8
    lr: float = 2e-3
    cache_k: int = 32
    temperature: float = 1.0  # T = 2 needs a second softmax over the vocabulary: 20% fewer steps
    alpha: float = 0.5  # 0.9 trailed training from scratch on short budgets
    inherit: bool = True  # the distilled student's embedding starts from the teacher's (inherit_embeddings)
    threads: int = 2  # the teacher cache and the evaluations; each student gets one
    cache_dir: str | None = None  # datasets and the teacher cache; None: the omnicoder cache
    quick: bool = False

    @classmethod
    def quick_config(cls, **overrides: Any) -> DistillBenchConfig:
        return cls(**{"student": "dense-30m", "train_plays": ("hamlet",), "held_out": ("macbeth",),
                      "eval_tokens": 128, "minutes": 0.1, "seq_len": 32, "batch_size": 2, "cache_k": 4,
                      "quick": True, **overrides})  # fmt: skip


@dataclass
class DistillReport:
    config: DistillBenchConfig
    machine: dict[str, Any]
    tokens: dict[str, int] = field(default_factory=dict)
    cache: dict[str, Any] = field(default_factory=dict)
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)  # distill / scratch -> figures
    ppl: dict[str, dict[str, float]] = field(
        default_factory=dict
    )  # teacher / distill / scratch -> play -> ppl


def run_distill_bench(config: DistillBenchConfig, on_progress: Progress | None = None) -> DistillReport:
    import json
    import subprocess
    import sys
    import time

    import torch

    import omni_model
    from omni_model.corpus import default_cache_dir
    from omni_train import run as recipes
    from press_play.bench import machine_info

    report = on_progress or (lambda what, done, total: None)
    torch.set_num_threads(config.threads)
    rep = DistillReport(config, machine_info(config.threads))
    paths = plays()
    missing = [n for n in (*config.train_plays, *config.held_out) if n not in paths]
    if missing:
        raise ValueError(f"no play named {', '.join(missing)} in the corpus")
    cache = Path(config.cache_dir) if config.cache_dir else default_cache_dir().parent / "bench" / "train"
    teacher = recipes.load_base(config.model)
    held = _held_tokens(teacher, config, paths)  # type: ignore[arg-type]
    data_args = [a for n in config.train_plays for a in ("--data", str(paths[n]))]
    data = recipes.dataset([paths[n] for n in config.train_plays], teacher, cache)
    rep.tokens = {"train": int(data.train.size), "validation": int(data.val.size),
                  "held_out": sum(int(t.size - 1) for t in held.values())}  # fmt: skip
    t0 = time.perf_counter()
    tc = recipes.teacher_cache(teacher, data, config.seq_len, config.cache_k, config.temperature,
                               on_progress=lambda what, d, t: report(f"teacher top-{config.cache_k} logits", d, t))  # fmt: skip
    rep.cache = {"s": time.perf_counter() - t0, "windows": tc.meta["windows"], "k": config.cache_k,
                 "bytes": sum(f.stat().st_size for f in tc.folder.iterdir())}  # fmt: skip
    report("students (both at once, one thread each)", 0, 1)
    common = ["--data-cache", str(cache), "--budget-minutes", str(config.minutes), "--seq-len", str(config.seq_len),
              "--batch-size", str(config.batch_size), "--lr", str(config.lr), "--student", config.student,
              "--eval-every", str(10**6), *data_args]  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cli = [sys.executable, "-m", "press_play.cli", "--threads", "1", "train"]
        cmds = {
            "distill": [*cli, "distill", "--teacher", config.model, "--out", str(tmp / "distill"), "--cache-teacher",
                        str(config.cache_k), "--temperature", str(config.temperature), "--alpha", str(config.alpha),
                        "--inherit-embeddings" if config.inherit else "--random-embeddings", *common],
            "scratch": [*cli, "pretrain", "--tokenizer-of", config.model, "--out", str(tmp / "scratch"), *common],
        }  # fmt: skip
        procs = {
            k: subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for k, c in cmds.items()
        }
        for name, p in procs.items():
            _, err = p.communicate()
            if p.returncode != 0:
                raise RuntimeError(f"{name}: {' '.join(cmds[name][2:])} failed: {err.strip()[-400:]}")
        report("held-out perplexity", 0, 1)
        rep.ppl["teacher"] = {n: _ppl(teacher.model, t, config.seq_len) for n, t in held.items()}
        del teacher
        for name in cmds:
            rows = [json.loads(r) for r in (tmp / name / "metrics.jsonl").read_text().splitlines()]
            steps = [r for r in rows if "loss" in r]
            plan = json.loads((tmp / name / "plan.json").read_text())["plan"]
            rep.runs[name] = {"steps": steps[-1]["step"], "tokens": steps[-1]["tokens"],
                              "elapsed_s": steps[-1]["elapsed_s"], "planned": plan["steps"],
                              "tok_s": statistics.median(r["tok_s"] for r in steps),
                              "val_ppl": rows[-1].get("val_ppl")}  # fmt: skip
            model = omni_model.load(tmp / name / "model", fuse=False).model
            rep.ppl[name] = {n: _ppl(model, t, config.seq_len) for n, t in held.items()}
        rep.ppl = {k: {**v, "all": _pooled(v, held)} for k, v in rep.ppl.items()}
    report("done", 1, 1)
    return rep


def render_distill_section(rep: DistillReport) -> str:
    c, m, t = rep.config, rep.machine, rep.tokens
    gain = 100 * (1 - rep.ppl["distill"]["all"] / rep.ppl["scratch"]["all"])
    lines = [
        f"<!-- bench:{DISTILL_SECTION}:start -->",
        "## omni-train: distillation versus training from scratch, equal wall-clock",
        "",
        f"- Machine: {m['cpu']}, {m['cores']} cores; Python {m['python']}; torch {m['torch']}; {m['date']}",
        "- Command: `just bench --suite distill` (= `uv run python -m press_play.bench --suite distill`)"
        + (" — QUICK smoke run, not figures" if c.quick else ""),
        f"- Student `{c.student}` (the same seed, so the same initial weights, for both"
        + (", but for the distilled one's token embedding, see below" if c.inherit else "")
        + f"), teacher {c.model}. "
        f"Training text: {', '.join(c.train_plays)} ({t['train']:,} tokens; {t['validation']:,} more held for the "
        f"loop's validation by document). Held out: {', '.join(c.held_out)}, the first {c.eval_tokens:,} tokens of "
        f"each ({t['held_out']:,}), in {c.seq_len}-token windows.",
        f"- Both students ran at the same time, each on one thread, for {c.minutes:g} minutes of wall clock; "
        f"AdamW lr {c.lr:g}, warmup then cosine over the planned steps, {c.batch_size} x {c.seq_len} tokens per step.",
        f"- Distillation: KL on logits softened by T = {c.temperature:g} (weight {c.alpha:g}) + cross-entropy on the "
        f"text, against the teacher's top-{c.cache_k} logits of every training window, computed once before "
        f"training: {rep.cache['windows']:,} windows "
        + (
            f"in {rep.cache['s'] / 60:.1f} min on {c.threads} threads"
            if rep.cache["s"] >= 5
            else "(found already computed by an earlier run, checked against the teacher and the tokens)"
        )
        + f", {rep.cache['bytes'] / 1e6:.0f} MB on disk, reused by every later run and epoch (not counted in the "
        "student's budget)."
        + (
            " The distilled student's token embedding (tied to its head) starts as the teacher's, projected on its "
            "top principal directions to the student's width (`omni_train.recipes.inherit_embeddings`); the rest "
            "of its weights are the scratch student's."
            if c.inherit
            else ""
        ),
        "",
        "| student | steps | tokens | tokens/s | " + " | ".join(c.held_out) + " | held-out perplexity |",
        "|---|---:|---:|---:|" + "---:|" * len(c.held_out) + "---:|",
    ]
    for name, label in (("scratch", "from scratch"), ("distill", "distilled")):
        r, p = rep.runs[name], rep.ppl[name]
        lines.append(f"| {label} | {r['steps']} | {r['tokens']:,} | {r['tok_s']:,.0f} | "
                     + " | ".join(f"{p[n]:.1f}" for n in c.held_out) + f" | {p['all']:.1f} |")  # fmt: skip
    p = rep.ppl["teacher"]
    lines.append(
        f"| teacher ({c.model}) | | | | "
        + " | ".join(f"{p[n]:.1f}" for n in c.held_out)
        + f" | {p['all']:.1f} |"
    )
    met = "met" if gain >= DISTILL_TARGET else "not met"
    lines += ["", f"Distilled perplexity {gain:.1f}% lower than from scratch (target >= {DISTILL_TARGET:g}%: {met}).",
              "", f"<!-- bench:{DISTILL_SECTION}:end -->", ""]  # fmt: skip
    return "\n".join(lines)
