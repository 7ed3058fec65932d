"""`just bench --suite moe`: an MoE layer against a dense FFN with the same active parameters.

The proof that dispatch is sparse: an `omni_moe.MoELayer` whose K chosen experts hold H hidden
units in all should cost about what a dense SwiGLU of hidden size H costs (same weights read and
FLOPs per token), not E/K times as much. Shapes are a SmolLM2-135M-sized decoder made MoE: D = 576
and H = 1536 (SmolLM2's FFN, so the dense side is its MLP), as 16 experts of 768 top-2 (Mixtral's
split) and 64 experts of 384 top-4 (fine-grained, as OLMoE and DeepSeek). Both float32, 2 threads,
`torch.inference_mode`. A call runs a stack of independent layers (own weights, same input), as a
model does: weights come from DRAM each token, code and small buffers stay cached; one layer alone
would keep the dense side's 10.6 MB in L3 and compare cache against DRAM. Dense and MoE interleave.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from omni_moe import MoEConfig, MoELayer
from press_play.bench import Progress, Stat, machine_info, markers

SECTION = "moe-dispatch"
TARGET = 1.5  # the bound on MoE time / dense-active time


@dataclass(frozen=True)
class MoECase:
    n_experts: int
    top_k: int
    expert_dim: int

    @property
    def active_dim(self) -> int:
        """Hidden units a token passes through: the dense baseline's hidden size."""
        return self.top_k * self.expert_dim

    @property
    def label(self) -> str:
        return f"{self.n_experts} experts × {self.expert_dim}, top-{self.top_k}"


