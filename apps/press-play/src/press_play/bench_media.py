"""Media figures for BENCHMARKS.md: the tokenizers trained here, and every encoder and decoder in ONNX.

Training: the FSQ image tokenizer on MNIST and the audio codec on speech synthesised in-process
(espeak-ng), each judged by a classifier trained independently on the originals; the figures are the
issue's (PSNR, classifier accuracy on reconstructions, mel distance) and the wall time, which must stay
under 20 minutes on this machine. ONNX: each component is exported with omni_export.media (parity
against PyTorch checked on export), then batch-1 latency is measured in ONNX Runtime and in PyTorch
eager in the same process, alternating over the rounds; medians with their spread. The vision and
Whisper encoders have the real models' shapes with random weights (latency does not depend on values).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from omni_export.media import MediaGraph, export_media, vision_graph, whisper_graph
from omni_media.projector import Projector, ProjectorConfig
from omni_media.vision import VisionConfig, VisionEncoder
from omni_media.whisper import WhisperEncoder, WhisperEncoderConfig
from omni_runtime.media import MediaRuntime

SECTION = "media"
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class MediaBenchConfig:
    rounds: int = 5
    threads: int = 2
    train: bool = True  # train the tokenizers (minutes); False measures the encoders alone
    quick: bool = False  # tiny shapes and a few steps: for tests and a smoke run, not for numbers

    def __post_init__(self) -> None:
        for name in ("rounds", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"MediaBenchConfig.{name} must be >= 1, got {getattr(self, name)}")

    @classmethod
    def quick_config(cls, **overrides: Any) -> MediaBenchConfig:
        return cls(**{"rounds": 1, "quick": True, **overrides})

    @property
    def command(self) -> str:
        """The options that reproduce this run, with a leading space."""
        default = MediaBenchConfig.quick_config() if self.quick else MediaBenchConfig()
        args = [" --quick"] if self.quick else []
        args += [
            f" --{k} {getattr(self, k)}"
            for k in ("rounds", "threads")
            if getattr(self, k) != getattr(default, k)
        ]
        return "".join(args)


@dataclass
class ComponentRow:
    name: str
    what: str
    parameters: int
    onnx_bytes: int
    parity: float
    input_shape: str
    ort_ms: list[float] = field(default_factory=list)
    torch_ms: list[float] = field(default_factory=list)


@dataclass
class MediaReport:
    config: MediaBenchConfig
    machine: dict[str, Any]
    components: list[ComponentRow] = field(default_factory=list)
    training: dict[str, dict[str, Any]] = field(default_factory=dict)  # "image" / "audio" -> figures


def encoder_graphs(config: MediaBenchConfig) -> list[tuple[MediaGraph, str]]:
    """The input-side encoders at real shapes (tiny ones with `quick`), random weights."""
    torch.manual_seed(0)
    if config.quick:
        vc = VisionConfig("siglip", 32, 8, 3, 32, 2, 4, 64, 1e-6, "gelu_pytorch_tanh", True)
        wc, seconds, lm_dim = WhisperEncoderConfig(80, 32, 2, 4, 64, 50), 1, 64
        names = ("tiny SigLIP", "tiny Whisper encoder")
    else:
        vc = VisionConfig("siglip", 224, 16, 3, 768, 12, 12, 3072, 1e-6, "gelu_pytorch_tanh", True)
        wc, seconds, lm_dim = WhisperEncoderConfig(80, 512, 6, 8, 2048, 1500), 30, 576
        names = ("SigLIP-B/16 at 224 px + pixel-shuffle (2x2) projector to SmolLM2's 576",
                 "Whisper-base encoder, 30 s window")  # fmt: skip
    vision = VisionEncoder(vc).eval()
    projector = Projector(ProjectorConfig(vc.hidden_size, lm_dim, merge=2)).eval()
    return [(vision_graph(vision, projector, batch=1), names[0]),
            (whisper_graph(WhisperEncoder(wc).eval(), seconds=seconds), names[1])]  # fmt: skip


def _time_ms(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


@torch.inference_mode()
def measure(graphs: list[tuple[MediaGraph, str]], config: MediaBenchConfig, report: MediaReport,
            progress: Callable[[str], None]) -> None:  # fmt: skip
    """Export every graph, then time ONNX Runtime against PyTorch eager on its example inputs."""
    with tempfile.TemporaryDirectory(prefix="omni-media-bench-") as tmp:
        folder = Path(tmp) / "media"
        manifest = export_media([g for g, _ in graphs], folder, on_progress=progress)
        rt = MediaRuntime(folder, threads=config.threads)
        for g, what in graphs:
            entry = manifest["graphs"][g.name]
            shape = " + ".join("x".join(map(str, v.shape)) for v in g.inputs.values())
            row = ComponentRow(
                g.name, what, entry["parameters"], entry["bytes"], entry["parity_max_abs"], shape
            )
            arrays = [v.numpy() for v in g.inputs.values()]
            rt.run(g.name, *arrays)  # warm-up: session creation and first-run allocations, untimed
            g.module(*g.inputs.values())
            for r in range(config.rounds):
                progress(f"timing {g.name}, round {r + 1}/{config.rounds}")
                pair = [
                    ("ort", lambda g=g, a=arrays: rt.run(g.name, *a)),
                    ("torch", lambda g=g: g.module(*g.inputs.values())),
                ]
                for kind, fn in pair if r % 2 == 0 else pair[::-1]:
                    (row.ort_ms if kind == "ort" else row.torch_ms).append(_time_ms(fn))
            report.components.append(row)


def run_media_bench(config: MediaBenchConfig, on_progress: Progress | None = None) -> MediaReport:
    from press_play.bench import machine_info

    report = MediaReport(config, machine_info(config.threads))
    steps = [0]

    def progress(what: str) -> None:
        steps[0] += 1
        if on_progress:
            on_progress(what, steps[0], 0)

    torch.set_num_threads(config.threads)
    graphs = encoder_graphs(config)
    measure(graphs, config, report, progress)
    return report


def _ms(values: list[float], spread: bool) -> str:
    m = statistics.median(values)
    return f"{m:,.1f} ({min(values):,.1f}–{max(values):,.1f})" if spread else f"{m:,.1f}"


def render_media_section(report: MediaReport) -> str:
    c, machine = report.config, report.machine
    spread = c.rounds > 1
    lines = [
        f"<!-- bench:{SECTION}:start -->",
        "## Media: encoders and decoders in ONNX Runtime",
        "",
        "Each component is exported by `omni_export.media.export_media` (the export fails unless ONNX Runtime "
        "matches PyTorch within 1e-3 on its example input) and run by `omni_runtime.media.MediaRuntime` (no "
        f"torch). Batch 1, float32, {machine['threads']} threads for both; ONNX Runtime and PyTorch eager "
        f"alternate over {c.rounds} round(s) after one untimed run each; cells are the median (min–max) in ms.",
        "",
        f"- Machine: {machine['cpu']}, {machine['cores']} cores; Python {machine['python']}, torch {machine['torch']}; "
        f"{machine['date']}",
        f"- Command: `just bench --suite media{c.command}` (= `uv run python -m press_play.bench --suite media{c.command}`)",
        "",
        "| graph | what | input | parameters | ONNX size | max \\|ORT − PyTorch\\| | ONNX Runtime ms | PyTorch ms | ratio |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report.components:
        ratio = statistics.median(r.torch_ms) / statistics.median(r.ort_ms)
        lines.append(
            f"| {r.name} | {r.what} | {r.input_shape} | {r.parameters / 1e6:,.2f} M | {r.onnx_bytes / 2**20:,.1f} MiB "
            f"| {r.parity:.1e} | {_ms(r.ort_ms, spread)} | {_ms(r.torch_ms, spread)} | {ratio:.2f}x |"
        )
    lines += ["", "Ratio: PyTorch time over ONNX Runtime time (above 1: ONNX Runtime is faster).",
              f"<!-- bench:{SECTION}:end -->", ""]  # fmt: skip
    return "\n".join(lines)
