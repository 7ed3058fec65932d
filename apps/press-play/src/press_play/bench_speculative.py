"""Speculative decoding against plain decoding: the exported 4-bit SmolLM2 on ONNX Runtime, same run.

Modes, each in a fresh process per round (bench_spec_worker.py, no torch in it), greedy, on the same
prompts: plain decoding; prompt lookup; Medusa-style heads (`press-play train heads --chat`, trained
here when the work folder has none); a draft model. The draft is SmolLM2's first `draft_layers`
layers with its embedding, final norm and tied head, fine-tuned by omni-train on the base's own greedy
answers (the heads' training stream: sequence-level distillation), exported to int4 like the target.

Two prompt sets in the chat template: (a) ten open-ended requests; (b) ten editing and summarising
requests around a passage of a play, whose answers repeat the prompt. Per mode and set: tokens per
verification step, decode tokens/s and its ratio to plain decoding in the same round (medians over
rounds), and whether every greedy output equals plain decoding's; per mode, the worker's peak RSS.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from omni_model.errors import OmniError
from omni_model.zoo import DEFAULT_MODEL

SECTION = "speculative"
WORKER = Path(__file__).with_name("bench_spec_worker.py")
Progress = Callable[[str, int, int], None]

OPEN_ENDED = (
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how rainbows form.",
    "What are some good habits for learning a new language?",
    "Describe a walk through a forest in autumn.",
    "Give me three ideas for a birthday party for a ten-year-old.",
    "Why is the sky blue?",
    "Write a poem about the sea.",
    "How do I make a good cup of tea?",
    "What should I pack for a weekend camping trip?",
    "Tell me about the planets of the solar system.",
)
EDITING = (
    "Correct the spelling and punctuation of this text and return the corrected text:",
    "Repeat this passage word for word, replacing every 'thou' with 'you':",
    "Summarise this passage, quoting its most important line:",
    "Copy this passage and put a title above it:",
    "Rewrite this passage with each sentence on its own line:",
    "Quote the first four lines of this passage exactly:",
    "Return this passage with the speaker names in capitals:",
    "Copy this text, fixing any mistakes you find:",
    "Repeat this passage, then say in one sentence what it is about:",
    "Reformat this passage as a numbered list of its sentences:",
)


class SpecBenchError(OmniError):
    """A worker failed, or a model could not be prepared."""


@dataclass(frozen=True)
class SpecBenchConfig:
    model: str = DEFAULT_MODEL
    play: str = "macbeth"  # the editing prompts' passages
    passage_tokens: int = 120
    max_new_tokens: int = 128
    draft_tokens: int = 3  # heads and draft: a verification of 4 tokens costs ~1.4x a step here, of 5 ~1.9x
    lookup_tokens: int = 3  # prompt lookup: 3 beat 2 and 5 on both prompt sets (a row: ~13% of a step)
    rounds: int = 3
    threads: int = 2
    heads: int = 4
    heads_minutes: float = 30.0
    draft_vocab: int = 8192  # the heads draft from the tokens the base produces most (FR-Spec)
    draft_layers: int = 4
    draft_minutes: float = 12.0
    exact: bool = (
        True  # every mode on an exact engine (OrtEngine): a "plain, one-row steps" row shows the cost
    )
    work_dir: str | None = None  # None: ~/.cache/omnicoder/bench/spec
    quick: bool = False

    @classmethod
    def quick_config(cls, **overrides: Any) -> SpecBenchConfig:
        """Seconds, not minutes: for tests and a smoke run, not for numbers."""
        return cls(**{"passage_tokens": 16, "max_new_tokens": 8, "rounds": 1, "heads": 2, "heads_minutes": 0.05,
                      "draft_vocab": 64, "draft_layers": 1, "draft_minutes": 0.05, "quick": True, **overrides})  # fmt: skip


@dataclass
class SpecReport:
    config: SpecBenchConfig
    machine: dict[str, Any]
    modes: dict[str, dict[str, Any]] = field(default_factory=dict)  # mode -> set -> figures
    prepared: dict[str, Any] = field(default_factory=dict)
    kernel_gap: float = 0.0  # max |logits| difference, one row alone against the same row among two


def _work(config: SpecBenchConfig) -> Path:
    return (
        Path(config.work_dir) if config.work_dir else Path.home() / ".cache" / "omnicoder" / "bench" / "spec"
    )


def run_worker(spec: dict[str, Any], timeout_s: float = 3600) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, str(WORKER)], input=json.dumps(spec), capture_output=True, text=True,
                          timeout=timeout_s)  # fmt: skip
    if proc.returncode != 0:
        raise SpecBenchError(
            f"{spec['mode']} worker failed (exit {proc.returncode}): {' '.join(proc.stderr.split())[-300:]}"
        )
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise SpecBenchError(f"{spec['mode']} worker printed no JSON result") from None


def prompts(config: SpecBenchConfig, tokenizer: Any) -> dict[str, list[list[int]]]:
    from press_play.bench_retrieval import plays

    text_ids = tokenizer.encode(plays()[config.play].read_text(encoding="utf-8"), add_special_tokens=False)
    step = max(len(text_ids) // (len(EDITING) + 1), 1)
    passages = [tokenizer.decode(text_ids[(i + 1) * step : (i + 1) * step + config.passage_tokens]).strip()
                for i in range(len(EDITING))]  # fmt: skip

    def chat(content: str) -> list[int]:
        return tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": content}]),
                                add_special_tokens=False)  # fmt: skip

    return {"open-ended": [chat(p) for p in OPEN_ENDED],
            "editing": [chat(f"{i}\n\n{p}") for i, p in zip(EDITING, passages, strict=True)]}  # fmt: skip


def prepare(config: SpecBenchConfig, report: Progress) -> dict[str, Any]:
    """The int4 export, the heads (trained when absent) and their ONNX form, the draft (trained when absent)."""
    import torch

    import omni_model
    from omni_export.export import ExportConfig, export_onnx
    from omni_export.heads import export_heads
    from omni_train import run
    from omni_train.data import TokenDataset
    from omni_train.heads import HeadsConfig
    from omni_train.loop import TrainConfig, train
    from omni_train.recipes import LMObjective

    torch.set_num_threads(config.threads)
    work = _work(config)
    work.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {}
    target = work / "target-int4"
    report("exporting the int4 target", 0, 4)
    export_onnx(config.model, target, ExportConfig(weights="int4"))
    out["target"] = target
    heads_run = work / f"heads-v{config.draft_vocab}{'-quick' if config.quick else ''}"
    base = run.load_base(config.model)
    if not (heads_run / "heads" / "heads.json").is_file():
        report(f"training {config.heads} heads ({config.heads_minutes:g} min)", 1, 4)
        data = TokenDataset.build(["shakespeare"], base.tokenizer, work / "data")
        cfg = TrainConfig(seq_len=32 if config.quick else 128, batch_size=2 if config.quick else 8,
                          budget_s=60 * config.heads_minutes, eval_every=10**6, seed=0)  # fmt: skip
        run.heads(base, data, cfg, heads_run, HeadsConfig(n_heads=config.heads), chat=True, draft_vocab=config.draft_vocab,
                  prompts=8 if config.quick else 384, prompt_len=16 if config.quick else 64,
                  new_tokens=8 if config.quick else 128)  # fmt: skip
    out["heads_run"] = heads_run
    out["heads_onnx"] = work / "heads-onnx"
    export_heads(heads_run / "heads", target, out["heads_onnx"], vocab_size=config.draft_vocab)
    stream = np.load(heads_run / "continuations.npy", allow_pickle=False)
    draft_dir = work / f"draft-{config.draft_layers}l{'-quick' if config.quick else ''}"
    if not (draft_dir / "model" / "omnicoder.json").is_file():
        report(f"training the {config.draft_layers}-layer draft ({config.draft_minutes:g} min)", 2, 4)
        draft = truncated(base.model, config.draft_layers)
        cfg = TrainConfig(seq_len=32 if config.quick else 128, batch_size=2 if config.quick else 8, lr=3e-4,
                          min_lr=3e-5, budget_s=60 * config.draft_minutes, eval_every=10**6, seed=0)  # fmt: skip
        split = len(stream) - max(len(stream) // 20, 2 * (cfg.seq_len + 1))
        r = train(draft, LMObjective(), stream[:split], stream[split:], cfg, draft_dir)
        omni_model.save(draft, draft_dir / "model", tokenizer=base.tokenizer,
                        meta={"recipe": "truncated base, trained on its greedy answers", "layers": config.draft_layers,
                              "steps": r.steps, "tokens": r.tokens, "minutes": r.elapsed_s / 60})  # fmt: skip
    report("exporting the int4 draft", 3, 4)
    export_onnx(draft_dir / "model", work / "draft-int4", ExportConfig(weights="int4"))
    out["draft"] = work / "draft-int4"
    out["draft_meta"] = json.loads((draft_dir / "model" / "omnicoder.json").read_text())["meta"]
    rows = [
        json.loads(line) for line in (heads_run / "metrics.jsonl").read_text().splitlines() if line.strip()
    ]
    final = next((r for r in reversed(rows) if r.get("final")), {})
    out["heads_steps"] = final.get("step")
    out["heads_val"] = {k: v for k, v in final.items() if k.startswith("head") and k.endswith("_acc")}
    out["stream_tokens"] = int(stream.size)
    out["tokenizer"] = base.tokenizer
    return out


def truncated(model: Any, n_layers: int) -> Any:
    """A copy of a Decoder keeping its first n_layers blocks, its embedding, final norm and head."""
    import copy

    from omni_model.decoder import Decoder

    cfg = dataclasses.replace(model.config, n_layers=n_layers)
    small = Decoder(cfg, init=False)
    state = {k: v for k, v in model.state_dict().items()
             if not k.startswith("layers.") or int(k.split(".")[1]) < n_layers}  # fmt: skip
    small.load_state_dict(copy.deepcopy(state), strict=False)
    return small.float().train()


def run_spec_bench(config: SpecBenchConfig, on_progress: Progress | None = None) -> SpecReport:
    from press_play.bench import machine_info

    report = on_progress or (lambda what, done, total: None)
    prep = prepare(config, report)
    tok = prep.pop("tokenizer")
    sets = prompts(config, tok)
    if config.quick:
        sets = {k: v[:2] for k, v in sets.items()}
    modes = {"plain": "plain", **({ONE_ROW: "plain"} if config.exact else {}), "prompt lookup": "lookup", f"heads ({config.heads})": f"heads:{prep['heads_onnx']}",
             f"draft ({config.draft_layers} layers)": f"draft:{prep['draft']}"}  # fmt: skip
    from importlib.metadata import version

    machine = machine_info(config.threads) | {"onnxruntime": version("onnxruntime")}
    rep = SpecReport(
        config, machine, prepared={k: str(v) if isinstance(v, Path) else v for k, v in prep.items()}
    )
    raw: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    total = config.rounds * len(modes)
    for r in range(config.rounds):
        for i, (name, mode) in enumerate(modes.items()):
            report(f"round {r + 1}: {name}", r * len(modes) + i, total)
            all_prompts = [p for s in sets.values() for p in s]
            res = run_worker({"model": str(prep["target"]), "mode": mode, "threads": config.threads,
                              "draft_tokens": config.lookup_tokens if mode == "lookup" else config.draft_tokens,
                              "max_new_tokens": config.max_new_tokens, "exact": config.exact and name != ONE_ROW,
                              "prompts": all_prompts, "eos": sorted(tok.eos_token_ids)})  # fmt: skip
            raw[name].append(res)
    report("done", total, total)
    for name in modes:
        rep.modes[name] = {"peak_rss_mb": statistics.median(x["peak_rss_mb"] for x in raw[name])}
        start = 0
        for set_name, ps in sets.items():
            rows = [x["runs"][start : start + len(ps)] for x in raw[name]]
            plain_rows = [x["runs"][start : start + len(ps)] for x in raw["plain"]]
            rate, plain_rate = _rates(rows), _rates(plain_rows)
            one_row = _rates([x["runs"][start : start + len(ps)] for x in raw.get(ONE_ROW, raw["plain"])])
            steps = sum(p["steps"] for p in rows[0])
            rep.modes[name][set_name] = {
                "tok_s": statistics.median(rate),
                "ratio": statistics.median(a / b for a, b in zip(rate, plain_rate, strict=True)),
                "one_row_ratio": statistics.median(a / b for a, b in zip(rate, one_row, strict=True)),
                "tokens_per_step": (sum(p["accepted"] for p in rows[0]) + steps) / steps if steps else 0.0,
                "acceptance": (sum(p["accepted"] for p in rows[0]) / d) if (d := sum(p["drafted"] for p in rows[0])) else 0.0,
                "identical": all(a["tokens"] == b["tokens"] for rr, pr in zip(rows, plain_rows, strict=True)
                                 for a, b in zip(rr, pr, strict=True)),
                "agree": _agreement(rows[0], plain_rows[0]),
                "tokens": sum(len(p["tokens"]) for p in rows[0]),
            }  # fmt: skip
            start += len(ps)
    rep.kernel_gap = kernel_gap(prep["target"], config.threads)
    return rep


def _rates(rounds: list[list[dict[str, Any]]]) -> list[float]:
    """Decode tokens/s of each round: its tokens after the first over its time after the first."""
    return [sum(p["decode_tokens"] for p in rr) / sum(p["decode_s"] for p in rr) for rr in rounds]


def _agreement(runs: list[dict[str, Any]], plain: list[dict[str, Any]]) -> float:
    """The share of plain decoding's tokens reproduced before each output's first difference."""
    from press_play.bench import matching_prefix

    agreed = sum(matching_prefix(a["tokens"], b["tokens"]) for a, b in zip(runs, plain, strict=True))
    return agreed / max(sum(len(b["tokens"]) for b in plain), 1)


def kernel_gap(folder: Path, threads: int) -> float:
    """Largest |logit difference| between one position computed alone and the same position computed
    as the first of two (the graph's matmuls take a different kernel for one row than for several)."""
    from omni_runtime.ort_engine import OrtEngine

    e = OrtEngine(folder, threads=threads)
    ids = [int(t) for t in np.random.default_rng(0).integers(0, e.vocab_size, 72)]
    e.forward(ids[:64])
    gap = 0.0
    for t in range(64, 72, 2):
        a = e.forward([ids[t]], last_only=False)[0]
        e.rollback(1)
        b = e.forward(ids[t : t + 2], last_only=False)[0]
        e.rollback(1)  # keep the first of the two
        gap = max(gap, float(np.abs(a - b).max()))
    return gap


ONE_ROW = "plain, one-row steps"
TARGETS = {"heads": ("open-ended", 1.5), "prompt lookup": ("editing", 1.5), "draft": ("open-ended", 1.3)}


def render_spec_section(rep: SpecReport) -> str:
    c, m = rep.config, rep.machine
    lines = [
        f"<!-- bench:{SECTION}:start -->",
        "## Speculative decoding: SmolLM2 int4 on ONNX Runtime, against plain decoding",
        "",
        f"- Machine: {m['cpu']}, {m['cores']} cores; {c.threads} threads; Python {m['python']}; "
        f"onnxruntime {m.get('onnxruntime', '?')}; {m['date']}",
        "- Command: `just bench --suite speculative` (= `uv run python -m press_play.bench --suite speculative`)"
        + (" — QUICK smoke run, not figures" if c.quick else ""),
        f"- Greedy, up to {c.max_new_tokens} new tokens per prompt, up to {c.draft_tokens} drafts per verification "
        f"({c.lookup_tokens} for prompt lookup, n-grams of 2 to 4 tokens); "
        f"each mode in a fresh process per round, {c.rounds} rounds, medians; decode tokens/s is every token after "
        "the first over the time after the first; the ratio is against plain decoding in the same round.",
        f"- Prompts (chat template): (a) open-ended, ten requests; (b) editing, ten requests to correct, copy, "
        f"reformat or summarise a {c.passage_tokens}-token passage of {c.play}, whose answers repeat the prompt.",
        f"- Heads: {c.heads} Medusa-style heads, `press-play train heads --chat --draft-vocab {c.draft_vocab}` "
        f"({c.heads_minutes:g} min budget, {rep.prepared.get('heads_steps', '?')} steps) on the base's greedy answers "
        f"to requests about Shakespeare passages ({rep.prepared.get('stream_tokens', 0):,} tokens); they draft from "
        f"the {c.draft_vocab:,} tokens those answers use most; their ONNX graph reads the target's hidden state and "
        f"runs the target's 8-bit head, cut to those tokens, once per step for all heads. Top-1 agreement with the "
        f"base's greedy token on validation text at the end of training: "
        + ", ".join(
            f"head {k[4:-4]} {100 * v:.1f}%" for k, v in sorted(rep.prepared.get("heads_val", {}).items())
        )
        + ".",
        f"- Draft: SmolLM2's first {c.draft_layers} layers with its embedding and head, trained "
        f"{float(rep.prepared.get('draft_meta', {}).get('minutes', 0)):.1f} min by omni-train on the same greedy answers "
        f"({rep.prepared.get('draft_meta', {}).get('steps', '?')} steps), exported to int4 like the target.",
        "",
        "| mode | set | tokens per verification | drafts kept | decode tok/s | vs plain | vs plain, one-row steps | "
        "greedy output identical (plain's tokens before the first difference) | peak RSS MB |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for name, figs in rep.modes.items():
        for set_name in ("open-ended", "editing"):
            f = figs[set_name]
            plain = name in ("plain", ONE_ROW)
            kept = "" if plain else f"{100 * f['acceptance']:.0f}%"
            tps = "1.00" if plain else f"{f['tokens_per_step']:.2f}"
            lines.append(f"| {name} | {set_name} | {tps} | {kept} | {f['tok_s']:.1f} | {f['ratio']:.2f}x | "
                         f"{f['one_row_ratio']:.2f}x | {'yes' if f['identical'] else 'no'} ({100 * f['agree']:.0f}%) | "
                         f"{figs['peak_rss_mb']:.0f} |")  # fmt: skip
    lines.append("")
    verdicts = []
    for name, figs in rep.modes.items():
        for key, (set_name, want) in TARGETS.items():
            if name.startswith(key):
                got, one = figs[set_name]["ratio"], figs[set_name]["one_row_ratio"]
                verdicts.append(f"{name} on {set_name}: {got:.2f}x ({one:.2f}x against one-row steps) against "
                                f"the target {want}x — {'met' if min(got, one) >= want else 'NOT met'}")  # fmt: skip
    exact = (
        "Every mode runs on an exact engine (`OrtEngine(exact=True)`): a one-token call runs as two rows, so that "
        "each position's logits are the same bits in a decode step and in a verification. The graph's other "
        "operators compute a row alike whatever the row count; ONNX Runtime's GroupQueryAttention takes another "
        "kernel for a single query row, and the int8 activations of the 4-bit matmuls turn its last-bit "
        f"differences into logits up to {rep.kernel_gap:.2f} apart on this machine (one row against two), "
        "enough to flip near-ties. "
        + (
            "The one-row-steps row is plain decoding without it: the second row's cost."
            if c.exact
            else "This run had it off: outputs may differ after the first near-tie."
        )
    )
    lines += [
        exact,
        "",
        "Targets (issue 8, ONNX engine): " + "; ".join(verdicts) + ".",
        "",
        f"<!-- bench:{SECTION}:end -->",
    ]
    return "\n".join(lines)
