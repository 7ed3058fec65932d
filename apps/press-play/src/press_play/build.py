"""`press-play build`: a checkpoint in; out, a build a phone runs, with proof it is the same model and
figures for how fast it is.

Stages (each a call into the packages; this module composes them, caches them and writes the report):
1. resolve   the model (zoo name, folder or GGUF) and the sha256 of its files;
2. export    one per format of the profile: omni_export's ONNX graph, ExecuTorch program, Core ML package,
             at the profile's weights, KV cache and context;
3. reference the PyTorch model on the default text: greedy tokens and perplexity;
4. validate  each format in the runtime a phone links, in a process of its own (omni_runtime.host_run):
             greedy tokens and, for float16/int8/int4 weights, perplexity against the reference; float32
             also by the logits difference its export measured; Core ML structurally off macOS. Then the
             memory budget: weights + KV cache at the context + the runtime memory the host run measured;
5. bench     prefill and decode tokens/s and peak RSS of each runnable format by the protocol of
             `just bench --suite onnx` (press_play.bench_onnx_worker, fresh processes, medians), llama.cpp
             on the same GGUF when the benchmark-only peer environment exists, and the profile's
             speculative proposer against plain decoding;
6. report    report.json, report.md and dashboard.html.
A failed check fails the build with its figure and threshold (the report is still written), unless
`allow_fail` names it: `onnx.parity`, `coreml.budget`, or `parity` / `budget` for every format.
"""

from __future__ import annotations

import errno
import json
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omni_model.errors import OmniError
from omni_model.files import file_sha256, write_text_atomic
from omni_model.zoo import DEFAULT_MODEL
from press_play.build_profile import QUANTIZED, FormatSpec, Profile
from press_play.build_store import BuildError, Event, OnEvent, Store, digest, remove_leftovers
from press_play.common import installed_versions

REPORT_FORMAT, REPORT_VERSION = "omnicoder-build", 1
TEXT = "hamlet"
RUNTIMES = {"onnx": "ONNX Runtime", "executorch": "ExecuTorch (XNNPACK)", "coreml": "Core ML"}
BENCH_ENGINES = {"onnx": "omnicoder-onnx", "executorch": "executorch"}  # bench_onnx_worker's names
CHECKS = ("parity", "budget")


@dataclass(frozen=True)
class BuildConfig:
    profile: Profile
    out: Path
    model: str = DEFAULT_MODEL
    force: bool = False
    dry_run: bool = False
    allow_fail: tuple[str, ...] = ()  # check names: FORMAT.parity, FORMAT.budget, parity, budget
    threads: int = 2
    peer_python: str | None = None  # llama.cpp's environment; None: .venv-peers/bin/python if present
    # the omni-* packages' versions and a hash of their code: part of every stage's key, so new code rebuilds
    versions: dict[str, str] = field(
        default_factory=lambda: dict(installed_versions()) | {"code": code_digest()}
    )

    def __post_init__(self) -> None:
        known = set(CHECKS) | {f"{f}.{c}" for f in self.profile.formats for c in CHECKS}
        for name in self.allow_fail:
            if name not in known:
                raise BuildError(f"--allow-fail {name}: no such check (checks: {', '.join(sorted(known))})")


CODE = ("omni_kernels", "omni_kv", "omni_model", "omni_export", "omni_runtime", "press_play")


