"""The single-button build, timed, and its report held to separate measurements made in the same run.

1. `press-play build --force` in a fresh process, timed: every stage runs;
2. `press-play build` again: every stage should come from the cache (target: under a tenth of the time);
3. the figures of the report checked against separate runs of the same measurements: `press-play eval
   perplexity` on the build's ONNX folder, and the speed rounds `just bench --suite onnx` makes
   (bench_onnx_worker, fresh processes, medians) on it and on llama.cpp with the same GGUF.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omni_model.zoo import DEFAULT_MODEL
from press_play.bench_onnx import OnnxBenchError, peer_python, run_worker

SECTION = "build"
Progress = Callable[[str, int, int], None]
SPEED = (("decode_tok_s_short", "decode tok/s @short", ".1f"), ("decode_tok_s_long", "decode tok/s @long", ".1f"),
         ("prefill_tok_s", "prefill tok/s", ".0f"), ("peak_rss_mb", "peak RSS MB", ".0f"))  # fmt: skip


@dataclass(frozen=True)
class BuildBenchConfig:
    model: str = DEFAULT_MODEL
    profile: str = "mobile-2gb"
    threads: int = 2
    rounds: int = 3  # separate speed rounds (the build's own come from its profile)
    peer_python: str | None = None  # None: .venv-peers/bin/python when it exists; "": no peers
    work_dir: str | None = None  # None: ~/.cache/omnicoder/bench/build
    quick: bool = False

    @classmethod
    def quick_config(cls, **overrides: Any) -> BuildBenchConfig:
        return cls(**{"rounds": 1, "quick": True, "peer_python": "", **overrides})


@dataclass
class BuildBenchReport:
    config: BuildBenchConfig
    machine: dict[str, Any]
    first_s: float = 0.0
    cached_s: float = 0.0
    report: dict[str, Any] = field(default_factory=dict)
    cached_stages: dict[str, str] = field(default_factory=dict)
    eval_ppl: float = float("nan")
    separate: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # engine -> speed runs
    peers_note: str = ""


def _press_play(args: list[str], threads: int) -> tuple[float, str]:
    """Run `press-play ARGS` in a fresh process; (seconds, stdout)."""
    cmd = [sys.executable, "-m", "press_play.cli", "--threads", str(threads), *args]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = " ".join(proc.stderr.split())[-300:]
        raise OnnxBenchError(f"press-play {' '.join(args[:2])} failed (exit {proc.returncode}): {tail}")
    return seconds, proc.stdout


def run_build_bench(config: BuildBenchConfig, on_progress: Progress | None = None) -> BuildBenchReport:
    from press_play.bench import machine_info

    report = on_progress or (lambda what, done, total: None)
    rep = BuildBenchReport(config, machine_info(config.threads))
    out = (
        Path(config.work_dir) if config.work_dir else Path.home() / ".cache" / "omnicoder" / "bench" / "build"
    )
    peers = peer_python(config.peer_python)
    build = ["build", config.model, "--profile", config.profile, "--out", str(out), "--json",
             "--peer-python", peers or ""]  # fmt: skip
    total = 3 + config.rounds * (2 if peers else 1)
    report("press-play build --force (every stage)", 0, total)
    rep.first_s, stdout = _press_play([*build, "--force"], config.threads)
    rep.report = json.loads(stdout)
    report("press-play build (cached)", 1, total)
    rep.cached_s, stdout = _press_play(build, config.threads)
    rep.cached_stages = {k: v["status"] for k, v in json.loads(stdout)["stages"].items()}
    ref = rep.report["reference"]
    report("press-play eval perplexity (separate)", 2, total)
    _, stdout = _press_play(["eval", "perplexity", "--model", str(out / "onnx"), "--context", str(ref["ppl_context"]),
                             "--max-tokens", str(ref["ppl_tokens"]), "--json"], config.threads)  # fmt: skip
    rep.eval_ppl = json.loads(stdout)["ppl"]
    b = rep.report["profile"]["bench"]  # the protocol the build's own rounds followed
    ids = _text_ids(out / "onnx")
    base = {"threads": config.threads, "n_ctx": b["prompt_tokens"] + b["decode_tokens"] + 8,
            "prompt_ids": ids[: b["prompt_tokens"]], "short_ids": ids[: b["short_tokens"]],
            "decode_tokens": b["decode_tokens"], "measure": "speed"}  # fmt: skip
    engines = {"omnicoder-onnx": (sys.executable, str(out / "onnx"))}
    if peers and "llama.cpp" in rep.report.get("peers", {}):
        engines["llama.cpp"] = (peers, rep.report["source"]["path"])
    elif not peers:
        rep.peers_note = "llama.cpp not measured: no benchmark-only peer environment (see README)"
    done = 3
    for r in range(config.rounds):
        for name, (python, path) in engines.items():
            report(f"{name}: separate round {r + 1}/{config.rounds}", done, total)
            rep.separate.setdefault(name, []).append(
                run_worker(python, {**base, "engine": name, "path": path})
            )
            done += 1
    report("done", total, total)
    return rep


def _text_ids(folder: Path) -> list[int]:
    from omni_model.corpus import text_path
    from omni_model.tokenizer import Tokenizer

    return Tokenizer.from_hf_folder(folder).encode(text_path("hamlet").read_text(encoding="utf-8"))


def render_build_section(rep: BuildBenchReport) -> str:
    c, m, r = rep.config, rep.machine, rep.report
    onnx = r["formats"]["onnx"]
    cached = sum(s == "cached" for s in rep.cached_stages.values())
    ratio = rep.cached_s / rep.first_s
    lines = [
        f"<!-- bench:{SECTION}:start -->",
        f"## The single-button build: `press-play build` of SmolLM2 for `{c.profile}`",
        "",
        "Each command in a fresh process, timed from start to exit (imports included). The build's figures are "
        "then measured again, separately, in the same run: perplexity by `press-play eval perplexity` on the "
        f"build's ONNX folder, speed by {c.rounds} fresh-process rounds of the worker `just bench --suite onnx` "
        "uses (medians).",
        "",
        f"- Machine: {m['cpu']}, {m['cores']} cores, {c.threads} threads; Python {m['python']}; {m['date']}",
        "- Command: `just bench --suite build` (= `uv run python -m press_play.bench --suite build`)",
    ]
    if rep.peers_note:
        lines.append(f"- {rep.peers_note}")
    lines += [
        "",
        "| run | seconds | stages reused | vs first | target | met |",
        "|---|---:|---:|---:|---|---|",
        f"| `press-play build --force` | {rep.first_s:.1f} | 0 of {len(r['stages'])} | 1.00x | under 600 s | "
        f"{'yes' if rep.first_s < 600 else 'no'} |",
        f"| `press-play build` again | {rep.cached_s:.1f} | {cached} of {len(rep.cached_stages)} | {ratio:.3f}x | "
        f"under 0.1x | {'yes' if ratio < 0.1 else 'no'} |",
        "",
        "| figure | in report.json | measured separately | separate / report |",
        "|---|---:|---:|---:|",
        f"| ONNX int4 perplexity ({r['reference']['ppl_tokens']} tokens, {r['reference']['ppl_context']}-token windows) | "
        f"{onnx['parity']['perplexity']:.3f} | {rep.eval_ppl:.3f} | {rep.eval_ppl / onnx['parity']['perplexity']:.4f} |",
    ]  # fmt: skip
    checks = ", ".join(f"{ck['name']} {'passed' if ck['passed'] else 'failed'}" for ck in r["checks"])
    stages = ", ".join(f"{k} {v.get('seconds', 0):.0f}s" for k, v in r["stages"].items())
    sources = {"omnicoder-onnx": onnx["bench"], "llama.cpp": r.get("peers", {}).get("llama.cpp", {})}
    for name, runs in rep.separate.items():
        for key, label, fmt in SPEED:
            ours = sources[name].get(key)
            sep = statistics.median(run[key] for run in runs)
            if ours is None:
                continue
            lines.append(f"| {name} {label} | {ours:{fmt}} | {sep:{fmt}} | {sep / ours:.2f} |")
    lines += [
        "",
        f"Checks in the report: {checks}. Stages of the first run: {stages}.",
        f"<!-- bench:{SECTION}:end -->",
    ]  # fmt: skip
    return "\n".join(lines) + "\n"
