"""One model file of a bundle, opened by the runtime library the phone uses, in a process of its own.

`python -m phone_export.verify_worker REQUEST.json` reads {"format", "path", "threads", "context", "prompt",
"new_tokens", "ppl_ids", "ppl_context"} and prints one JSON line: the greedy tokens after the prompt,
prefill and decode tokens/s, the perplexity of `ppl_ids` when given, and memory: the process's resident
bytes once the runtime library is imported (before the model is opened) and its peak (VmHWM) after
the generation (before perplexity is scored).
A process of its own so that the peak is this runtime's alone.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def run(request: dict) -> dict:
    fmt, path, threads = request["format"], Path(request["path"]), int(request["threads"])
    if fmt == "ort":
        from omni_runtime.ort_engine import OrtEngine as Engine

        kwargs: dict = {"threads": threads, "max_seq_len": request["context"]}  # the cache the app allocates
    elif fmt == "pte":
        from omni_runtime.executorch_engine import ExecuTorchEngine as Engine
        from omni_runtime.executorch_engine import _runtime

        _runtime()  # the runtime's libraries are part of the baseline, not of the model's cost
        kwargs = {"threads": threads}  # the program's cache length was fixed at export (the context)
    else:
        raise SystemExit(f"verify_worker: unknown format {fmt!r}")
    from omni_model.sampling_config import SamplingConfig
    from omni_runtime.generate import generate
    from omni_runtime.perplexity import perplexity

    baseline = _status("VmRSS")
    t0 = time.perf_counter()
    engine = Engine(path, **kwargs)
    load_s = time.perf_counter() - t0
    prompt = request["prompt"]
    config = SamplingConfig(temperature=0.0, max_new_tokens=request["new_tokens"], stop_token_ids=frozenset())
    result = generate(engine, prompt, config)
    out = {"tokens": list(result.token_ids), "load_s": load_s, "prefill_tok_s": result.prefill_tokens_per_second,
           "decode_tok_s": result.decode_tokens_per_second, "baseline_rss": baseline}  # fmt: skip
    # The peak of an app's run (load, prefill, decode), read before perplexity scoring, whose all-position
    # logits and float64 arithmetic an app never holds.
    out["peak_rss"] = _status("VmHWM")
    if request.get("ppl_ids"):
        out["perplexity"] = perplexity(engine, request["ppl_ids"], request["ppl_context"]).ppl
    return out


if __name__ == "__main__":
    print(json.dumps(run(json.loads(Path(sys.argv[1]).read_text()))))
