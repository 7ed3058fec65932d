"""The any-to-any digit-world model's figures for BENCHMARKS.md: `press-play train omni`'s own run.

The suite runs the recipe (`press_play.omni_cmd.run_omni`, the command's code) in a scratch folder,
or, with `--from FOLDER`, reads the figures a finished `press-play train omni` run wrote there
(`omni.json`), so a run of the recipe is never repeated only to print its table. Every figure comes
from held-out data and independent judges; the targets are the issue's.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SECTION = "omni"

TARGETS = {  # figure -> (what, held-out set, target)
    "image_to_text": ("image -> text: digit", "MNIST test images", 0.97),
    "speech_to_text_words": ("speech -> text: words of 1-3 digit sequences", "12 unseen voices", 0.90),
    "video_to_text": ("video -> text: digit and direction", "clips of MNIST test digits, other seeds", 0.90),
    "text_to_image": ("text -> image: drawn digit read as asked", "MNIST judge", 0.90),
    "text_to_speech": ("text -> speech: spoken word read as asked", "spoken-digit judge", 0.85),
    "text_to_video": (
        "text -> video: frames with the digit and direction asked",
        "frame-by-frame judge",
        0.80,
    ),
}


@dataclass(frozen=True)
class OmniBenchConfig:
    budget_hours: float = 1.75
    threads: int = 2
    rounds: int = 5  # latency: medians over this many calls after a warm-up
    source: Path | None = None  # a finished run's folder to read instead of training
    quick: bool = False

    def __post_init__(self) -> None:
        if not self.budget_hours > 0 or self.threads < 1:
            raise ValueError("OmniBenchConfig: budget_hours must be > 0 and threads >= 1")

    @classmethod
    def quick_config(cls, **overrides: Any) -> OmniBenchConfig:
        return cls(**{"budget_hours": 0.03, "quick": True, **overrides})


@dataclass
class OmniReport:
    config: OmniBenchConfig
    machine: dict[str, Any]
    figures: dict[str, Any]
    command: str
    bundle: dict[str, Any] | None = None  # ONNX bundle sizes and per-task latency


def measure_bundle(model: Path, threads: int, rounds: int, weights: str = "float32") -> dict[str, Any]:
    """Export `model` to an ONNX bundle and time each task in OmniRuntime on held-out inputs: an MNIST
    test digit, three words in an unseen voice, a clip of a test digit with a word in its sound track."""
    import statistics
    import time

    import numpy as np

    from omni_export.omni import export_omni
    from omni_media.data import load_mnist
    from omni_media.speech import TEST_VOICES, synthesize
    from omni_media.world import direction_clips
    from omni_runtime.omni import OmniRuntime

    with tempfile.TemporaryDirectory(prefix="omni-bundle-") as tmp:
        manifest = export_omni(model, Path(tmp) / "bundle", weights=weights, threads=threads)
        sizes = {p.relative_to(Path(tmp) / "bundle").as_posix(): p.stat().st_size
                 for p in (Path(tmp) / "bundle").rglob("*") if p.is_file()}  # fmt: skip
        rt = OmniRuntime(Path(tmp) / "bundle", threads=threads)
        mnist = load_mnist()
        image = mnist.test_images[0]
        speech = synthesize("three one four", TEST_VOICES[0])
        clip = direction_clips(mnist.test_images[1:2], mnist.test_labels[1:2], np.array([0]),
                               size=rt.layout["video"]["size"], seed=0).clips[0]  # fmt: skip
        word = synthesize("two", TEST_VOICES[1])
        cases = {
            "image -> text": lambda: rt.answer("what digit is this?", image=image),
            "speech -> text (3 words)": lambda: rt.answer("transcribe the audio", audio=speech),
            "video -> text": lambda: rt.answer("which digit moves, and which way? what is said?", video=(clip, word)),
            "text -> image": lambda: rt.generate_media("draw a seven", "image", seed=0),
            "text -> speech (1 word)": lambda: rt.generate_media("say seven", "audio", seed=0),
            "text -> video": lambda: rt.generate_media("show a seven moving up", "video", seed=0),
        }  # fmt: skip
        if rt.verifier is not None:  # the cost of reranking on device: 4 candidates drawn and scored
            cases["text -> image, best of 4"] = lambda: rt.generate_media("draw a seven", "image", 4, seed=0)
            cases["text -> speech (1 word), best of 4"] = lambda: rt.generate_media(
                "say seven", "audio", 4, seed=0
            )
        latency = {}
        for name, call in cases.items():
            call()  # warm-up
            times = []
            for _ in range(rounds):
                t0 = time.perf_counter()
                call()
                times.append(1e3 * (time.perf_counter() - t0))
            latency[name] = {
                "median_ms": statistics.median(times),
                "min_ms": min(times),
                "max_ms": max(times),
            }
    return {"weights": weights, "bytes": sum(sizes.values()), "files": sizes, "latency": latency,
            "parity": manifest.get("parity", {})}  # fmt: skip


def run_omni_bench(config: OmniBenchConfig, progress: Any = None) -> OmniReport:
    import torch

    from press_play.bench import machine_info
    from press_play.omni_cmd import MARKER, OmniRecipe, quick_recipe, run_omni

    if config.source is not None:
        path = config.source / MARKER
        try:
            figures = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: cannot read the run's figures: {e}") from None
        if "decoder_active_per_token" not in figures.get("params", {}):  # runs before it was recorded
            from omni_model.loader import load_config
            from press_play.omni_cmd import _active

            figures.setdefault("params", {})["decoder_active_per_token"] = _active(load_config(config.source))
        budget = figures.get("recipe", {}).get("budget_s", 0) / 3600
        bundle = measure_bundle(config.source, config.threads, config.rounds)
        return OmniReport(config, machine_info(config.threads), figures,
                          f"press-play train omni --budget-hours {budget:g}", bundle)  # fmt: skip
    before = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    say = (lambda what: progress(what, 0, 1)) if progress else None
    try:
        with tempfile.TemporaryDirectory(prefix="omni-bench-") as tmp:
            budget = config.budget_hours * 3600
            recipe = quick_recipe(budget) if config.quick else OmniRecipe(budget_s=budget)
            run = run_omni(recipe, Path(tmp) / "omni", progress=say)
    finally:
        torch.set_num_threads(before)
    quick = " --quick" if config.quick else ""
    return OmniReport(config, machine_info(config.threads), run.figures,
                      f"press-play train omni --budget-hours {config.budget_hours:g}{quick}")  # fmt: skip


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def render_omni_section(report: OmniReport) -> str:
    f, m = report.figures, report.machine
    u, g, t = f["understanding"], f["generation"], f["training"]
    p, j, rec = f["params"], f["judges"], f.get("recipe", {})
    lines = [
        f"<!-- bench:{SECTION}:start -->",
        "## Any-to-any digit world: one MLA + MoE model trained here, judged on held-out data",
        "",
        f"- Command: `uv run {report.command}` (the whole run: media tokenizers, judges, data, verifier, "
        f"model, judging), {f['wall_s'] / 60:.0f} min of wall clock on {m['threads']} threads",
        f"- Machine: {m['cpu']}, {m['cores']} cores; Python {m['python']}, torch {m['torch']}; {m['date']}",
        f"- Model: decoder {p['decoder'] / 1e6:.2f} M parameters ({p['decoder_active_per_token'] / 1e6:.2f} M per "
        f"token), encoders {p['encoders'] / 1e6:.2f} M; {t['steps']:,} steps, {t['tokens']:,} tokens in "
        f"{t['elapsed_s'] / 60:.1f} min of training",
        f"- Judges: MNIST classifier {_pct(j['image_judge_mnist_test'])} on MNIST test; spoken-digit classifier "
        f"{_pct(j['speech_judge_held_out_voices'])} on the unseen voices (both trained on real data only)",
        "",
        f"| task | held out | one sample | best of {rec.get('n_candidates', 4)} by the verifier | target |",
        "|---|---|---:|---:|---:|",
    ]
    for key, (what, held, target) in TARGETS.items():
        value = u.get(key, g.get(key))
        if value is None:
            continue
        best = g.get(f"{key}_reranked")
        ok = "" if value >= target or (best is not None and best >= target) else " (not met)"
        lines.append(f"| {what} | {held} | {_pct(value)} | {'' if best is None else _pct(best)} | "
                     f"{_pct(target)}{ok} |")  # fmt: skip
    b = report.bundle
    if b is not None:
        lines += [
            "",
            f"ONNX bundle (`press-play export --model FOLDER --format omni`, {b['weights']} decoder): "
            f"{b['bytes'] / 2**20:.1f} MiB in all. OmniRuntime (ONNX Runtime, no torch) on "
            f"{m['threads']} threads, median (min–max) of {report.config.rounds} calls after a warm-up:",
            "",
            "| task | ms |",
            "|---|---:|",
        ]
        for name, t in b["latency"].items():
            lines.append(f"| {name} | {t['median_ms']:.1f} ({t['min_ms']:.1f}–{t['max_ms']:.1f}) |")
    lines += [
        "",
        f"Video -> text, separately: digit {_pct(u['video_to_text_digit'])}, direction "
        f"{_pct(u['video_to_text_direction'])}, the word said in the sound track {_pct(u['video_to_text_spoken_word'])}; "
        f"speech -> text sequences exactly right {_pct(u['speech_to_text_exact'])}; text -> video clips right in "
        f"every frame {_pct(g['text_to_video_clips'])}. Understanding answers are greedy; generation samples at "
        f"temperature {rec.get('temperature', 1.0):g} with classifier-free guidance {_guidance(rec.get('guidance', 1.0))} "
        "(1: none).",
        f"<!-- bench:{SECTION}:end -->",
        "",
    ]
    return "\n".join(lines)


def _guidance(g: Any) -> str:
    """The recipe's guidance: one scale, or one per output modality ([[modality, scale], ...])."""
    if isinstance(g, list | tuple):
        return ", ".join(f"{scale:g} for {modality}" for modality, scale in g)
    return f"{g:g}"
