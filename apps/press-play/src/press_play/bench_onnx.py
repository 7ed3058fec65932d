"""The exported 4-bit SmolLM2 against the runtimes people would pick instead, measured in one run.

Engines, each in a fresh process per round (bench_onnx_worker.py), all on the same token ids:
- omnicoder-onnx: `press-play export --weights int4` of the zoo GGUF (Q4_1 blocks carried over,
  8-bit embedding/head), run by omni_runtime's ONNX Runtime engine;
- ort-genai: ONNX Runtime GenAI on what its own model builder makes of the same weights
  (`-p int4 -e cpu`, its defaults), from a float32 Hugging Face folder of the dequantized GGUF;
- llama.cpp (llama-cpp-python) on the same Q4_1 GGUF, and on a Q4_0 requantization of it made
  with llama.cpp's own quantizer.
- omnicoder-onnx with an int8 KV cache: the same weights, the cache as uint8 codes with float16
  scales per token (3.8x fewer KV bytes), attention built from plain operators around it;
- omnicoder-onnx without the Q4_1 minimums (ABLATION): the same graph with each projection's
  `blocksum(x) @ minimums` term cut out. Its outputs are wrong, so it gets no perplexity; its speed
  says what carrying Q4_1's minimums exactly costs against MatMulNBits alone.
The peers live in a separate, benchmark-only environment (`--peer-python`, default
`.venv-peers/bin/python`; see the README): they are never part of the workspace install or CI. Without
it only OmniCoder's engine is measured, and the section says so.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omni_model.errors import OmniError
from omni_model.zoo import DEFAULT_MODEL

SECTION = "onnx-int4"
ABLATION = "omnicoder-onnx without Q4_1 minimums (timing only)"
INT8_KV = "omnicoder-onnx, int8 KV cache"
WORKER = Path(__file__).with_name("bench_onnx_worker.py")
Progress = Callable[[str, int, int], None]
# The issue's targets: decode and prefill >= ORT GenAI's, peak RSS <= 1.5x llama.cpp's, ppl within 1% of float32.
FLOAT32_PPL_NOTE = "float32 reference (omni_model, PyTorch)"


class OnnxBenchError(OmniError):
    """A worker failed, or a peer could not be prepared."""


@dataclass(frozen=True)
class OnnxBenchConfig:
    model: str = DEFAULT_MODEL
    text: str = "hamlet"
    prompt_tokens: int = 512
    short_tokens: int = 16
    decode_tokens: int = 128
    rounds: int = 3
    threads: int = 2
    ppl_tokens: int = 4096
    context: int = 512
    peer_python: str | None = None  # None: .venv-peers/bin/python when it exists
    work_dir: str | None = None  # exports and peer models; None: ~/.cache/omnicoder/bench
    quick: bool = False

    def __post_init__(self) -> None:
        for name in (
            "prompt_tokens",
            "short_tokens",
            "decode_tokens",
            "rounds",
            "threads",
            "ppl_tokens",
            "context",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"OnnxBenchConfig.{name} must be >= 1, got {getattr(self, name)}")

    @classmethod
    def quick_config(cls, **overrides: Any) -> OnnxBenchConfig:
        return cls(**{"prompt_tokens": 64, "decode_tokens": 16, "rounds": 1, "ppl_tokens": 256, "context": 128,
                      "quick": True, "peer_python": "", **overrides})  # fmt: skip


@dataclass
class OnnxReport:
    config: OnnxBenchConfig
    machine: dict[str, Any]
    engines: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {path, file_mb, runs, ppl}
    float32_ppl: float = float("nan")
    peers_note: str = ""
    agreement: dict[str, int] = field(default_factory=dict)  # engine -> greedy tokens equal to ours
    bandwidth: dict[str, Any] = field(default_factory=dict)  # bench_worker's read-bandwidth result

    def median(self, engine: str, key: str) -> float:
        return statistics.median(r[key] for r in self.engines[engine]["runs"])


def _work_dir(config: OnnxBenchConfig) -> Path:
    return Path(config.work_dir) if config.work_dir else Path.home() / ".cache" / "omnicoder" / "bench"


def peer_python(given: str | None) -> str | None:
    """The benchmark-only peer environment's Python: `given`, or .venv-peers/bin/python when None; None
    when it is "" or no such file exists."""
    if given == "":
        return None
    candidate = given or str(Path(".venv-peers") / "bin" / "python")
    return candidate if Path(candidate).is_file() else None


def run_worker(python: str, spec: dict[str, Any], timeout_s: float = 1800) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"])}
    proc = subprocess.run([python, str(WORKER)], input=json.dumps(spec), capture_output=True, text=True,
                          timeout=timeout_s, env=env)  # fmt: skip
    if proc.returncode != 0:
        tail = " ".join(proc.stderr.split())[-300:]
        raise OnnxBenchError(f"{spec['engine']} worker failed (exit {proc.returncode}): {tail}")
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise OnnxBenchError(f"{spec['engine']} worker printed no JSON result") from None


def _file_mb(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.iterdir() if p.suffix in (".onnx", ".data")]
    return sum(p.stat().st_size for p in files) / 2**20


def prepare(config: OnnxBenchConfig, peers: str | None, report: Progress) -> dict[str, Path]:
    """Our export, and (with a peer environment) the Q4_0 requantization and the GenAI build."""
    from omni_export.export import ExportConfig, export_onnx
    from omni_model.loader import resolve_source

    work = _work_dir(config)
    work.mkdir(parents=True, exist_ok=True)
    gguf = resolve_source(config.model)
    out = {"omnicoder-onnx": work / "omnicoder-int4"}
    report("exporting OmniCoder int4", 0, 1)
    export_onnx(config.model, out["omnicoder-onnx"], ExportConfig(weights="int4"))
    if ablate_minimums(out["omnicoder-onnx"], work / "omnicoder-int4-no-minimums"):
        out[ABLATION] = work / "omnicoder-int4-no-minimums"
    report("exporting OmniCoder int4 with an int8 KV cache", 0, 1)
    export_onnx(config.model, work / "omnicoder-int4-int8kv", ExportConfig(weights="int4", kv="int8"))
    out[INT8_KV] = work / "omnicoder-int4-int8kv"
    if peers is None or not gguf.is_file():
        return out
    out["llama.cpp Q4_1"] = gguf
    q4_0 = work / "model.Q4_0.gguf"
    if not q4_0.is_file():
        report("requantizing to Q4_0 with llama.cpp", 0, 1)
        code = ("import ctypes, llama_cpp, sys\np = llama_cpp.llama_model_quantize_default_params()\n"
                "p.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0\np.allow_requantize = True\n"
                "sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p)))")  # fmt: skip
        subprocess.run([peers, "-c", code, str(gguf), str(q4_0) + ".tmp"], check=True, capture_output=True)
        os.replace(str(q4_0) + ".tmp", q4_0)
    out["llama.cpp Q4_0"] = q4_0
    genai = work / "ort-genai-int4"
    if not (genai / "genai_config.json").is_file():
        report("building the ORT GenAI int4 model with its builder", 0, 1)
        hf = work / "hf-float32"
        write_hf_folder(config.model, hf)
        proc = subprocess.run([peers, "-m", "onnxruntime_genai.models.builder", "-m", str(hf), "-i", str(hf),
                               "-o", str(genai) + ".tmp", "-p", "int4", "-e", "cpu", "-c", str(work / "genai-cache")],
                              capture_output=True, text=True)  # fmt: skip
        if proc.returncode != 0:
            raise OnnxBenchError(f"the ORT GenAI builder failed: {' '.join(proc.stderr.split())[-300:]}")
        os.replace(str(genai) + ".tmp", genai)
    out["ort-genai"] = genai
    return out


def ablate_minimums(src: Path, dst: Path) -> bool:
    """Copy the export at `src` to `dst` with every `+ blocksum(x) @ minimums` term removed (the Add
    passes its other input through; the dead nodes go). False when the graph has no such term."""
    import shutil

    import onnx

    model = onnx.load(str(src / "model.onnx"), load_external_data=False)
    nodes = model.graph.node
    mins_out = {n.output[0] for n in nodes if n.op_type == "MatMul" and n.input[1].endswith(".block_mins_t")}
    if not mins_out:
        return False
    for n in nodes:
        if n.op_type == "Add" and n.input[1] in mins_out:
            n.op_type = "Identity"
            del n.input[1:]
    used = {o.name for o in model.graph.output}
    keep: list[onnx.NodeProto] = []
    for n in reversed(list(nodes)):  # nodes are in topological order: walk back, keep what is used
        if any(o in used for o in n.output):
            keep.append(n)
            used.update(i for i in n.input if i)
    del model.graph.node[:]
    model.graph.node.extend(reversed(keep))
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    onnx.save_model(model, str(dst / "model.onnx"))  # initializers still point into the copied data file
    return True


def write_hf_folder(model: str, folder: Path) -> None:
    """The model as a float32 Hugging Face Llama folder (what the GenAI builder reads)."""
    from safetensors.torch import save_file

    import omni_model

    lm = omni_model.load(model, fuse=False)
    c = lm.config
    folder.mkdir(parents=True, exist_ok=True)
    state = {("model." + k if k != "lm_head.weight" else k): v.contiguous()
             for k, v in lm.model.state_dict().items() if not (c.tie_embeddings and k == "lm_head.weight")}  # fmt: skip
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": c.vocab_size,
              "hidden_size": c.dim, "intermediate_size": c.ffn_dim, "num_hidden_layers": c.n_layers,
              "num_attention_heads": c.n_heads, "num_key_value_heads": c.n_kv_heads, "head_dim": c.head_size,
              "max_position_embeddings": c.max_seq_len, "rms_norm_eps": c.norm_eps, "rope_theta": c.rope.theta,
              "tie_word_embeddings": c.tie_embeddings, "bos_token_id": c.bos_token_id,
              "eos_token_id": c.eos_token_id, "hidden_act": "silu", "torch_dtype": "float32"}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    lm.tokenizer.save(folder)


def run_onnx_bench(config: OnnxBenchConfig, on_progress: Progress | None = None) -> OnnxReport:
    from omni_model.tokenizer import Tokenizer
    from press_play.bench import machine_info

    report = on_progress or (lambda what, done, total: None)
    peers = peer_python(config.peer_python)
    paths = prepare(config, peers, report)
    result = OnnxReport(config, machine_info(config.threads))
    result.peers_note = "" if peers else "peers not measured: no benchmark-only peer environment (see README)"
    tok = Tokenizer.from_hf_folder(paths["omnicoder-onnx"])
    from press_play.common import read_text

    ids = tok.encode(read_text(config.text))
    if len(ids) < max(config.prompt_tokens, config.ppl_tokens):
        raise OnnxBenchError(f"{config.text}: {len(ids)} tokens, fewer than the benchmark needs")
    base = {"threads": config.threads, "n_ctx": config.prompt_tokens + config.decode_tokens + 8,
            "prompt_ids": ids[: config.prompt_tokens], "short_ids": ids[: config.short_tokens],
            "decode_tokens": config.decode_tokens, "measure": "speed"}  # fmt: skip
    pythons = {name: (sys.executable if name == "omnicoder-onnx" else peers) for name in paths}
    pythons[ABLATION] = pythons[INT8_KV] = sys.executable
    kinds = {"omnicoder-onnx": "omnicoder-onnx", ABLATION: "omnicoder-onnx", INT8_KV: "omnicoder-onnx", "ort-genai": "ort-genai", "llama.cpp Q4_1": "llama.cpp",
             "llama.cpp Q4_0": "llama.cpp"}  # fmt: skip
    scored = [name for name in paths if name != ABLATION]
    total, done = config.rounds * len(paths) + len(scored) + 1, 0
    for name, path in paths.items():
        result.engines[name] = {"path": str(path), "file_mb": _file_mb(path), "runs": []}
    for r in range(config.rounds):
        order = list(paths) if r % 2 == 0 else list(reversed(paths))
        for name in order:
            report(f"{name}: round {r + 1}/{config.rounds}", done, total)
            spec = {**base, "engine": kinds[name], "path": str(paths[name])}
            result.engines[name]["runs"].append(run_worker(pythons[name], spec))  # type: ignore[arg-type]
            done += 1
    for name in scored:
        report(f"{name}: perplexity", done, total)
        spec = {**base, "engine": kinds[name], "path": str(paths[name]), "measure": "ppl",
                "ppl_ids": ids[: config.ppl_tokens], "context": config.context}  # fmt: skip
        result.engines[name]["ppl"] = run_worker(pythons[name], spec)["ppl"]  # type: ignore[arg-type]
        done += 1
    report("measuring read bandwidth", done, total)
    from press_play.bench import run_worker as run_bench_worker

    result.bandwidth = run_bench_worker({"engine": "bandwidth", "mb": 256 if config.quick else 1024,
                                         "threads": config.threads})  # fmt: skip
    report("float32 reference perplexity", done, total)
    result.float32_ppl = _float32_ppl(config, ids[: config.ppl_tokens])
    ours = result.engines["omnicoder-onnx"]["runs"][0]["greedy_tokens"]
    for name in scored:
        theirs = result.engines[name]["runs"][0]["greedy_tokens"]
        result.agreement[name] = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b),
                                      min(len(ours), len(theirs)))  # fmt: skip
    report("done", total, total)
    return result


def _float32_ppl(config: OnnxBenchConfig, ids: list[int]) -> float:
    import omni_model
    from omni_model.perplexity import perplexity

    lm = omni_model.load(config.model)
    return perplexity(lm.model, ids, config.context).ppl


def render_onnx_section(rep: OnnxReport) -> str:
    c, m = rep.config, rep.machine
    spread = c.rounds > 1

    def cell(name: str, key: str, fmt: str) -> str:
        vals = [r[key] for r in rep.engines[name]["runs"]]
        med = statistics.median(vals)
        return f"{med:{fmt}} ({min(vals):{fmt}}–{max(vals):{fmt}})" if spread else f"{med:{fmt}}"

    names = list(rep.engines)
    lines = [
        f"<!-- bench:{SECTION}:start -->",
        "## Exported 4-bit SmolLM2: OmniCoder's ONNX graph against llama.cpp and ONNX Runtime GenAI",
        "",
        f"All engines on the same token ids (the start of `{c.text}`), {c.threads} threads, greedy. Decode tok/s = "
        f"{c.decode_tokens - 1} / (time of token {c.decode_tokens} − time of token 1), after a {c.short_tokens}-token "
        f"and after a {c.prompt_tokens}-token prompt; prefill = the {c.prompt_tokens}-token prompt's forward; peak RSS "
        f"of a process that loads, prefills {c.prompt_tokens} and decodes {c.decode_tokens}; perplexity on the first "
        f"{c.ppl_tokens} tokens in {c.context}-token windows. Each engine runs in a fresh process per round; "
        f"{c.rounds} round(s), engines alternating; cells are the median (min–max).",
        "",
        f"- Machine: {m['cpu']}, {m['cores']} cores; Python {m['python']}; {m['date']}",
        "- Command: `just bench --suite onnx` (= `uv run python -m press_play.bench --suite onnx`)",
        f"- float32 perplexity ({FLOAT32_PPL_NOTE}): **{rep.float32_ppl:.2f}**",
    ]
    if rep.peers_note:
        lines.append(f"- {rep.peers_note}")
    lines += [
        "",
        f"| engine | file MB | decode tok/s @{c.short_tokens} | decode tok/s @{c.prompt_tokens} | prefill tok/s | "
        "peak RSS MB | perplexity | vs float32 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in names:
        e = rep.engines[name]
        ppl = e.get("ppl")
        quality = "— | —" if ppl is None else f"{ppl:.2f} | {100 * (ppl / rep.float32_ppl - 1):+.2f}%"
        lines.append(
            f"| {name} | {e['file_mb']:.1f} | {cell(name, 'decode_tok_s_short', ',.1f')} | "
            f"{cell(name, 'decode_tok_s_long', ',.1f')} | {cell(name, 'prefill_tok_s', ',.0f')} | "
            f"{cell(name, 'peak_rss_mb', ',.0f')} | {quality} |"
        )
    lines.append("")
    if "ort-genai" in rep.engines and "llama.cpp Q4_1" in rep.engines:
        ours = "omnicoder-onnx"

        def ratio(a: str, b: str, key: str) -> float:
            return rep.median(a, key) / rep.median(b, key)

        checks = [
            ("decode @16 vs ORT GenAI", ratio(ours, "ort-genai", "decode_tok_s_short"), ">= 1.0x"),
            (
                f"decode @{c.prompt_tokens} vs ORT GenAI",
                ratio(ours, "ort-genai", "decode_tok_s_long"),
                ">= 1.0x",
            ),
            ("prefill vs ORT GenAI", ratio(ours, "ort-genai", "prefill_tok_s"), ">= 1.0x"),
            ("peak RSS vs llama.cpp Q4_1", ratio(ours, "llama.cpp Q4_1", "peak_rss_mb"), "<= 1.5x"),
        ]
        lines += ["| target | ratio | wanted | met |", "|---|---:|---|---|"]
        for what, value, wanted in checks:
            ok = value >= 1.0 if wanted.startswith(">=") else value <= 1.5
            lines.append(f"| {what} | {value:.2f}x | {wanted} | {'yes' if ok else 'no'} |")
        q = 100 * (rep.engines[ours]["ppl"] / rep.float32_ppl - 1)
        lines.append(
            f"| int4 perplexity vs float32 | {q:+.2f}% | within 1% | {'yes' if abs(q) <= 1 else 'no'} |"
        )
        lines.append("")
    if rep.bandwidth:
        bps = rep.bandwidth["bytes_per_s"]
        parts = []
        for name in (n for n in names if n != ABLATION):
            mb = rep.engines[name]["file_mb"]
            bound = bps / (mb * 2**20)
            parts.append(
                f"{name} {100 * rep.median(name, 'decode_tok_s_short') / bound:.0f}% of {bound:.0f} tok/s"
            )
        lines.append(
            f"Memory-bandwidth bound on decode: read bandwidth with {c.threads} threads {bps / 1e9:.1f} GB/s (bench_worker, "
            "as in the SmolLM2 section); a decoded token reads every weight once, so bytes/token is about each "
            "engine's weight file (a tied embedding is read whole as the head). Decode @16 against that bound: "
            + "; ".join(parts)
            + "."
        )
        lines.append("")
    if ABLATION in rep.engines:
        ours, cut = (
            rep.median("omnicoder-onnx", "decode_tok_s_short"),
            rep.median(ABLATION, "decode_tok_s_short"),
        )
        lines.append(
            f"Where OmniCoder's decode time goes: carrying GGUF Q4_1 exactly (each block's minimum m as "
            f"`blocksum(x) @ m`, four small ops beside every MatMulNBits, because ONNX Runtime's int8-compute "
            f"MatMulNBits kernel takes only integer zero points) costs {1e3 / ours - 1e3 / cut:.2f} ms of "
            f"{1e3 / ours:.2f} ms per token at @{c.short_tokens}: without it the same graph decodes at {cut:.0f} "
            f"tok/s (outputs wrong, timing only). Dropping the minimums for MatMulNBits' own zero points, or "
            f"symmetric 4-bit as the ORT GenAI builder and llama.cpp Q4_0 do, buys that speed with the perplexity "
            f"rows above."
        )
        lines.append("")
    agree = ", ".join(f"{k} {v}/{c.decode_tokens}" for k, v in rep.agreement.items() if k != "omnicoder-onnx")
    if agree:
        lines.append(f"Greedy tokens equal to OmniCoder's from the first on (512-token prompt): {agree}.")
    lines.append(f"<!-- bench:{SECTION}:end -->")
    return "\n".join(lines) + "\n"
