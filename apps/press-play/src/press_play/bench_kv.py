"""KV cache kinds on SmolLM2 for BENCHMARKS.md: what each costs in quality, speed and memory.

Quality: perplexity with the cache in the loop. The text goes through the model in chunks, each
chunk attending to what the cache kept of the ones before it (so a quantized cache is read back
quantized, as in generation), in non-overlapping windows of `context` tokens, every token but each
window's first scored. Then one continuous run of `long_tokens` tokens (past the model's trained
context of 8192) for the dense cache, the sink + window cache and a plain window without sinks.

Speed: decode tokens/s with `cached_tokens` tokens in the cache, every kind measured in the same
run: each cache is filled once, then each round decodes `decode_tokens` steps per kind (kinds
alternating) and rolls them back; the median step time of all rounds.

Memory: peak RSS of a process that loads the model and decodes `paged_tokens` tokens one at a time
through the paged cache under a `paged_budget_mb` resident budget, against the same with the dense
cache; each in a fresh process (`python -m press_play.bench_kv SPEC_JSON`).
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from omni_model.zoo import DEFAULT_MODEL

SECTION = "kv"
Progress = Callable[[str, int, int], None]
QUALITY_KINDS = ("dense", "dense:dtype=float16", "int8", "kivi", "nf4")
LONG_KINDS = ("dense", "sink", "window")
# The targets against dense float32: perplexity delta (%) on the windowed run.
TARGETS = {"int8": 0.5, "kivi": 2.0, "nf4": 3.0, "int8 calibrated": 0.5, "nf4 calibrated": 3.0}
SINK_TARGET = 5.0


@dataclass(frozen=True)
class KVBenchConfig:
    model: str = DEFAULT_MODEL
    text: str = "hamlet"
    ppl_tokens: int = 8192
    context: int = 2048
    chunk: int = 128
    long_tokens: int = 10240
    long_chunk: int = 64
    sinks: int = 4
    window: int = 1024
    cached_tokens: int = 4096
    decode_tokens: int = 16
    rounds: int = 3
    threads: int = 2
    paged_budget_mb: float = 16.0
    paged_tokens: int = 4096
    quick: bool = False

    @classmethod
    def quick_config(cls, **overrides: Any) -> KVBenchConfig:
        return cls(**{"ppl_tokens": 256, "context": 128, "chunk": 32, "long_tokens": 384, "long_chunk": 32,
                      "window": 64, "cached_tokens": 256, "decode_tokens": 4, "rounds": 1, "paged_budget_mb": 1.0,
                      "paged_tokens": 96, "quick": True, **overrides})  # fmt: skip


@dataclass
class KVReport:
    config: KVBenchConfig
    machine: dict[str, Any]
    bytes_per_token: dict[str, float] = field(default_factory=dict)
    ppl: dict[str, float] = field(default_factory=dict)  # windowed run
    long_ppl: dict[str, dict[str, float]] = field(default_factory=dict)  # kind -> {"first": ppl, "all": ppl}
    decode_tok_s: dict[str, list[float]] = field(default_factory=dict)  # kind -> per-step rates
    memory: dict[str, dict[str, float]] = field(default_factory=dict)  # kind -> worker result


def _nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), targets, reduction="none")


@torch.inference_mode()
def cached_nll(model, ids: torch.Tensor, spec, context: int, chunk: int) -> torch.Tensor:
    """Per-token NLL (every token but each window's first) with the cache in the loop."""
    out = []
    for s in range(0, ids.numel(), context):
        w = ids[s : s + context]
        cache = model.make_cache(spec=spec)
        for c in range(0, w.numel(), chunk):
            part = w[c : c + chunk]
            logits = model(part[None], cache=cache)[0]  # (T, V)
            targets = w[c + 1 : c + 1 + part.numel()]
            out.append(_nll(logits[: targets.numel()], targets))
        close = getattr(cache, "close", None)
        if close is not None:
            close()
    return torch.cat(out)


@torch.inference_mode()
def decode_rates(model, specs: dict[str, Any], prompt: torch.Tensor, steps: int, rounds: int,
                 report: Callable[[str], None]) -> dict[str, list[float]]:  # fmt: skip
    caches = {}
    for name, spec in specs.items():
        report(f"filling the {name} cache")
        cache = model.make_cache(spec=spec)
        for c in range(0, prompt.numel(), 256):
            model(prompt[None, c : c + 256], cache=cache, last_only=True)
        caches[name] = cache
    rates: dict[str, list[float]] = {name: [] for name in specs}
    token = prompt[-1:][None]
    for r in range(rounds):
        for name in list(specs) if r % 2 == 0 else reversed(list(specs)):
            report(f"decoding: {name}, round {r + 1}/{rounds}")
            cache = caches[name]
            for _ in range(steps):
                t0 = time.perf_counter()
                model(token, cache=cache, last_only=True)
                rates[name].append(1.0 / (time.perf_counter() - t0))
            cache.rollback(steps)
    return rates


def run_kv_bench(config: KVBenchConfig, on_progress: Progress | None = None) -> KVReport:
    import omni_model
    from omni_kv import CacheSpec
    from press_play.bench import machine_info
    from press_play.common import read_text

    report = on_progress or (lambda what, done, total: None)
    torch.set_num_threads(config.threads)
    rep = KVReport(config, machine_info(config.threads))
    lm = omni_model.load(config.model)
    model, cfg = lm.model, lm.config
    ids = torch.tensor(lm.tokenizer.encode(read_text(config.text)))
    need = max(config.ppl_tokens, config.long_tokens, config.cached_tokens)
    if ids.numel() < need:
        raise ValueError(f"{config.text}: {ids.numel()} tokens, fewer than the {need} the benchmark needs")
    dims = (cfg.n_layers, cfg.n_kv_heads, cfg.head_size)
    window = f"window={config.window}"
    specs = {k: CacheSpec.parse(k) for k in QUALITY_KINDS}
    # Calibrated per-token caches, calibrated on the text after the scored part (never on what is scored).
    from omni_kv.calibration import calibrate

    cal_ids = ids[config.ppl_tokens : config.ppl_tokens + 2 * config.context]
    cal_dir = tempfile.mkdtemp(prefix="omni-kv-bench-")
    cal_path = calibrate(model, cal_ids, config.model, context=config.context).save(Path(cal_dir) / "kv.json")
    for k in ("int8", "nf4"):
        specs[f"{k} calibrated"] = CacheSpec.parse(f"{k}:calibration={cal_path}")
    long_specs = {"dense": CacheSpec(), "sink": CacheSpec.parse(f"sink:sinks={config.sinks},{window}"),
                  "window": CacheSpec.parse(f"window:{window}")}  # fmt: skip
    steps = len(specs) + len(long_specs) + 3
    done = 0
    for name, spec in {**specs, **long_specs}.items():
        rep.bytes_per_token[name] = spec.bytes_per_token(*dims)
    for name, spec in specs.items():
        report(f"perplexity: {name}", done, steps)
        nll = cached_nll(model, ids[: config.ppl_tokens], spec, config.context, config.chunk)
        rep.ppl[name] = math.exp(nll.mean().item())
        done += 1
    shutil.rmtree(cal_dir, ignore_errors=True)
    first = min(8192, config.long_tokens) if not config.quick else config.long_tokens // 2
    for name, spec in long_specs.items():
        report(f"continuous run of {config.long_tokens}: {name}", done, steps)
        nll = cached_nll(model, ids[: config.long_tokens], spec, config.long_tokens, config.long_chunk)
        rep.long_ppl[name] = {"first": math.exp(nll[: first - 1].mean().item()), "all": math.exp(nll.mean().item()),
                              "first_tokens": first}  # fmt: skip
        done += 1
    decode_specs = {**{k: v for k, v in specs.items() if "calibrated" not in k}, "sink": long_specs["sink"]}
    rep.decode_tok_s = decode_rates(model, decode_specs, ids[: config.cached_tokens], config.decode_tokens,
                                    config.rounds, lambda what: report(what, done, steps))  # fmt: skip
    done += 1
    del model, lm
    for kind in ("dense", "paged"):
        report(f"peak memory: {kind} cache, {config.paged_tokens} decoded tokens", done, steps)
        rep.memory[kind] = _memory_worker({**asdict(config), "kind": kind})
        done += 1
    report("done", steps, steps)
    return rep


def _memory_worker(spec: dict[str, Any]) -> dict[str, float]:
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"])}
    proc = subprocess.run([sys.executable, "-m", "press_play.bench_kv", json.dumps(spec)], capture_output=True,
                          text=True, env=env, timeout=3600)  # fmt: skip
    if proc.returncode != 0 or not proc.stdout.strip():
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:]) or "no output"
        raise RuntimeError(f"kv memory worker ({spec['kind']}) exited with {proc.returncode}: {tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _release_free_heap() -> None:
    """Give freed heap memory back to the OS (glibc's malloc_trim), so that RSS from here on grows with
    what is allocated, not less because freed memory is reused."""
    import contextlib
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: the figure is then a lower bound
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _rss_kb(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


@torch.inference_mode()
def memory_worker(spec: dict[str, Any]) -> dict[str, float]:
    """Load, note the resident size, decode `paged_tokens` tokens one by one, note the peak."""
    import omni_model
    from omni_kv import PagedKVCache
    from press_play.common import read_text

    torch.set_num_threads(spec["threads"])
    lm = omni_model.load(spec["model"])
    model, cfg = lm.model, lm.config
    ids = lm.tokenizer.encode(read_text(spec["text"]))[: spec["paged_tokens"]]
    model(torch.tensor([ids[:8]]))  # warm-up: first-call allocations are not the cache's
    _release_free_heap()  # loading leaves freed temporaries the allocator would reuse for the cache
    with open("/proc/self/clear_refs", "w") as f:  # restart the peak (VmHWM) here: loading's is not ours
        f.write("5")
    base_kb = _rss_kb("VmRSS")
    budget = int(spec["paged_budget_mb"] * 2**20)
    with tempfile.TemporaryDirectory() as spill:
        if spec["kind"] == "paged":
            cache = PagedKVCache(
                cfg.n_layers, cfg.n_kv_heads, cfg.head_size, budget_bytes=budget, spill_dir=spill
            )
        else:
            cache = model.make_cache()
        t0 = time.perf_counter()
        for t in ids:
            model(torch.tensor([[t]]), cache=cache, last_only=True)
        seconds = time.perf_counter() - t0
        result = {"base_mb": base_kb / 1024, "peak_mb": _rss_kb("VmHWM") / 1024, "tokens": len(ids),
                  "tok_s": len(ids) / seconds, "budget_mb": spec["paged_budget_mb"],
                  "model_mb": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20}  # fmt: skip
        result["cache_mb"] = cache.nbytes() / 2**20  # dense: its buffers; paged: its pool
        if spec["kind"] == "paged":
            st = cache.stats
            result |= {"resident_mb": st.resident_bytes / 2**20, "file_mb": st.file_bytes / 2**20,
                       "page_faults": st.page_faults, "evictions": st.evictions,
                       "transient_mb": cache.transient_bytes(len(ids)) / 2**20}  # fmt: skip
            cache.close()
    return result


def render_kv_section(rep: KVReport) -> str:
    c, m = rep.config, rep.machine
    dense = rep.ppl["dense"]
    lines = [
        f"<!-- bench:{SECTION}:start -->",
        "## KV cache kinds on SmolLM2: quality, decode speed and memory",
        "",
        f"Perplexity with the cache in the loop: the first {c.ppl_tokens} tokens of `{c.text}` in {c.chunk}-token "
        f"chunks, each attending to what the cache kept (quantized caches read back quantized), non-overlapping "
        f"{c.context}-token windows. KIVI: int4, groups of 32, the newest 128 tokens in full precision; NF4: groups "
        "of 64, the newest 128 in full precision; int8: per token and head. Calibrated: keys divided per channel by "
        f"scales from `press-play kv calibrate` on the {2 * c.context} tokens after the scored ones. Bytes per token "
        "over all 30 layers (codes, float16 scales and offsets; the full-precision residual not counted).",
        "",
        f"- Machine: {m['cpu']}, {m['cores']} cores; {c.threads} threads; Python {m['python']}; torch {m['torch']}; "
        f"{m['date']}",
        "- Command: `just bench --suite kv` (= `uv run python -m press_play.bench --suite kv`)",
        "",
        "| cache | bytes / token | vs dense | perplexity | vs dense | target | met | decode tok/s "
        f"@{c.cached_tokens} | vs dense |",
        "|---|---:|---:|---:|---:|---|---|---:|---:|",
    ]
    dense_rate = statistics.median(rep.decode_tok_s["dense"])
    for name, ppl in rep.ppl.items():
        delta = 100 * (ppl / dense - 1)
        target = TARGETS.get(name)
        met = "" if target is None else ("yes" if delta <= target else "no")
        rates = rep.decode_tok_s.get(name)
        speed = (
            "—"
            if rates is None
            else f"{statistics.median(rates):.1f} | {statistics.median(rates) / dense_rate:.2f}x"
        )
        lines.append(
            f"| {name} | {rep.bytes_per_token[name]:,.0f} | {rep.bytes_per_token['dense'] / rep.bytes_per_token[name]:.1f}x "
            f"smaller | {ppl:.2f} | {delta:+.2f}% | {'' if target is None else f'within {target}%'} | {met} | "
            f"{speed} |"
        )
    lines.append("")
    lp = rep.long_ppl
    first = int(lp["dense"]["first_tokens"])
    sink_rate = statistics.median(rep.decode_tok_s["sink"])
    lines += [
        f"One continuous run of {c.long_tokens} tokens in {c.long_chunk}-token chunks (SmolLM2 was trained on "
        f"8192): sink = {c.sinks} sinks + a window of {c.window}; window = the last {c.window} alone.",
        "",
        f"| cache | tokens held | perplexity, first {first} | vs dense | perplexity, all {c.long_tokens} | vs dense |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in lp.items():
        held = {"dense": "all", "sink": f"{c.sinks + c.window}", "window": f"{c.window}"}[name]
        lines.append(
            f"| {name} | {held} | {r['first']:.2f} | {100 * (r['first'] / lp['dense']['first'] - 1):+.2f}% | "
            f"{r['all']:.2f} | {100 * (r['all'] / lp['dense']['all'] - 1):+.2f}% |"
        )
    sink_delta = 100 * (lp["sink"]["first"] / lp["dense"]["first"] - 1)
    lines += [
        "",
        f"Sink + window against dense over the first {first} tokens: {sink_delta:+.2f}% (target within "
        f"{SINK_TARGET}%: {'met' if sink_delta <= SINK_TARGET else 'not met'}). Decode with {c.cached_tokens} tokens "
        f"seen: sink + window {sink_rate:.1f} tok/s ({sink_rate / dense_rate:.2f}x dense), attending to "
        f"{c.sinks + c.window} of them.",
        "",
    ]
    if rep.memory:
        p, d = rep.memory["paged"], rep.memory["dense"]
        over_p, over_d = p["peak_mb"] - p["base_mb"], d["peak_mb"] - d["base_mb"]
        working = max(0.0, over_d - d["cache_mb"])  # decoding's own memory, seen beside the dense cache
        bound = p["budget_mb"] + p["transient_mb"] + working
        lines += [
            f"Peak memory while decoding {int(p['tokens'])} tokens one at a time, each cache in a fresh process: "
            f"the model loaded ({p['model_mb']:.0f} MB of float32 weights), freed heap returned to the OS, the peak "
            "counter restarted, then the decode; the table gives what the peak rose above the loaded process.",
            "",
            "| cache | cache bytes MB | peak above the loaded model, MB | decode tok/s |",
            "|---|---:|---:|---:|",
            f"| dense | {d['cache_mb']:.1f} | {over_d:.1f} | {d['tok_s']:.1f} |",
            f"| paged, {p['budget_mb']:g} MB resident budget | {p['cache_mb']:.1f} (pool) | {over_p:.1f} | "
            f"{p['tok_s']:.1f} |",
            "",
            f"The paged cache kept {p['resident_mb']:.1f} MB of pages resident ({p['file_mb']:.1f} MB in the spill "
            f"file; {int(p['page_faults']):,} page reads, {int(p['evictions']):,} evictions). Stated overhead beyond "
            f"its budget: one layer's keys and values gathered for attention ({p['transient_mb']:.1f} MB at "
            f"{int(p['tokens'])} tokens) plus decoding's own working memory ({working:.1f} MB: the dense run's rise "
            f"less its cache). Bound {bound:.1f} MB above the model; measured {over_p:.1f} MB: "
            f"{'within' if over_p <= bound else 'over'}.",
            "",
        ]
    lines.append(f"<!-- bench:{SECTION}:end -->")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(json.dumps(memory_worker(json.loads(sys.argv[1]))))
