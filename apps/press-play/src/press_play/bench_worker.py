"""One benchmark measurement in a fresh process: `python -m press_play.bench_worker`.

The spec comes as JSON on stdin and the result goes out as one JSON line on stdout. A process per
measurement keeps peak RSS one engine's own; `press_play.bench` drives the rounds and the report.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Callable
from typing import Any

from press_play.bench import ENGINES


def _maxrss_mb() -> float:
    import resource

    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20  # macOS reports bytes, Linux KiB


def weight_bytes_per_token(model, embedding, lm_head) -> int:
    """Bytes of weights one decoded token reads: all but the embedding matrix, plus the head and one row."""
    params = {p.data_ptr(): p for p in model.parameters()}.values()  # a tied weight counted once
    total = sum(p.numel() * p.element_size() for p in params)
    emb = embedding.weight
    row = emb.shape[1] * emb.element_size()
    head = lm_head.weight.numel() * lm_head.weight.element_size()
    tied = lm_head.weight.data_ptr() == emb.data_ptr()
    return total - emb.numel() * emb.element_size() + row + (head if tied else 0)


def _median_seconds(fn: Callable[[], object], repeats: int) -> float:
    import time

    fn()  # first touch: page faults and lazy initialisation stay out of the timing
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_bandwidth(mb: int, repeats: int = 9) -> dict[str, Any]:
    """Read bandwidth of this process's threads: a sum over `mb` MB, and a matrix-vector product."""
    import torch

    a = torch.ones(mb * 2**20 // 4)
    sum_bps = a.numel() * 4 / _median_seconds(a.sum, repeats)
    cols = 4096
    w, x = (
        a[: a.numel() // cols * cols].view(-1, cols),
        torch.ones(cols),
    )  # (rows, cols) @ (cols,), same memory
    gemv_bps = w.numel() * 4 / _median_seconds(lambda: w @ x, repeats)
    return {"engine": "bandwidth", "mb": mb, "repeats": repeats, "sum_bytes_per_s": sum_bps,
            "gemv_bytes_per_s": gemv_bps, "bytes_per_s": max(sum_bps, gemv_bps)}  # fmt: skip


def measure_engine(spec: dict[str, Any]) -> dict[str, Any]:
    """Load one engine, warm it up with a full prefill+decode, then time one more."""
    import time

    import torch

    engine, n_new = spec["engine"], spec["decode_tokens"]
    prompt = torch.tensor([spec["prompt"]])  # (1, T)
    if engine == "omnicoder":
        import omni_model

        rss_before = _maxrss_mb()
        t0 = time.perf_counter()
        model = omni_model.load(spec["model"]).model
        load_s = time.perf_counter() - t0
        emb, head = model.embed_tokens, model.lm_head

        def prefill():
            cache = model.make_cache(batch_size=1, max_len=prompt.shape[1] + n_new)
            return model(prompt, cache=cache, last_only=True), cache

        def step(x, cache):
            return model(x, cache=cache, last_only=True), cache

    elif engine == "transformers":
        from transformers import AutoModelForCausalLM

        from omni_model.loader import resolve_source

        path = resolve_source(spec["model"])
        rss_before = _maxrss_mb()
        t0 = time.perf_counter()
        kw = {"gguf_file": path.name} if path.is_file() else {}
        folder = path.parent if path.is_file() else path
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32,
                                                     attn_implementation="eager", **kw).eval()  # fmt: skip
        load_s = time.perf_counter() - t0
        emb, head = model.get_input_embeddings(), model.get_output_embeddings()

        def prefill():
            out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
            return out.logits, out.past_key_values

        def step(x, cache):
            out = model(input_ids=x, past_key_values=cache, use_cache=True)
            return out.logits, out.past_key_values

    else:
        raise ValueError(f"unknown engine {engine!r}; known: {', '.join(ENGINES)}")

    def one_pass() -> tuple[float, float, list[int]]:
        t0 = time.perf_counter()
        logits, cache = prefill()
        x = logits[:, -1].argmax(-1, keepdim=True)  # (1, 1)
        t1 = time.perf_counter()
        tokens = [int(x)]
        for _ in range(n_new):
            logits, cache = step(x, cache)
            x = logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(int(x))
        return t1 - t0, time.perf_counter() - t1, tokens

    with torch.inference_mode():
        one_pass()  # warm-up: allocator, kernels' first-call paths
        prefill_s, decode_s, tokens = one_pass()
    peak = _maxrss_mb()
    return {
        "engine": engine, "load_s": load_s, "prefill_s": prefill_s, "decode_s": decode_s,
        "prefill_tok_s": prompt.shape[1] / prefill_s, "decode_tok_s": n_new / decode_s,
        "rss_before_load_mb": rss_before, "peak_rss_mb": peak, "model_rss_mb": peak - rss_before,
        "n_params": sum(p.numel() for p in {p.data_ptr(): p for p in model.parameters()}.values()),
        "bytes_per_token": weight_bytes_per_token(model, emb, head), "tokens": tokens,
        "tied": head.weight.data_ptr() == emb.weight.data_ptr(),
        "threads": torch.get_num_threads(), "torch": torch.__version__,
    }  # fmt: skip


def worker_main() -> int:
    """Entry point of one measurement: spec as JSON on stdin, result as one JSON line on stdout."""
    import torch

    spec = json.loads(sys.stdin.read())
    torch.set_num_threads(int(spec.get("threads", 2)))
    if spec["engine"] == "bandwidth":
        result = measure_bandwidth(int(spec["mb"]))
    else:
        result = measure_engine(spec)
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(worker_main())
