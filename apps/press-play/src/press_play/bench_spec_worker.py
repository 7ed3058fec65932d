"""One decoding mode over a set of prompts, in a process of its own: `python bench_spec_worker.py < spec.json`.

Plain greedy decoding or speculative decoding with one proposer, on omni_runtime's ONNX engine, `exact`
or not (see OrtEngine); numpy and onnxruntime only: no torch in the process, so its peak RSS is the
runtime's, the draft model's or heads' included. One untimed warm-up generation, then each prompt
once. Prints one JSON line: per prompt the tokens, the decode seconds and the speculation counts; the
process's peak RSS.
"""

from __future__ import annotations

import json
import sys


def main() -> None:
    spec = json.loads(sys.stdin.read())
    from omni_model.sampling_config import SamplingConfig
    from omni_runtime.generate import generate
    from omni_runtime.ort_engine import OrtEngine
    from omni_runtime.speculative import DraftModel, HeadsProposer, PromptLookup

    threads = spec["threads"]
    engine = OrtEngine(spec["model"], threads=threads, exact=spec.get("exact", False))
    kind, _, arg = spec["mode"].partition(":")
    proposer = None
    if kind == "lookup":
        proposer = PromptLookup()
    elif kind == "draft":
        proposer = DraftModel(OrtEngine(arg, threads=threads, spin=False), engine.vocab_size)
    elif kind == "heads":
        from omni_runtime.heads import OrtHeads

        proposer = HeadsProposer(OrtHeads(arg, engine))
    config = SamplingConfig(max_new_tokens=spec["max_new_tokens"], temperature=0.0,
                            stop_token_ids=frozenset(spec["eos"]))  # fmt: skip
    k = spec["draft_tokens"]
    generate(engine, spec["prompts"][0], SamplingConfig(max_new_tokens=8, temperature=0.0), speculative=proposer,
             draft_tokens=k)  # fmt: skip
    runs = []
    for ids in spec["prompts"]:
        r = generate(engine, ids, config, speculative=proposer, draft_tokens=k)
        s = r.speculation
        runs.append({"tokens": list(r.token_ids), "decode_s": r.decode_seconds, "decode_tokens": r.decode_steps,
                     "steps": s.steps if s else r.decode_steps, "drafted": s.drafted if s else 0,
                     "accepted": s.accepted if s else 0})  # fmt: skip
    from press_play.bench_onnx_worker import peak_rss_mb  # VmHWM: ru_maxrss would carry the parent's over

    rss = peak_rss_mb()
    print(json.dumps({"runs": runs, "peak_rss_mb": rss}))


if __name__ == "__main__":
    main()
