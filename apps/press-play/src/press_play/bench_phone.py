"""Phone targets on SmolLM2: the ExecuTorch programs beside OmniCoder's ONNX graph and llama.cpp, one run.

Engines, each in a fresh process per round (bench_onnx_worker.py, the same greedy loop and token ids):
- executorch int4 / float32: `press-play export --format executorch` (XNNPACK; 8da4w carries the GGUF's
  Q4_1 blocks, 8-bit head and embedding) run by omni_runtime's ExecuTorch engine;
- omnicoder-onnx: the int4 ONNX export, as in the onnx suite;
- llama.cpp Q4_1 on the same GGUF (benchmark-only peer environment, see the README).
Also: the float32 program's greedy tokens against the PyTorch model's (64 after the 512-token prompt),
and the Core ML package (4-bit blocks, KV state) converted and validated structurally, with its time.

ExecuTorch's lowering of SmolLM2 takes minutes (about 15 for int4 on two busy cores); the programs are
kept in the work folder and reused while their manifest matches the export settings.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omni_model.zoo import DEFAULT_MODEL
from press_play.bench_onnx import OnnxBenchError, peer_python, run_worker

SECTION = "phone"
Progress = Callable[[str, int, int], None]
ET_INT4, ET_FLOAT, ONNX, LLAMA = (
    "executorch int4",
    "executorch float32",
    "omnicoder-onnx int4",
    "llama.cpp Q4_1",
)


@dataclass(frozen=True)
class PhoneBenchConfig:
    model: str = DEFAULT_MODEL
    text: str = "hamlet"
    prompt_tokens: int = 512
    short_tokens: int = 16
    decode_tokens: int = 128
    identity_tokens: int = 64
    rounds: int = 3
    threads: int = 2
    ppl_tokens: int = 4096
    context: int = 512
    max_seq_len: int = 2048
    peer_python: str | None = None  # None: .venv-peers/bin/python when it exists; "": no peers
    work_dir: str | None = None  # None: ~/.cache/omnicoder/bench/phone
    quick: bool = False

    def __post_init__(self) -> None:
        for name in (
            "prompt_tokens",
            "short_tokens",
            "decode_tokens",
            "rounds",
            "threads",
            "ppl_tokens",
            "context",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"PhoneBenchConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.identity_tokens > self.decode_tokens:
            raise ValueError("PhoneBenchConfig.identity_tokens must be <= decode_tokens")

    @classmethod
    def quick_config(cls, **overrides: Any) -> PhoneBenchConfig:
        return cls(**{"prompt_tokens": 48, "decode_tokens": 16, "identity_tokens": 16, "rounds": 1,
                      "ppl_tokens": 256, "context": 64, "max_seq_len": 128, "quick": True, "peer_python": "",
                      **overrides})  # fmt: skip


@dataclass
class PhoneReport:
    config: PhoneBenchConfig
    machine: dict[str, Any]
    engines: dict[str, dict[str, Any]] = field(default_factory=dict)
    float32_ppl: float = float("nan")
    identity: dict[str, Any] = field(default_factory=dict)
    coreml: dict[str, Any] = field(default_factory=dict)
    exports: dict[str, Any] = field(default_factory=dict)  # engine -> export seconds (or "reused")
    peers_note: str = ""

    def median(self, engine: str, key: str) -> float:
        return statistics.median(r[key] for r in self.engines[engine]["runs"])


def _work(config: PhoneBenchConfig) -> Path:
    return (
        Path(config.work_dir) if config.work_dir else Path.home() / ".cache" / "omnicoder" / "bench" / "phone"
    )


def _reusable(folder: Path, source: str, weights: str, max_seq_len: int) -> bool:
    """An earlier run's export made from the same source with the settings this run would use."""
    from omni_export.executorch import FORMAT, VERSION, ExecuTorchConfig

    try:
        m = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    q = m.get("quantization", {})
    alpha = (q.get("smoothing") or {}).get("alpha", 0.0) if weights == "int4" else 0.0
    want_alpha = ExecuTorchConfig().smoothing if weights == "int4" else 0.0
    return (m.get("format"), m.get("version"), m.get("source"), q.get("weights"), m.get("max_seq_len"),
            alpha) == (FORMAT, VERSION, source, weights, max_seq_len, want_alpha)  # fmt: skip