@dataclass(frozen=True)
class MoEBenchConfig:
    dim: int = 576  # SmolLM2-135M's hidden size
    cases: tuple[MoECase, ...] = (MoECase(16, 2, 768), MoECase(64, 4, 384))  # 1536 active each
    tokens: tuple[int, ...] = (2048, 512, 1)  # long and short prompts, and one decoded token
    min_tokens: int = 32  # a round makes ceil(min_tokens / T) calls: a stream of decode steps
    rounds: int = 11
    threads: int = 2
    layers: int = 8  # distinct layers per call: 8 dense ones are 85 MB, past the machine's 32 MB L3
    seed: int = 0
    quick: bool = False

    def __post_init__(self) -> None:
        for name in ("dim", "min_tokens", "rounds", "threads", "layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"MoEBenchConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not self.cases or not self.tokens or min(self.tokens) < 1:
            raise ValueError("MoEBenchConfig needs at least one case and token counts >= 1")

    @classmethod
    def quick_config(cls, **overrides: Any) -> MoEBenchConfig:
        """Tiny layers, two rounds: for tests and a smoke run, not for numbers."""
        return cls(**{"dim": 64, "cases": (MoECase(16, 2, 32), MoECase(64, 4, 16)), "tokens": (64, 1),
                      "min_tokens": 4, "rounds": 2, "layers": 2, "quick": True, **overrides})  # fmt: skip


@dataclass(frozen=True)
class MoEResult:
    case: MoECase
    tokens: int  # tokens per call
    calls: int  # calls per round
    moe_ms: Stat  # per layer and call
    dense_ms: Stat
    ratio: Stat  # MoE / dense, per round (the two measured back to back)
    loads: tuple[int, ...]  # tokens per expert of the first MoE layer, over one round's calls

    @property
    def met(self) -> bool:
        return self.ratio.median <= TARGET


@dataclass
class MoEBenchReport:
    config: MoEBenchConfig
    options: str  # the command-line options that reproduce the run, each with a leading space
    machine: dict[str, Any]
    results: list[MoEResult] = field(default_factory=list)


class DenseSwiGLU(nn.Module):
    """The dense-active baseline: SwiGLU with gate and up fused in one (2H, D) matrix and the activation
    computed in place, as the experts do (inference only)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(2 * hidden, dim) * 0.02)  # (2H, D)
        self.down_proj = nn.Parameter(torch.randn(dim, hidden) * 0.02)  # (D, H)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = F.linear(x, self.gate_up_proj).chunk(2, dim=-1)  # (N, H) each
        return F.linear(F.silu(gate, inplace=True).mul_(up), self.down_proj)


# --------------------------------------------------------------------------------------- driver


def run_moe_bench(config: MoEBenchConfig, on_progress: Progress | None = None) -> MoEBenchReport:
    """Time every (case, token count): MoE and dense-active, interleaved over the rounds."""
    report_progress = on_progress or (lambda what, done, total: None)
    previous = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    report = MoEBenchReport(config, command_line(config), machine_info(config.threads))
    total, step = len(config.cases) * (1 + len(config.tokens)), 0
    try:
        with torch.inference_mode():
            for case in config.cases:
                report_progress(
                    f"{case.label}: building {config.layers} + {config.layers} layers", step, total
                )
                torch.manual_seed(config.seed)
                cfg = MoEConfig(case.n_experts, case.top_k, case.expert_dim)
                moe = [MoELayer(config.dim, cfg).eval() for _ in range(config.layers)]
                dense = [DenseSwiGLU(config.dim, case.active_dim).eval() for _ in range(config.layers)]
                step += 1
                for t in config.tokens:
                    report_progress(f"{case.label}: {t} token(s) per call", step, total)
                    report.results.append(measure(moe, dense, case, t, config))
                    step += 1
                del moe, dense  # the next case's layers need the memory
    finally:
        torch.set_num_threads(previous)
    report_progress("done", total, total)
    return report


def measure(
    moe: list[MoELayer], dense: list[DenseSwiGLU], case: MoECase, t: int, config: MoEBenchConfig
) -> MoEResult:
    """Median per-layer times of both stacks on the same inputs, and their per-round ratio."""
    calls = -(-config.min_tokens // t)
    g = torch.Generator().manual_seed(config.seed + t)
    # Unit-scale inputs, as an RMSNorm hands the FFN; fresh ones each round, so routing varies.
    inputs = [torch.randn(calls, 1, t, config.dim, generator=g) for _ in range(config.rounds)]  # (C, 1, T, D)
    timed_calls(moe, inputs[0]), timed_calls(dense, inputs[0])  # warm-up: allocator, BLAS, page faults
    times: dict[str, list[float]] = {"moe": [], "dense": []}
    for r, x in enumerate(inputs):
        order = (("moe", moe), ("dense", dense)) if r % 2 else (("dense", dense), ("moe", moe))
        for name, layers in order:
            times[name].append(timed_calls(layers, x) / (calls * len(layers)))
    loads = sum(moe[0].forward_aux(xi).counts for xi in inputs[0])  # (E,), untimed
    ratios = [m / d for m, d in zip(times["moe"], times["dense"], strict=True)]
    return MoEResult(case=case, tokens=t, calls=calls, moe_ms=_ms(times["moe"]), dense_ms=_ms(times["dense"]),
                     ratio=Stat.of(ratios), loads=tuple(loads.tolist()))  # fmt: skip


def timed_calls(layers: Sequence[Callable[[Tensor], Tensor]], x: Tensor) -> float:
    """Seconds to run every layer, one after another, on each call's input in x (C, 1, T, D)."""
    t0 = time.perf_counter()
    for xi in x:
        for layer in layers:
            layer(xi)  # independent layers on the same input: only the weights differ
    return time.perf_counter() - t0


def _ms(seconds: list[float]) -> Stat:
    return Stat.of([s * 1e3 for s in seconds])


def command_line(config: MoEBenchConfig) -> str:
    """The options that reproduce this run, with a leading space."""
    default = MoEBenchConfig.quick_config() if config.quick else MoEBenchConfig()
    args = ["--suite", "moe"] + (["--quick"] if config.quick else [])
    for name, flag in (("rounds", "--rounds"), ("threads", "--threads")):
        if getattr(config, name) != getattr(default, name):
            args += [flag, str(getattr(config, name))]
    return "".join(" " + a for a in args)


# ------------------------------------------------------------------------------------- markdown


def render_moe_section(report: MoEBenchReport) -> str:
    """The MoE dispatch section of BENCHMARKS.md, markers included."""
    c, m = report.config, report.machine
    start, end = markers(SECTION)
    h = {case.active_dim for case in c.cases}
    smollm2 = c.dim == 576 and h == {1536}
    lines = [
        start,
        f"## MoE dispatch: {' and '.join(case.label for case in c.cases)} against dense-active, float32, "
        "PyTorch CPU" + (" (quick run: not comparable)" if c.quick else ""),
        "",
        f"One `omni_moe.MoELayer` (D = {c.dim}; router, sparse dispatch, weighted sum) against a dense SwiGLU "
        f"with the same active parameters: hidden size = top-k × expert size = {', '.join(map(str, sorted(h)))}, "
        "gate and up fused in one matrix and the activation in place, as the experts have them, so both read the same weights and do the same "
        "FLOPs per token."
        + (
            " The shapes are SmolLM2-135M's (D 576, FFN 1536) made MoE: the dense side is its MLP."
            if smollm2
            else ""
        )
        + f" Float32, {m['threads']} threads (`torch.set_num_threads`), `torch.inference_mode`, random weights "
        "(std 0.02, so router logits have std ≈ 0.5 on unit-scale inputs: loads as uneven as chance makes them, "
        f"see the last column). A call runs {c.layers} independent layers one after another on the same input, "
        f"each with its own weights ({c.layers} dense ones hold "
        f"{c.layers * _params(c.dim, max(h)) * 4 / 1e6:.0f} MB), so every layer reads its weights from DRAM as "
        "in a whole model, while code and small buffers stay cached; times are per layer. A round is one call "
        f"over a batch, or a stream of {c.min_tokens} 1-token calls (decode). MoE and dense alternate which goes "
        f"first over {c.rounds} rounds with fresh inputs; times are the median (min–max); the ratio is MoE / "
        "dense per round (the two measured back to back), its median (min–max). "
        f"Target: ratio <= {TARGET:g}x.",
        "",
        f"- Machine: {m['cpu']}, {m['cores']} cores; Python {m['python']}, torch {m['torch']}, "
        f"{m['threads']} threads; {m['date']}",
        f"- Command: `just bench{report.options}` (= `uv run python -m press_play.bench{report.options}`)",
        "",
        "| layer | tokens per call | MoE ms | dense-active ms | ratio | target | tokens per expert: min / mean / max |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    for r in report.results:
        if r.tokens == 1:
            kind, spread = "decode stream", f"{r.case.top_k} of {r.case.n_experts} per token"
        else:
            mean = statistics.fmean(r.loads)
            kind, spread = (
                "batch",
                f"{min(r.loads)} / {mean:.1f} / {max(r.loads)} (max/mean {max(r.loads) / mean:.2f})",
            )
        fmt = ".3f" if round(r.ratio.median, 2) == TARGET else ".2f"  # 1.502 must not read as met
        lines.append(
            f"| {r.case.label} | {r.tokens} ({kind}) | {_cell(r.moe_ms)} | {_cell(r.dense_ms)} "
            f"| {r.ratio.median:{fmt}}x ({r.ratio.lo:.2f}–{r.ratio.hi:.2f}) "
            f"| <= {TARGET:g}x: {'met' if r.met else 'not met'} | {spread} |"
        )
    lines += [
        "",
        "Parameters per layer: "
        + "; ".join(
            f"{case.label}: {_params(c.dim, case.n_experts * case.expert_dim) / 1e6:.2f}M in experts, "
            f"{_params(c.dim, case.active_dim) / 1e6:.2f}M active (the dense side's)"
            for case in c.cases
        )
        + ". Tokens per expert: the first layer's, over one batch. A batch that reaches every expert reads "
        "all of their weights (4 bytes a parameter) where the dense side reads its few, for only N·K/E rows "
        "each: a cost per expert that shrinks as the batch grows, and that one token, which runs K experts, "
        "does not pay.",
        end,
    ]
    return "\n".join(lines) + "\n"


def _cell(s: Stat) -> str:
    fmt = ".3f" if s.median < 10 else ".1f"
    return f"{s.median:{fmt}} ({s.lo:{fmt}}–{s.hi:{fmt}})"


def _params(dim: int, hidden: int) -> int:
    return 3 * dim * hidden  # gate, up, down
