"""One exported model opened by the runtime library a phone links, in a process of its own.

`host_run(request)` starts `python -m omni_runtime.host_run REQUEST.json` and returns what it printed.
The request is {"format", "path", "threads", "context", "prompt", "new_tokens", "ppl_ids", "ppl_context",
"speculative"}:
format "onnx" (a folder of `press-play export` or its ORT-format twin, run by `OrtEngine` with a cache of
`context` tokens) or "executorch" (a folder with a .pte; its cache length was fixed at export). The
answer holds the greedy tokens after the prompt, prefill and decode tokens/s, the perplexity of
`ppl_ids` in non-overlapping `ppl_context` windows when given, and memory: the process's resident bytes
once the runtime library is imported (before the model is opened), its peak (VmHWM) after the
generation and the tokens the cache held then (before perplexity is scored, whose all-position logits an app never holds). With
"speculative": "lookup" the prompt is generated from again with prompt-lookup drafts, and the answer
adds that run's decode tokens/s, tokens per verification step and whether its tokens are the same.
A process of its own so that the peak is this runtime's alone.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from omni_runtime.engine import EngineError

FORMATS = {"onnx": "ONNX Runtime", "ort": "ONNX Runtime", "executorch": "ExecuTorch", "pte": "ExecuTorch"}


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def run(request: dict[str, Any]) -> dict[str, Any]:
    """The measurement itself, in this process (`host_run` calls it in a fresh one)."""
    fmt, path, threads = request["format"], Path(request["path"]), int(request["threads"])
    if FORMATS.get(fmt) == "ONNX Runtime":
        from omni_runtime.ort_engine import OrtEngine as Engine

        kwargs: dict[str, Any] = {"threads": threads, "max_seq_len": request["context"]}  # the app's cache
    elif FORMATS.get(fmt) == "ExecuTorch":
        from omni_runtime.executorch_engine import ExecuTorchEngine as Engine
        from omni_runtime.executorch_engine import _runtime

        _runtime()  # the runtime's libraries are part of the baseline, not of the model's cost
        kwargs = {"threads": threads}
    else:
        raise EngineError(f"host_run: unknown format {fmt!r} (formats: {', '.join(FORMATS)})")
    from omni_model.sampling_config import SamplingConfig
    from omni_runtime.generate import generate
    from omni_runtime.perplexity import perplexity

    baseline = _status("VmRSS")
    t0 = time.perf_counter()
    engine = Engine(path, **kwargs)
    load_s = time.perf_counter() - t0
    config = SamplingConfig(temperature=0.0, max_new_tokens=request["new_tokens"], stop_token_ids=frozenset())
    result = generate(engine, request["prompt"], config)
    out = {"tokens": list(result.token_ids), "load_s": load_s, "prefill_tok_s": result.prefill_tokens_per_second,
           "decode_tok_s": result.decode_tokens_per_second, "baseline_rss": baseline,
           "peak_rss": _status("VmHWM"), "tokens_held": len(request["prompt"]) + len(result.token_ids)}  # fmt: skip
    if request.get("speculative") == "lookup":  # the same prompt again, drafts from prompt lookup
        from omni_runtime.speculative import PromptLookup

        spec = generate(engine, request["prompt"], config, speculative=PromptLookup())
        stats = spec.speculation
        out["speculative"] = {"proposer": "lookup", "decode_tok_s": spec.decode_tokens_per_second,
                              "tokens_per_step": stats.tokens_per_step if stats else 1.0,
                              "tokens_identical": list(spec.token_ids) == out["tokens"]}  # fmt: skip
    if request.get("ppl_ids"):
        out["perplexity"] = perplexity(engine, request["ppl_ids"], request["ppl_context"]).ppl
    return out


def host_run(request: dict[str, Any], timeout_s: float = 1800) -> dict[str, Any]:
    """`run(request)` in a fresh Python process; EngineError with the child's last line if it fails."""
    with tempfile.TemporaryDirectory(prefix="omni-host-run-") as tmp:
        req = Path(tmp) / "request.json"
        req.write_text(json.dumps(request), encoding="utf-8")
        try:
            proc = subprocess.run([sys.executable, "-m", "omni_runtime.host_run", str(req)],
                                  capture_output=True, text=True, timeout=timeout_s)  # fmt: skip
        except subprocess.TimeoutExpired:
            raise EngineError(f"{request['path']}: the host run took over {timeout_s:.0f}s") from None
    if proc.returncode != 0:
        tail = " ".join(proc.stderr.strip().splitlines()[-1:])[:200]
        raise EngineError(f"{request['path']}: the host run failed: {tail}")
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise EngineError(f"{request['path']}: the host run printed no result") from None


if __name__ == "__main__":
    print(json.dumps(run(json.loads(Path(sys.argv[1]).read_text()))))