def prepare(
    config: PhoneBenchConfig, peers: str | None, report: Progress, rep: PhoneReport
) -> dict[str, Path]:
    from omni_export.executorch import ExecuTorchConfig, export_executorch
    from omni_export.export import ExportConfig, export_onnx
    from omni_model.loader import resolve_source

    work = _work(config)
    work.mkdir(parents=True, exist_ok=True)
    source = resolve_source(config.model)
    out: dict[str, Path] = {}
    for name, weights in ((ET_INT4, "int4"), (ET_FLOAT, "float32")):
        folder = work / f"executorch-{weights}"
        if _reusable(folder, str(source), weights, config.max_seq_len):
            rep.exports[name] = "reused"
        else:
            report(f"exporting {name} (ExecuTorch lowering takes minutes)", 0, 1)
            t0 = time.perf_counter()
            export_executorch(
                config.model, folder, ExecuTorchConfig(weights=weights, max_seq_len=config.max_seq_len)
            )  # type: ignore[arg-type]
            rep.exports[name] = time.perf_counter() - t0
        out[name] = folder
    report("exporting the ONNX int4 graph", 0, 1)
    export_onnx(
        config.model, work / "onnx-int4", ExportConfig(weights="int4", max_seq_len=config.max_seq_len)
    )
    out[ONNX] = work / "onnx-int4"
    if peers is not None and source.is_file():
        out[LLAMA] = source
    return out


def _coreml(config: PhoneBenchConfig, work: Path) -> dict[str, Any]:
    import omni_model
    from omni_export.coreml import CoreMLConfig, export_coreml

    lm = omni_model.load(config.model, fuse=False)
    t0 = time.perf_counter()
    summary = export_coreml(
        lm, work / "coreml-int4.mlpackage", CoreMLConfig(weights="int4", max_seq_len=config.max_seq_len)
    )
    return summary | {"wall_seconds": time.perf_counter() - t0}


def _file_mb(path: Path) -> float:
    if path.is_file():
        return path.stat().st_size / 2**20
    return sum(p.stat().st_size for p in path.iterdir() if p.suffix in (".pte", ".onnx", ".data")) / 2**20


def run_phone_bench(config: PhoneBenchConfig, on_progress: Progress | None = None) -> PhoneReport:
    import omni_model
    from omni_model.sampling_config import SamplingConfig
    from omni_runtime.generate import generate
    from omni_runtime.torch_engine import TorchEngine
    from press_play.bench import machine_info
    from press_play.common import read_text

    report = on_progress or (lambda what, done, total: None)
    peers = peer_python(config.peer_python)
    rep = PhoneReport(config, machine_info(config.threads))
    rep.peers_note = (
        "" if peers else "llama.cpp not measured: no benchmark-only peer environment (see README)"
    )
    paths = prepare(config, peers, report, rep)
    lm = omni_model.load(config.model, fuse=False)
    ids = lm.tokenizer.encode(read_text(config.text))
    if len(ids) < max(config.prompt_tokens, config.ppl_tokens):
        raise OnnxBenchError(f"{config.text}: {len(ids)} tokens, fewer than the benchmark needs")
    base = {"threads": config.threads, "n_ctx": config.prompt_tokens + config.decode_tokens + 8,
            "prompt_ids": ids[: config.prompt_tokens], "short_ids": ids[: config.short_tokens],
            "decode_tokens": config.decode_tokens, "measure": "speed"}  # fmt: skip
    kinds = {ET_INT4: "executorch", ET_FLOAT: "executorch", ONNX: "omnicoder-onnx", LLAMA: "llama.cpp"}
    pythons = {name: peers if name == LLAMA else sys.executable for name in paths}
    total, done = config.rounds * len(paths) + len(paths) + 3, 0
    for name, path in paths.items():
        rep.engines[name] = {"path": str(path), "file_mb": _file_mb(path), "runs": []}
    for r in range(config.rounds):
        for name in list(paths) if r % 2 == 0 else list(reversed(paths)):
            report(f"{name}: round {r + 1}/{config.rounds}", done, total)
            spec = {**base, "engine": kinds[name], "path": str(paths[name])}
            run = run_worker(pythons[name], spec)  # type: ignore[arg-type]
            run["model_rss_mb"] = run["peak_rss_mb"] - run["baseline_rss_mb"]
            rep.engines[name]["runs"].append(run)
            done += 1
    for name in paths:
        report(f"{name}: perplexity", done, total)
        spec = {**base, "engine": kinds[name], "path": str(paths[name]), "measure": "ppl",
                "ppl_ids": ids[: config.ppl_tokens], "context": config.context}  # fmt: skip
        rep.engines[name]["ppl"] = run_worker(pythons[name], spec)["ppl"]  # type: ignore[arg-type]
        done += 1
    report("PyTorch reference: greedy tokens and perplexity", done, total)
    from omni_model.perplexity import perplexity

    rep.float32_ppl = perplexity(lm.model, ids[: config.ppl_tokens], config.context).ppl
    want = generate(TorchEngine(lm), ids[: config.prompt_tokens],
                    SamplingConfig(temperature=0.0, max_new_tokens=config.identity_tokens,
                                   stop_token_ids=frozenset())).token_ids  # fmt: skip
    got = rep.engines[ET_FLOAT]["runs"][0]["greedy_tokens"][: config.identity_tokens]
    first = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), None)
    rep.identity = {
        "tokens": config.identity_tokens,
        "identical": list(want) == got,
        "first_difference": first,
    }
    report("converting SmolLM2 to Core ML", done + 1, total)
    rep.coreml = _coreml(config, _work(config))
    report("done", total, total)
    return rep


