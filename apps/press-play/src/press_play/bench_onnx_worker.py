"""One measurement of one runtime, in a process of its own: `python bench_onnx_worker.py < spec.json`.

Runs as a plain script under whichever Python has the runtime installed (the workspace's for
OmniCoder's ONNX engine; the benchmark-only peer environment for llama.cpp and ONNX Runtime GenAI),
so it imports nothing of the workspace at module level: stdlib and numpy, then the one runtime asked
for. Every engine gets the same token ids and the same greedy loop. Prints one JSON line.

speed: load; warm up (16-token prefill, 4 steps); a 16-token prompt then 128 greedy tokens; reset; a
512-token prompt (prefill timed) then 128 greedy tokens. Decode rate = 127 / (t(token 128) -
t(token 1)). Peak RSS is the process's maximum resident set after all of it.
ppl: non-overlapping windows, every token but each window's first scored.
"""

from __future__ import annotations

import json
import math
import resource
import sys
import time

import numpy as np


class OmniCoder:
    def __init__(self, path: str, threads: int, n_ctx: int) -> None:
        from omni_runtime.ort_engine import OrtEngine

        self.e = OrtEngine(path, threads=threads, max_seq_len=n_ctx)

    def reset(self) -> None:
        self.e.reset()

    def prefill(self, ids: list[int]) -> np.ndarray:
        return self.e.forward(ids, last_only=True)[-1]

    def step(self, token: int) -> np.ndarray:
        return self.e.forward([token], last_only=True)[-1]

    def all_logits(self, ids: list[int]) -> np.ndarray:
        self.e.reset()
        return self.e.forward(ids, last_only=False)


class ExecuTorch:
    def __init__(self, path: str, threads: int, n_ctx: int) -> None:
        from omni_runtime.executorch_engine import ExecuTorchEngine

        self.e = ExecuTorchEngine(path, threads=threads, max_seq_len=n_ctx)

    reset, prefill, step, all_logits = (
        OmniCoder.reset,
        OmniCoder.prefill,
        OmniCoder.step,
        OmniCoder.all_logits,
    )


class GenAI:
    def __init__(self, path: str, threads: int, n_ctx: int) -> None:
        import onnxruntime_genai as og

        self.og, config = og, og.Config(path)
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))  # fmt: skip
        self.model, self.n_ctx = og.Model(config), n_ctx
        self.reset()

    def reset(self) -> None:
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=self.n_ctx, do_sample=False)
        self.g = self.og.Generator(self.model, params)

    def prefill(self, ids: list[int]) -> np.ndarray:
        self.g.append_tokens(np.asarray(ids, dtype=np.int32))
        return self.g.get_output("logits")[0, -1]

    def step(self, token: int) -> np.ndarray:
        self.g.append_tokens(np.asarray([token], dtype=np.int32))
        return self.g.get_output("logits")[0, -1]

    def all_logits(self, ids: list[int]) -> np.ndarray:
        self.reset()
        self.g.append_tokens(np.asarray(ids, dtype=np.int32))
        return self.g.get_output("logits")[0]


class LlamaCpp:
    def __init__(self, path: str, threads: int, n_ctx: int, logits_all: bool = False) -> None:
        from llama_cpp import Llama

        self.llm = Llama(model_path=path, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, n_batch=512,
                         logits_all=logits_all, verbose=False)  # fmt: skip

    def reset(self) -> None:
        self.llm.reset()

    def _last(self) -> np.ndarray:
        import llama_cpp

        ptr = llama_cpp.llama_get_logits_ith(self.llm._ctx.ctx, -1)  # the last token's logits
        return np.ctypeslib.as_array(ptr, shape=(self.llm.n_vocab(),))

    def prefill(self, ids: list[int]) -> np.ndarray:
        self.llm.eval(ids)
        return self._last()

    def step(self, token: int) -> np.ndarray:
        self.llm.eval([token])
        return self._last()

    def all_logits(self, ids: list[int]) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(ids)
        return np.asarray(self.llm.scores[: len(ids)])


ENGINES = {"omnicoder-onnx": OmniCoder, "executorch": ExecuTorch, "ort-genai": GenAI, "llama.cpp": LlamaCpp}


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM). Not ru_maxrss: Linux carries that over from the parent
    across exec, so a worker started by a large driver would report the driver's peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def decode(engine, prompt: list[int], n: int) -> tuple[float, float, list[int]]:
    """(prefill seconds, decode tokens/s over tokens 2..n, the greedy tokens)."""
    t0 = time.perf_counter()
    logits = engine.prefill(prompt)
    token = int(np.argmax(logits))
    stamps, out = [time.perf_counter()], [token]
    for _ in range(n - 1):
        token = int(np.argmax(engine.step(token)))
        stamps.append(time.perf_counter())
        out.append(token)
    return stamps[0] - t0, (n - 1) / (stamps[-1] - stamps[0]), out


def _import_runtime(engine: str) -> None:
    """Import the runtime library alone, so that the baseline RSS holds the interpreter and the library
    (for ExecuTorch's Python bindings that is torch too, which a phone app does not carry)."""
    if engine == "executorch":
        from omni_runtime.executorch_engine import _runtime

        _runtime()
    elif engine == "omnicoder-onnx":
        import onnxruntime  # noqa: F401
    elif engine == "llama.cpp":
        import llama_cpp  # noqa: F401
    elif engine == "ort-genai":
        import onnxruntime_genai  # noqa: F401


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def speed(spec: dict) -> dict:
    _import_runtime(spec["engine"])
    baseline = rss_mb()
    t0 = time.perf_counter()
    engine = ENGINES[spec["engine"]](spec["path"], spec["threads"], spec["n_ctx"])
    load_s = time.perf_counter() - t0
    decode(engine, spec["short_ids"], 4)  # warm-up
    engine.reset()
    _, short_tok_s, _ = decode(engine, spec["short_ids"], spec["decode_tokens"])
    engine.reset()
    prefill_s, long_tok_s, tokens = decode(engine, spec["prompt_ids"], spec["decode_tokens"])
    return {"load_s": load_s, "decode_tok_s_short": short_tok_s, "decode_tok_s_long": long_tok_s,
            "prefill_tok_s": len(spec["prompt_ids"]) / prefill_s, "greedy_tokens": tokens,
            "peak_rss_mb": peak_rss_mb(), "baseline_rss_mb": baseline}  # fmt: skip


def perplexity(spec: dict) -> dict:
    cls = ENGINES[spec["engine"]]
    args = (spec["path"], spec["threads"], spec["context"])
    engine = cls(*args, logits_all=True) if cls is LlamaCpp else cls(*args)
    ids, context = spec["ppl_ids"], spec["context"]
    nll, n = 0.0, 0
    for s in range(0, len(ids), context):
        w = ids[s : s + context]
        if len(w) < 2:
            continue
        logits = engine.all_logits(w)[:-1].astype(np.float64)
        top = logits.max(axis=-1, keepdims=True)
        log_z = np.log(np.exp(logits - top).sum(axis=-1)) + top[:, 0]
        nll += float((log_z - logits[np.arange(len(w) - 1), w[1:]]).sum())
        n += len(w) - 1
    return {"ppl": math.exp(nll / n), "n_scored": n}


def main() -> None:
    spec = json.loads(sys.stdin.read())
    result = speed(spec) if spec["measure"] == "speed" else perplexity(spec)
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