def code_digest() -> str:
    """sha256 over the Python sources of the packages a build runs (a version number does not change
    while a package is developed; its code does)."""
    import hashlib
    import importlib.util

    h = hashlib.sha256()
    for name in CODE:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            continue
        root = Path(spec.origin).parent
        for f in sorted(root.rglob("*.py")):
            h.update(str(f.relative_to(root)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()


@contextmanager
def _disk_errors(out: Path) -> Iterator[None]:
    """A full disk or a read-only folder is one line naming the build folder, not a traceback."""
    try:
        yield
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise BuildError(
                f"{out}: no space left on the device ({e.filename or 'writing the build'})"
            ) from None
        if e.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
            raise BuildError(f"{out}: cannot write there: {e.strerror}") from None
        raise


def _source_digest(path: Path) -> str:
    """sha256 over the source's files (a GGUF; a folder's config, tokenizer and weight files)."""
    if path.is_file():
        return file_sha256(path)
    files = sorted(
        p for p in path.iterdir() if p.is_file() and p.suffix in (".json", ".safetensors", ".model", ".txt")
    )
    return digest([(p.name, file_sha256(p)) for p in files])


def output_dir(model: str, profile: str) -> Path:
    """The default build folder: build/MODEL/PROFILE under the current folder."""
    return Path("build") / Path(model).stem / profile


class _Model:
    """The PyTorch model, loaded once and only when a stage needs it."""

    def __init__(self, source: str) -> None:
        self.source, self._lm = source, None

    def release(self) -> None:
        import gc

        self._lm = None
        gc.collect()

    def get(self):
        if self._lm is None:
            import omni_model

            self._lm = omni_model.load(self.source, fuse=False)
        return self._lm


def expected_bytes(lm: Any, fmt: str, spec: FormatSpec) -> int:
    """About how many bytes a format's weights take, for the dry run's plan (the report has the real
    sizes). ONNX and ExecuTorch: 4/8-bit blocks with a float32 scale and a zero point per block for the
    projections, 8 bits and a scale per row for the embedding and the head (also when tied); Core ML:
    4-bit blocks with a float16 scale for every matrix; float16/float32: 2 or 4 bytes per value."""
    total, tied = 0, bool(getattr(lm.config, "tie_embeddings", False))
    for name, p in lm.model.named_parameters():
        n = p.numel()
        if p.ndim < 2:
            total += 4 * n
        elif spec.weights == "int4" and fmt == "coreml":
            total += int(n * (4 + 16 / spec.block_size) / 8)
        elif spec.weights in QUANTIZED and "embed" in name:
            total += (n + 4 * p.shape[0]) * (2 if tied else 1)
        elif spec.weights in QUANTIZED:
            bits = 4 if spec.weights == "int4" else 8
            total += int(n * (bits + (32 + bits) / spec.block_size) / 8)
        else:
            total += n * (2 if spec.weights == "float16" else 4)
    return total


def _kv_planned(cfg: Any, kv: str) -> int:
    if kv == "int8":
        from omni_kv import CacheSpec

        return int(CacheSpec("int8").bytes_per_token(cfg.n_layers, cfg.n_kv_heads, cfg.head_size))
    return cfg.kv_bytes_per_token(4)


def _kv_per_token(fmt: str, manifest: dict[str, Any], cfg: Any) -> int:
    if fmt == "coreml":
        return 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_size * 2  # Core ML states are float16
    return int(manifest["kv"]["bytes_per_token"])


def build(config: BuildConfig, on_event: OnEvent | None = None) -> dict[str, Any]:
    """Run the pipeline into `config.out`; return the report (also written there). In a dry run, return
    the plan: the stages, whether each would be reused, the formats and their expected sizes.

    torch runs on `config.threads` for the whole build (and is set back after): the export's parity
    figures are part of its manifest, which later stages' keys hash, and float sums differ with the
    thread count, so a rebuilt stage must not depend on what the calling process last set."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        return _build(config, on_event)
    finally:
        torch.set_num_threads(before)


def _build(config: BuildConfig, on_event: OnEvent | None) -> dict[str, Any]:
    out, profile = Path(config.out), config.profile
    emit = on_event or (lambda event: None)
    if out.exists() and not out.is_dir():
        raise BuildError(f"{out}: is a file, not a folder (choose another --out)")
    t_start = time.perf_counter()
    # 1. resolve: bad input stops the build here, before anything is written
    from omni_model.loader import load_config, resolve_source

    path = resolve_source(config.model)
    source = {"model": config.model, "path": str(path.resolve()), "sha256": _source_digest(path)}
    model = _Model(config.model)  # loaded only when a stage that needs it runs
    cfg = load_config(config.model)
    if profile.context > cfg.max_seq_len:
        raise BuildError(f"{profile.path}: context {profile.context} exceeds what {config.model} serves "
                         f"({cfg.max_seq_len} tokens)")  # fmt: skip
    emit(Event("resolve", "done", detail=source["path"], seconds=time.perf_counter() - t_start))
    with _disk_errors(out):
        if not config.dry_run:
            out.mkdir(parents=True, exist_ok=True)
            remove_leftovers(out)
        store = Store(out, force=config.force, dry_run=config.dry_run, on_event=on_event)
        keys = _Inputs(config, source, store)
        if config.dry_run:
            return _plan(config, store, keys, model)

        # 2. export
        manifests = {fmt: store.run(f"export-{fmt}", keys.export(fmt), _exporter(fmt, spec, profile, config, model, out),
                                    outputs=(fmt,)) for fmt, spec in profile.formats.items()}  # fmt: skip

        # 3. reference
        reference = store.run(
            "reference", keys.reference(), lambda progress: _reference(model, profile, progress)
        )

        # 4. validate
        validation = {fmt: store.run(f"validate-{fmt}", keys.validate(fmt), lambda progress, fmt=fmt: _validate(
                          fmt, profile, manifests[fmt], reference, out, model, config.threads, progress))
                      for fmt in profile.formats}  # fmt: skip
        formats = {fmt: _format_report(fmt, profile, manifests[fmt], validation[fmt], reference, cfg, out)
                   for fmt in profile.formats}  # fmt: skip
        checks = _checks(formats, config.allow_fail)
        failed = [c for c in checks if not c["passed"] and not c["allowed"]]

        # 5. bench (only a build whose checks passed is worth timing)
        peers: dict[str, Any] = {}
        if not failed:
            model.release()  # the timed processes get the machine's memory and caches to themselves
            for fmt in _benched(profile):
                formats[fmt]["bench"] = store.run(f"bench-{fmt}", keys.bench(f"export-{fmt}"), lambda progress, fmt=fmt: _bench(
                    BENCH_ENGINES[fmt], sys.executable, str(out / fmt), profile, reference, config.threads, progress, fmt))  # fmt: skip
            from press_play.bench_onnx import peer_python

            peer = peer_python(config.peer_python)
            if path.suffix == ".gguf" and peer and profile.bench.llama_cpp:
                peers["llama.cpp"] = store.run("bench-llama.cpp", keys.bench(None), lambda progress: _bench(
                    "llama.cpp", peer, str(path.resolve()), profile, reference, config.threads, progress))  # fmt: skip
                peers["llama.cpp"]["file_bytes"] = path.stat().st_size
            elif path.suffix == ".gguf" and profile.bench.llama_cpp:
                peers["llama.cpp"] = {
                    "skipped": "no benchmark-only peer environment (.venv-peers; see README)"
                }

        # 6. report
        emit(Event("report", "start"))
        report = {
            "format": REPORT_FORMAT, "version": REPORT_VERSION, "status": "failed" if failed else "passed",
            "created": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "out": str(out),
            "source": source, "profile": profile.as_dict(), "budget_bytes": profile.budget_bytes,
            "versions": config.versions, "machine": keys.machine, "config": {k: getattr(cfg, k) for k in ("n_layers", "dim", "n_heads", "n_kv_heads",
                                                                        "vocab_size", "max_seq_len")},
            "reference": {k: v for k, v in reference.items() if k not in ("prompt", "tokens", "ppl_ids")},
            "formats": formats, "peers": peers, "checks": checks,
            "stages": store.status, "seconds": round(time.perf_counter() - t_start, 1),
            "commands": _commands(config, out, profile),
        }  # fmt: skip
        _write_report(out, report)
        emit(Event("report", "done", detail=str(out / "report.md")))
    if failed:
        first = failed[0]
        more = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
        raise BuildError(f"check {first['name']} failed: {first['detail']}{more}; report: {out / 'report.md'}; "
                         f"--allow-fail {first['name']} builds anyway")  # fmt: skip
    return report


def _exporter(fmt: str, spec: FormatSpec, profile: Profile, config: BuildConfig, model: _Model, out: Path):
    def make(progress) -> dict[str, Any]:
        if fmt == "onnx":
            from omni_export.export import ExportConfig, export_onnx

            cfg = ExportConfig(weights=spec.weights, block_size=spec.block_size, max_seq_len=profile.context,  # type: ignore[arg-type]
                               kv=profile.kv)  # type: ignore[arg-type]  # fmt: skip
            return export_onnx(config.model, out / fmt, cfg, progress)
        if fmt == "executorch":
            from omni_export.executorch import ExecuTorchConfig, export_executorch

            et = ExecuTorchConfig(weights=spec.weights, group_size=spec.block_size, max_seq_len=profile.context,  # type: ignore[arg-type]
                                  prefill_chunk=min(128, profile.context))  # fmt: skip
            return export_executorch(config.model, out / fmt, et, progress)
        from omni_export.coreml import CoreMLConfig, export_coreml, validate_coreml
        from omni_model.files import writing_dir

        cm = CoreMLConfig(weights=spec.weights, block_size=spec.block_size, max_seq_len=profile.context)  # type: ignore[arg-type]
        lm = model.get()
        with writing_dir(out / fmt, marker="manifest.json", what="a Core ML build", error=BuildError) as tmp:
            summary = export_coreml(lm, tmp / "model.mlpackage", cm, progress)
            structure = validate_coreml(tmp / "model.mlpackage", lm.config, cm)
            size = sum(f.stat().st_size for f in (tmp / "model.mlpackage").rglob("*") if f.is_file())
            manifest = {"format": "omnicoder-coreml", "package": "model.mlpackage", "source": str(config.model),
                        "weights": spec.weights, "file_bytes": size, "max_seq_len": min(profile.context, lm.config.max_seq_len),
                        "summary": summary, "structure": structure}  # fmt: skip
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, default=str), encoding="utf-8")
        return manifest

    return make


def _text_ids(lm: Any) -> list[int]:
    from omni_model.corpus import text_path

    return lm.tokenizer.encode(text_path(TEXT).read_text(encoding="utf-8"))


def _reference(model: _Model, profile: Profile, progress) -> dict[str, Any]:
    """The PyTorch model on what every format is held to: greedy tokens after the start of the text,
    and perplexity on its first `ppl_tokens` tokens (as `press-play eval perplexity` scores it)."""
    from omni_model.sampling_config import SamplingConfig
    from omni_runtime.generate import generate
    from omni_runtime.perplexity import perplexity
    from omni_runtime.torch_engine import TorchEngine

    v = profile.validate
    lm = model.get()
    ids = _text_ids(lm)
    if len(ids) < v.ppl_tokens:
        raise BuildError(f"{TEXT}: {len(ids)} tokens, fewer than validate.ppl_tokens = {v.ppl_tokens}")
    # A prompt as long as an app's (up to 512 tokens): the host runs' peak memory then includes its prefill.
    prompt = ids[: max(1, min(512, profile.context - v.greedy_tokens - 1))]
    engine = TorchEngine(lm)
    progress("greedy tokens", 0, 2)
    cfg = SamplingConfig(temperature=0.0, max_new_tokens=v.greedy_tokens, stop_token_ids=frozenset())
    tokens = list(generate(engine, prompt, cfg).token_ids)
    progress("perplexity", 1, 2)
    window = min(v.ppl_context, profile.context)
    ppl = perplexity(engine, ids[: v.ppl_tokens], window).ppl
    return {"description": "omni_model PyTorch decoder, float32", "text": TEXT, "prompt": prompt, "tokens": tokens,
            "ppl_ids": ids[: v.ppl_tokens], "ppl_context": window, "ppl_tokens": v.ppl_tokens, "perplexity": ppl}  # fmt: skip


def _validate(fmt: str, profile: Profile, manifest: dict[str, Any], reference: dict[str, Any], out: Path,
              model: _Model, threads: int, progress) -> dict[str, Any]:  # fmt: skip
    """One format against the reference, run by its runtime on this host where it can run."""
    if fmt == "coreml":
        if sys.platform == "darwin":
            from omni_export.coreml import predict_parity

            progress("Core ML prediction", 0, 1)
            parity = predict_parity(out / fmt / "model.mlpackage", model.get(), reference["prompt"])
            return {"ran": True, "how": "Core ML prediction on macOS", **parity}
        return {"ran": False, "how": "structural validation (Core ML predicts on macOS and iOS only): "
                + ", ".join(f"{k} {v}" for k, v in _structure_summary(manifest["structure"]).items())}  # fmt: skip
    from omni_runtime.host_run import host_run

    v = profile.validate
    progress(f"{RUNTIMES[fmt]}: greedy tokens and perplexity", 0, 1)
    got = host_run({"format": fmt, "path": str(out / fmt), "threads": threads, "context": profile.context,
                    "prompt": reference["prompt"], "new_tokens": v.greedy_tokens,
                    "ppl_ids": reference["ppl_ids"], "ppl_context": reference["ppl_context"]})  # fmt: skip
    first = next(
        (i for i, (a, b) in enumerate(zip(got["tokens"], reference["tokens"], strict=False)) if a != b), None
    )
    return {"ran": True, "how": f"{RUNTIMES[fmt]} on this host, {threads} threads",
            "tokens_identical": got["tokens"] == reference["tokens"], "first_difference": first,
            "perplexity": got["perplexity"], "peak_rss": got["peak_rss"], "baseline_rss": got["baseline_rss"],
            "tokens_held": got["tokens_held"],
            "decode_tok_s": got["decode_tok_s"], "prefill_tok_s": got["prefill_tok_s"]}  # fmt: skip


def _structure_summary(structure: dict[str, Any]) -> dict[str, Any]:
    keep = ("states", "int4_linears", "weight_bytes", "ops")
    return {k: (len(v) if isinstance(v, list | dict) else v) for k, v in structure.items() if k in keep}


def _format_report(fmt: str, profile: Profile, manifest: dict[str, Any], val: dict[str, Any],
                   reference: dict[str, Any], cfg: Any, out: Path) -> dict[str, Any]:  # fmt: skip
    """A format's figures and its two checks (parity, budget)."""
    from omni_export.budget import MemoryBudget, runtime_overhead

    spec = profile.formats[fmt]
    v = profile.validate
    lossy = spec.weights != "float32"
    if not val.get("ran"):
        parity = {"passed": True, "ran": False, "detail": val["how"]}
    elif "perplexity" in val and reference.get("perplexity"):
        delta = val["perplexity"] / reference["perplexity"] - 1
        tokens = (
            "identical" if val.get("tokens_identical") else f"differ from token {val.get('first_difference')}"
        )
        parity = {"ran": True, "perplexity": val["perplexity"], "reference_perplexity": reference["perplexity"],
                  "perplexity_delta": delta, "tokens_identical": val.get("tokens_identical"),
                  "detail": f"perplexity {val['perplexity']:.3f} vs PyTorch {reference['perplexity']:.3f} "
                            f"({delta:+.2%}; tolerance {v.ppl_tolerance:.0%}); greedy tokens {tokens}"}  # fmt: skip
        if lossy:
            parity["passed"] = abs(delta) <= v.ppl_tolerance
        else:
            logits = _export_logits_diff(manifest)
            parity["max_abs_logits_diff"] = logits
            parity["passed"] = bool(val.get("tokens_identical")) and (
                logits is None or logits <= v.logits_tolerance
            )
            parity["detail"] += (f"; max |logits diff| {logits:.2e} (tolerance {v.logits_tolerance:.0e})"
                                 if logits is not None else "")  # fmt: skip
    else:
        parity = {"ran": True, "passed": bool(val.get("passed", True)), "detail": val.get("how", "")}
    weights_bytes = int(manifest["file_bytes"])
    kv = _kv_per_token(fmt, manifest, cfg)
    overhead, measured = 0, False
    if val.get("ran") and "peak_rss" in val:
        overhead = runtime_overhead(
            val["peak_rss"] - val["baseline_rss"], weights_bytes, kv, val["tokens_held"]
        )
        measured = True
    budget = MemoryBudget(f"{fmt}/ ({spec.weights})", profile.budget_bytes, weights_bytes, kv, profile.context,
                          overhead, measured)  # fmt: skip
    return {"path": str(out / fmt), "runtime": RUNTIMES[fmt], "weights": spec.weights, "file_bytes": weights_bytes,
            "kv_bytes_per_token": kv, "validation": val, "parity": parity,
            "budget": budget.as_dict() | {"detail": budget.describe()}}  # fmt: skip


def _export_logits_diff(manifest: dict[str, Any]) -> float | None:
    p = manifest.get("parity") or {}
    diffs = [p[k] for k in ("max_abs_logits_diff_prefill", "max_abs_logits_diff_decode") if k in p]
    return max(diffs) if diffs else None


def _checks(formats: dict[str, dict[str, Any]], allow_fail: tuple[str, ...]) -> list[dict[str, Any]]:
    checks = []
    for fmt, f in formats.items():
        for name, passed, detail in (("parity", f["parity"]["passed"], f["parity"]["detail"]),
                                     ("budget", f["budget"]["fits"], f["budget"]["detail"])):  # fmt: skip
            full = f"{fmt}.{name}"
            checks.append({"name": full, "passed": bool(passed), "ran": f["parity"].get("ran", True) if name == "parity" else True,
                           "allowed": full in allow_fail or name in allow_fail, "detail": detail})  # fmt: skip
    return checks


def _bench(engine: str, python: str, path: str, profile: Profile, reference: dict[str, Any], threads: int,
           progress, fmt: str | None = None) -> dict[str, Any]:  # fmt: skip
    """`rounds` fresh processes of bench_onnx_worker's speed protocol (as `just bench --suite onnx`), and
    for our formats (`fmt`, as host_run names it) the profile's speculative proposer against plain
    decoding; medians."""
    from press_play.bench_onnx import run_worker

    b = profile.bench
    ids = reference["ppl_ids"]
    if len(ids) < b.prompt_tokens:
        raise BuildError(f"bench.prompt_tokens {b.prompt_tokens} exceeds validate.ppl_tokens {len(ids)}")
    if b.prompt_tokens + b.decode_tokens + 8 > profile.context:
        raise BuildError(f"{profile.path}: bench.prompt_tokens + bench.decode_tokens + 8 exceeds the context "
                         f"({profile.context})")  # fmt: skip
    spec = {"engine": engine, "path": path, "threads": threads, "n_ctx": b.prompt_tokens + b.decode_tokens + 8,
            "prompt_ids": ids[: b.prompt_tokens], "short_ids": ids[: b.short_tokens],
            "decode_tokens": b.decode_tokens, "measure": "speed"}  # fmt: skip
    speculate = profile.speculative != "none" and fmt is not None
    steps = b.rounds * (2 if speculate else 1)
    runs, spec_runs = [], []
    for r in range(b.rounds):
        progress(f"speed, round {r + 1}/{b.rounds}", len(runs) + len(spec_runs), steps)
        runs.append(run_worker(python, spec))
        if speculate:
            from omni_runtime.host_run import host_run

            progress(
                f"{profile.speculative} speculation, round {r + 1}/{b.rounds}",
                len(runs) + len(spec_runs),
                steps,
            )
            got = host_run({"format": fmt, "path": path, "threads": threads, "context": spec["n_ctx"],
                            "prompt": spec["prompt_ids"], "new_tokens": b.decode_tokens,
                            "speculative": profile.speculative})  # fmt: skip
            spec_runs.append({"plain_tok_s": got["decode_tok_s"], **got["speculative"]})

    def med(key: str, rows: list[dict[str, Any]]) -> float:
        return statistics.median(r[key] for r in rows)

    result: dict[str, Any] = {"engine": engine, "rounds": b.rounds, "runs": runs,
              "decode_tok_s_short": med("decode_tok_s_short", runs), "decode_tok_s_long": med("decode_tok_s_long", runs),
              "prefill_tok_s": med("prefill_tok_s", runs), "peak_rss_mb": med("peak_rss_mb", runs),
              "baseline_rss_mb": med("baseline_rss_mb", runs)}  # fmt: skip
    if spec_runs:
        result["speculative"] = {"proposer": profile.speculative, "runs": spec_runs,
                                 "decode_tok_s": med("decode_tok_s", spec_runs),
                                 "plain_decode_tok_s": med("plain_tok_s", spec_runs),
                                 "speedup": statistics.median(r["decode_tok_s"] / r["plain_tok_s"] for r in spec_runs),
                                 "tokens_per_step": med("tokens_per_step", spec_runs),
                                 "tokens_identical": all(r["tokens_identical"] for r in spec_runs)}  # fmt: skip
    return result


def _commands(config: BuildConfig, out: Path, profile: Profile) -> dict[str, str]:
    v = profile.validate
    window = min(v.ppl_context, profile.context)
    cmds = {"rebuild": f"press-play build {config.model} --profile {profile.name} --out {out}",
            "perplexity": f"press-play eval perplexity --model {out / 'onnx'} --context {window} --max-tokens {v.ppl_tokens}",
            "bench": "just bench --suite onnx",
            "generate": f'press-play generate --model {out / "onnx"} "Hello"'}  # fmt: skip
    if profile.speculative != "none":
        cmds["generate"] += f" --speculative {profile.speculative}"
    return cmds


def _benched(profile: Profile) -> list[str]:
    return [f for f in profile.formats if f in BENCH_ENGINES]


class _Inputs:
    """What each stage's key is made of; one definition for the build and its dry run."""

    def __init__(self, config: BuildConfig, source: dict[str, Any], store: Store) -> None:
        from press_play.bench import machine_info

        self.config, self.source, self.store = config, source, store
        self.machine = machine_info(config.threads)

    def export(self, fmt: str) -> dict[str, Any]:
        p = self.config.profile
        spec = p.formats[fmt]
        inputs = {"format": fmt, "weights": spec.weights, "block_size": spec.block_size, "context": p.context}
        if fmt == "onnx":
            inputs["kv"] = p.kv
        return {"source": self.source["sha256"], "export": inputs, "versions": self.config.versions}

    def reference(self) -> dict[str, Any]:
        p = self.config.profile
        return {"source": self.source["sha256"], "validate": p.validate.__dict__, "context": p.context,
                "text": TEXT, "versions": self.config.versions}  # fmt: skip

    def validate(self, fmt: str) -> dict[str, Any]:
        return {"export": self.store.fingerprint(f"export-{fmt}"), "reference": self.store.fingerprint("reference"),
                "threads": self.config.threads, "versions": self.config.versions}  # fmt: skip

    def bench(self, export_stage: str | None) -> dict[str, Any]:
        p = self.config.profile
        subject = self.store.fingerprint(export_stage) if export_stage else self.source["sha256"]
        return {"subject": subject, "reference": self.store.fingerprint("reference"), "bench": p.bench.__dict__,
                "speculative": p.speculative, "threads": self.config.threads, "cpu": self.machine["cpu"],
                "versions": self.config.versions}  # fmt: skip


def _plan(config: BuildConfig, store: Store, keys: _Inputs, model: _Model) -> dict[str, Any]:
    """The stages in order, each "cached" or "to run", and what each format is expected to weigh."""
    profile = config.profile
    lm = model.get()
    noop = lambda progress: {}  # noqa: E731 (a dry run's store never calls it)
    formats = {}
    for fmt, spec in profile.formats.items():
        store.run(f"export-{fmt}", keys.export(fmt), noop, outputs=(fmt,))
        kv_bytes = _kv_per_token(
            fmt, {"kv": {"bytes_per_token": _kv_planned(lm.config, profile.kv)}}, lm.config
        )
        formats[fmt] = {"runtime": RUNTIMES[fmt], "weights": spec.weights, "expected_bytes": expected_bytes(lm, fmt, spec),
                        "kv_bytes": kv_bytes * profile.context,
                        "path": str(config.out / fmt)}  # fmt: skip
    store.run("reference", keys.reference(), noop)
    for fmt in profile.formats:
        store.run(f"validate-{fmt}", keys.validate(fmt), noop)
    for fmt in _benched(profile):
        store.run(f"bench-{fmt}", keys.bench(f"export-{fmt}"), noop)
    stages = {name: s["status"] for name, s in store.status.items()} | {"report": "written"}
    return {"dry_run": True, "model": config.model, "source": keys.source, "profile": profile.as_dict(),
            "budget_bytes": profile.budget_bytes, "out": str(config.out), "formats": formats, "stages": stages}  # fmt: skip


def _write_report(out: Path, report: dict[str, Any]) -> None:
    from press_play.build_report import render_dashboard, render_markdown

    write_text_atomic(out / "report.json", json.dumps(report, indent=1, default=str))
    write_text_atomic(out / "report.md", render_markdown(report))
    write_text_atomic(out / "dashboard.html", render_dashboard(report))


__all__ = ["BuildConfig", "BuildError", "OmniError", "build", "output_dir"]
