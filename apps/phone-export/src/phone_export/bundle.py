"""A built model as a bundle for a phone app: the model in the platform's formats, the tokenizer, the chat
template, a manifest, a memory budget report and a dashboard, verified on this machine first.

BUILD_DIR is an export folder from `press-play export` (its manifest names the source model, the
quantization and the KV cache). Formats:
- Android: `ort` (ONNX Runtime Mobile's format, from the build's ONNX graph) and `pte` (ExecuTorch, XNNPACK).
- iOS: `mlpackage` (Core ML, 4-bit block-wise or float16 weights, the KV cache as state) and `pte`.
Each runnable file is opened by the runtime library the phone links (onnxruntime, executorch.runtime),
in a process of its own, and generates greedily after a prompt from the default text; the PyTorch model
generates the same. Float formats must give identical tokens; quantized ones a perplexity within 1% of
the PyTorch model's. A Core ML package cannot run off macOS: here it is validated structurally (inputs,
outputs, states, operator types, weight bytes), on macOS it is run as well.

The bundle is written under a temporary name and renamed only when every check passed.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omni_export.budget import MemoryBudget
from omni_export.errors import ExportError
from omni_model.files import read_json, writing_dir

FORMAT, VERSION, MANIFEST = "omnicoder-bundle", 1, "manifest.json"
PLATFORMS = {"android": ("ort", "pte"), "ios": ("mlpackage", "pte")}
RUNTIMES = {"ort": "ONNX Runtime Mobile (ORT format)", "pte": "ExecuTorch (XNNPACK)",
            "mlpackage": "Core ML (ML Program)"}  # fmt: skip
PATHS = {"ort": "onnx/model.ort", "pte": "executorch/model.pte", "mlpackage": "coreml/model.mlpackage"}
Progress = Callable[[str, int, int], None]


class BundleError(ExportError):
    """The build folder, the options or a check stop the bundle."""


@dataclass(frozen=True)
class BundleConfig:
    platform: str  # android | ios
    formats: tuple[str, ...] = ()  # empty: every format of the platform
    budget_bytes: int = 2 * 10**9
    context: int | None = None  # KV cache length the app will use (None: the build's max_seq_len)
    verify_tokens: int = 32
    # Quantized formats: perplexity over this many tokens of the default text, in windows of up to 512.
    # Fewer are too noisy for a 1% check: on SmolLM2 int4 the ONNX graph is +0.01% over 4096 tokens
    # but +1.12% over 1024 in 256-token windows.
    ppl_tokens: int = 4096
    ppl_tolerance: float = 0.01
    threads: int = 2

    def __post_init__(self) -> None:
        if self.platform not in PLATFORMS:
            raise BundleError(f"platform must be android or ios, got {self.platform!r}")
        allowed = PLATFORMS[self.platform]
        for f in self.formats:
            if f not in RUNTIMES:
                raise BundleError(f"format {f!r}: unknown (formats: {', '.join(RUNTIMES)})")
            if f not in allowed:
                name = {"android": "Android", "ios": "iOS"}[self.platform]
                raise BundleError(f"format {f!r}: {name} cannot run it ({name} runs: {', '.join(allowed)})")
        if self.context is not None and self.context < 2:
            raise BundleError(f"context must be at least 2 tokens, got {self.context}")

    @property
    def chosen(self) -> tuple[str, ...]:
        return self.formats or PLATFORMS[self.platform]


def read_build(build_dir: Path) -> dict[str, Any]:
    path = build_dir / MANIFEST
    if not build_dir.is_dir():
        raise BundleError(f"{build_dir}: no such folder")
    if not path.is_file():
        raise BundleError(f"{build_dir}: no {MANIFEST} (not a build folder; make one with press-play export)")
    m = read_json(path, BundleError)
    if not isinstance(m, dict) or m.get("format") != "omnicoder-onnx":
        raise BundleError(f"{path}: not a build manifest (press-play export writes format 'omnicoder-onnx')")
    for key in ("source", "config", "quantization", "kv", "max_seq_len", "graph"):
        if key not in m:
            raise BundleError(f"{path}: lacks the field {key!r}")
    return m


def _quantized(build: dict[str, Any]) -> bool:
    return build["quantization"]["weights"] in ("int4", "int8")


def build_bundle(build_dir: str | Path, out: str | Path, config: BundleConfig,
                 on_progress: Progress | None = None) -> dict[str, Any]:  # fmt: skip
    """Write the bundle folder `out` for `config.platform`; returns its manifest."""
    import omni_model

    build_dir, out = Path(build_dir), Path(out)
    report = on_progress or (lambda what, done, total: None)
    build = read_build(build_dir)
    context = config.context or build["max_seq_len"]
    if context > build["config"]["max_seq_len"]:
        raise BundleError(
            f"context {context}: the model serves at most {build['config']['max_seq_len']} tokens"
        )
    kv_per_token = int(build["kv"]["bytes_per_token"])
    # A first check before anything is built: the build's weights and the cache, no runtime overhead yet.
    MemoryBudget(
        "the build's weights", config.budget_bytes, int(build["weight_bytes"]), kv_per_token, context
    ).check()
    steps = 3 + 2 * len(config.chosen)
    report("loading the model", 0, steps)
    try:
        lm = omni_model.load(build["source"], fuse=False)
    except Exception as e:
        raise BundleError(
            f"{build_dir / MANIFEST}: its source {build['source']!r} cannot be loaded: {e}"
        ) from None
    quantized = _quantized(build)
    models: dict[str, dict[str, Any]] = {}
    with writing_dir(out, marker=MANIFEST, what="a bundle", error=BundleError) as tmp:
        for i, fmt in enumerate(config.chosen):
            report(f"writing {RUNTIMES[fmt]}", 1 + i, steps)
            models[fmt] = _write_format(fmt, build_dir, build, lm, tmp, context, quantized)
        tokenizer = _copy_tokenizer(build_dir, build, tmp)
        reference = _reference(lm, config, quantized, context)
        for i, fmt in enumerate(config.chosen):
            report(f"verifying {RUNTIMES[fmt]}", 1 + len(config.chosen) + i, steps)
            models[fmt]["verification"] = _verify(fmt, tmp, models[fmt], reference, config, quantized, lm)
            budget = MemoryBudget(f"{PATHS[fmt]} ({models[fmt]['weights']})", config.budget_bytes,
                                  models[fmt]["weights_bytes"], kv_per_token if fmt == "ort" else models[fmt]["kv_bytes_per_token"],
                                  context, *_overhead(models[fmt]))  # fmt: skip
            models[fmt]["budget"] = budget.as_dict()
        report("checking", steps - 2, steps)
        failed = [
            f"{fmt}: {m['verification']['reason']}"
            for fmt, m in models.items()
            if not m["verification"]["passed"]
        ]
        if failed:
            raise BundleError(f"host verification failed: {'; '.join(failed)}")
        for m in models.values():
            MemoryBudget(**{k: m["budget"][k] for k in MemoryBudget.__dataclass_fields__}).check()
        manifest = {
            "format": FORMAT, "version": VERSION, "platform": config.platform,
            "created": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "source": build["source"],
            "build": str(build_dir), "config": build["config"], "quantization": build["quantization"],
            "kv": build["kv"] | {"context": context}, "context": context, "budget_bytes": config.budget_bytes,
            "models": models, "tokenizer": tokenizer, "reference": reference["description"],
            "sidecars": [s for s in [build["kv"].get("calibration")] if s],
        }  # fmt: skip
        for sidecar in manifest["sidecars"]:
            shutil.copy2(build_dir / sidecar, tmp / sidecar)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        from phone_export.dashboard import render

        (tmp / "dashboard.html").write_text(render(manifest), encoding="utf-8")
        report("done", steps, steps)
    return manifest


def _write_format(fmt: str, build_dir: Path, build: dict[str, Any], lm: Any, tmp: Path, context: int,
                  quantized: bool) -> dict[str, Any]:  # fmt: skip
    if fmt == "ort":
        from omni_export.ort_format import convert_to_ort

        m = convert_to_ort(build_dir, tmp / "onnx", arm=True)
        return {"path": PATHS[fmt], "runtime": RUNTIMES[fmt], "weights": build["quantization"]["weights"],
                "file_bytes": m["file_bytes"], "weights_bytes": m["file_bytes"],
                "kv_bytes_per_token": int(build["kv"]["bytes_per_token"]),
                "operators_config": "onnx/required_operators.config"}  # fmt: skip
    if fmt == "pte":
        from omni_export.executorch import ExecuTorchConfig, export_executorch

        weights = "int4" if quantized else "float32"
        # From the source, not the loaded model: a GGUF's 4-bit blocks then carry over unchanged.
        m = export_executorch(build["source"], tmp / "executorch", ExecuTorchConfig(weights=weights,
                              max_seq_len=context, prefill_chunk=min(128, context), parity_decode_tokens=0))  # fmt: skip
        return {"path": PATHS[fmt], "runtime": RUNTIMES[fmt], "weights": weights, "file_bytes": m["file_bytes"],
                "weights_bytes": m["file_bytes"], "kv_bytes_per_token": m["kv"]["bytes_per_token"],
                "quantization": m["quantization"]}  # fmt: skip
    from omni_export.coreml import CoreMLConfig, export_coreml, validate_coreml

    cm_config = CoreMLConfig(weights="int4" if quantized else "float16", max_seq_len=context)
    path = tmp / PATHS[fmt]
    path.parent.mkdir(parents=True, exist_ok=True)
    summary = export_coreml(lm, path, cm_config)
    structure = validate_coreml(path, lm.config, cm_config)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return {"path": PATHS[fmt], "runtime": RUNTIMES[fmt], "weights": cm_config.weights, "file_bytes": size,
            "weights_bytes": size, "kv_bytes_per_token": _coreml_kv_per_token(summary, lm.config),
            "structure": structure}  # fmt: skip


def _coreml_kv_per_token(summary: dict[str, Any], cfg: Any) -> int:
    width = 2 if summary.get("cache_dtype", "float16") == "float16" else 4
    return 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_size * width


def _copy_tokenizer(build_dir: Path, build: dict[str, Any], tmp: Path) -> dict[str, Any]:
    files = [
        f for f in build.get("tokenizer", {}).get("files", []) if "/" not in f and (build_dir / f).is_file()
    ]
    if "tokenizer.json" not in files:
        raise BundleError(f"{build_dir}: no tokenizer.json (the build folder is incomplete)")
    for f in files:
        shutil.copy2(build_dir / f, tmp / f)
    from omni_model.tokenizer import Tokenizer

    tok = Tokenizer.from_hf_folder(build_dir)
    (tmp / "chat_template.jinja").write_text(tok.chat_template, encoding="utf-8")
    return {"files": files, "chat_template": "chat_template.jinja", "eos_token_ids": sorted(tok.eos_token_ids),
            "bos_token_id": tok.bos_token_id}  # fmt: skip


def _reference(lm: Any, config: BundleConfig, quantized: bool, context: int) -> dict[str, Any]:
    """What the PyTorch model does on the verification inputs: greedy tokens, and perplexity for 4-bit."""
    from omni_model.corpus import text_path
    from omni_model.sampling_config import SamplingConfig
    from omni_runtime.generate import generate
    from omni_runtime.perplexity import perplexity
    from omni_runtime.torch_engine import TorchEngine

    text = text_path("hamlet").read_text(encoding="utf-8")
    ids = lm.tokenizer.encode(text[: 20 * config.ppl_tokens])
    prompt = ids[: min(32, context - config.verify_tokens - 1)]
    if len(prompt) < 1:
        raise BundleError(f"context {context} is too short to verify {config.verify_tokens} generated tokens")
    engine = TorchEngine(lm)
    cfg = SamplingConfig(temperature=0.0, max_new_tokens=config.verify_tokens, stop_token_ids=frozenset())
    out: dict[str, Any] = {"prompt": prompt, "context": context, "tokens": list(generate(engine, prompt, cfg).token_ids),
                           "description": "omni_model PyTorch decoder, float32, greedy"}  # fmt: skip
    if quantized:
        ppl_ids = ids[: config.ppl_tokens]
        window = min(512, context)
        out |= {
            "ppl_ids": ppl_ids,
            "ppl_context": window,
            "perplexity": perplexity(engine, ppl_ids, window).ppl,
        }
    return out


def _verify(fmt: str, tmp: Path, model: dict[str, Any], reference: dict[str, Any], config: BundleConfig,
            quantized: bool, lm: Any) -> dict[str, Any]:  # fmt: skip
    if fmt == "mlpackage":
        if sys.platform != "darwin":
            return {"passed": True, "ran": False, "how": "structural validation (Core ML predicts on macOS only)",
                    "structure": model.get("structure")}  # fmt: skip
        from omni_export.coreml import predict_parity

        parity = predict_parity(tmp / PATHS[fmt], lm, reference["prompt"])
        return {
            "passed": bool(parity.get("passed", True)),
            "ran": True,
            "how": "Core ML prediction",
            **parity,
        }
    from omni_runtime.engine import EngineError
    from omni_runtime.host_run import host_run

    request = {"format": fmt, "path": str(tmp / Path(PATHS[fmt]).parent), "threads": config.threads,
               "context": reference["context"],
               "prompt": reference["prompt"], "new_tokens": config.verify_tokens,
               "ppl_ids": reference.get("ppl_ids"), "ppl_context": reference.get("ppl_context")}  # fmt: skip
    try:
        got = host_run(request)
    except EngineError as e:
        raise BundleError(f"{PATHS[fmt]}: {str(e).split(': ', 1)[-1]}") from None
    same = got["tokens"] == reference["tokens"]
    first = next(
        (i for i, (a, b) in enumerate(zip(got["tokens"], reference["tokens"], strict=False)) if a != b), None
    )
    result = {"ran": True, "how": f"{RUNTIMES[fmt]} on this host, {config.threads} threads",
              "tokens_identical": same, "first_difference": first, "generated": len(got["tokens"]),
              "decode_tok_s": got["decode_tok_s"], "prefill_tok_s": got["prefill_tok_s"],
              "peak_rss": got["peak_rss"], "baseline_rss": got["baseline_rss"],
              "tokens_held": got["tokens_held"]}  # fmt: skip
    if quantized:
        delta = got["perplexity"] / reference["perplexity"] - 1
        passed = abs(delta) <= config.ppl_tolerance
        result |= {"perplexity": got["perplexity"], "reference_perplexity": reference["perplexity"],
                   "perplexity_delta": delta, "passed": passed,
                   "reason": f"perplexity {got['perplexity']:.3f} vs PyTorch {reference['perplexity']:.3f} "
                             f"({delta:+.2%}, tolerance {config.ppl_tolerance:.0%})"}  # fmt: skip
    else:
        result |= {"passed": same, "reason": "greedy tokens identical to PyTorch" if same
                   else f"greedy tokens differ from PyTorch from token {first}"}  # fmt: skip
    return result


def _overhead(model: dict[str, Any]) -> tuple[int, bool]:
    """Runtime overhead measured by the host run (omni_export.budget.runtime_overhead)."""
    from omni_export.budget import runtime_overhead

    v = model.get("verification", {})
    if not v.get("ran") or "peak_rss" not in v:
        return 0, False
    return runtime_overhead(v["peak_rss"] - v["baseline_rss"], model["weights_bytes"], model["kv_bytes_per_token"],
                            v["tokens_held"]), True  # fmt: skip


def read_bundle(folder: str | Path) -> dict[str, Any]:
    """A bundle's manifest, checked for what push and a reader need."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise BundleError(f"{folder}: no {MANIFEST} (not a bundle; make one with phone-export android|ios)")
    m = read_json(path, BundleError)
    if not isinstance(m, dict) or m.get("format") != FORMAT or m.get("platform") not in PLATFORMS:
        raise BundleError(f"{path}: not a bundle manifest (format is not {FORMAT!r})")
    return m