def render_phone_section(rep: PhoneReport) -> str:
    c, m = rep.config, rep.machine
    spread = c.rounds > 1

    def cell(name: str, key: str, fmt: str) -> str:
        vals = [r[key] for r in rep.engines[name]["runs"]]
        med = statistics.median(vals)
        return f"{med:{fmt}} ({min(vals):{fmt}}–{max(vals):{fmt}})" if spread else f"{med:{fmt}}"

    exports = ", ".join(
        f"{k} {v if isinstance(v, str) else f'{v / 60:.1f} min'}" for k, v in rep.exports.items()
    )
    lines = [
        f"<!-- bench:{SECTION}:start -->",
        "## Phone targets: ExecuTorch and Core ML exports of SmolLM2",
        "",
        f"Same token ids (the start of `{c.text}`), {c.threads} threads, greedy, each engine in a fresh process per "
        f"round ({c.rounds} rounds, order alternating; median (min–max)). Decode tok/s = {c.decode_tokens - 1} / "
        f"(time of token {c.decode_tokens} − time of token 1) after a {c.short_tokens}- and a {c.prompt_tokens}-token "
        f"prompt; peak RSS of that process (VmHWM), the part of it there before the model was opened (the interpreter and the runtime library imported: for ExecuTorch's Python bindings that includes torch, which an app linking the C++ runtime does not carry), and the difference, what opening and running the model added; perplexity on the first {c.ppl_tokens} tokens in {c.context}-token "
        f"windows. ExecuTorch programs: XNNPACK, KV cache of {c.max_seq_len} positions inside the program; exports: "
        f"{exports}.",
        "",
        f"- Machine: {m['cpu']}, {m['cores']} cores; Python {m['python']}; {m['date']}",
        "- Command: `just bench --suite phone` (= `uv run python -m press_play.bench --suite phone`)",
        f"- float32 perplexity (omni_model, PyTorch): **{rep.float32_ppl:.2f}**",
    ]
    if rep.peers_note:
        lines.append(f"- {rep.peers_note}")
    lines += ["", f"| engine | file MB | decode tok/s @{c.short_tokens} | decode tok/s @{c.prompt_tokens} | "
              "prefill tok/s | peak RSS MB | runtime import MB | model MB | perplexity | vs float32 |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for name, e in rep.engines.items():
        ppl = e["ppl"]
        lines.append(f"| {name} | {e['file_mb']:.1f} | {cell(name, 'decode_tok_s_short', ',.1f')} | "
                     f"{cell(name, 'decode_tok_s_long', ',.1f')} | {cell(name, 'prefill_tok_s', ',.0f')} | "
                     f"{cell(name, 'peak_rss_mb', ',.0f')} | {cell(name, 'baseline_rss_mb', ',.0f')} | "
                     f"{cell(name, 'model_rss_mb', ',.0f')} | {ppl:.2f} | {100 * (ppl / rep.float32_ppl - 1):+.2f}% |")  # fmt: skip
    q = 100 * (rep.engines[ET_INT4]["ppl"] / rep.float32_ppl - 1)
    cm = rep.coreml
    lines += ["", "| target | figure | wanted | met |", "|---|---:|---|---|",
              f"| ExecuTorch float32 greedy tokens = PyTorch | {'identical' if rep.identity['identical'] else 'first difference at ' + str(rep.identity['first_difference'])} "
              f"({rep.identity['tokens']} tokens) | identical | {'yes' if rep.identity['identical'] else 'no'} |",
              f"| ExecuTorch int4 perplexity vs float32 | {q:+.2f}% | within 2% | {'yes' if abs(q) <= 2 else 'no'} |",
              f"| Core ML package converts and validates | {cm['package_bytes'] / 2**20:.1f} MB, {cm['int4_tensors']} int4 tensors, "
              f"{cm['wall_seconds']:.0f} s | converts, valid | yes |"]  # fmt: skip
    if LLAMA in rep.engines:
        for name in (ET_INT4, ONNX):
            lines.append(f"| {name} decode @{c.short_tokens} vs llama.cpp Q4_1 | "
                         f"{rep.median(name, 'decode_tok_s_short') / rep.median(LLAMA, 'decode_tok_s_short'):.2f}x | report | — |")  # fmt: skip
    lines += ["", f"<!-- bench:{SECTION}:end -->"]
    return "\n".join(lines) + "\n"
