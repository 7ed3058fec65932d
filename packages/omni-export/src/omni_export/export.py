"""`export_onnx(source, out)`: a model folder a phone-like runtime opens with no torch in sight.

The folder holds `model.onnx` (+ `model.onnx.data`, the weights), the tokenizer files and
`manifest.json`: the architecture, the quantization scheme, the graph's input/output names, the
weight bytes and KV bytes per token, and the parity figures measured at export (the exported graph
against the PyTorch decoder on the start of the default text: logits over a prefill and cached
decode steps, and how many greedy tokens agree). The folder is written under a temporary name and
renamed when complete, so an interrupted export never leaves a folder that looks finished.
Latent-attention models get the latent cache layout (manifest kv.layout "latent"; see onnx_sparse);
the routed experts of MoE models are quantized in onnx_sparse.wide_experts' layout for int4/int8.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

import omni_model
from omni_export.errors import ExportError, UnsupportedExportError
from omni_export.onnx_decoder import (
    KV_SCHEME_INT8,
    GraphOptions,
    KVFormat,
    WeightFormat,
    build_decoder_graph,
    check_supported,
)
from omni_export.onnx_sparse import wide_experts
from omni_export.session import OnnxDecoder
from omni_export.weights import QuantLinear, Weight, float_weights, quantized_weights
from omni_kernels.quant import quantize_blockwise
from omni_model.files import replace_dir
from omni_model.loader import resolve_source

MANIFEST = "manifest.json"
FORMAT = "omnicoder-onnx"
VERSION = 1
GRAPH, DATA = "model.onnx", "model.onnx.data"
KV_CALIBRATION = "kv-calibration.json"
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class ExportConfig:
    weights: WeightFormat = "int4"
    block_size: int = 32  # 4/8-bit blocks along K (16, 32, 64, 128, 256)
    symmetric: bool = False
    accuracy_level: int = 4  # MatMulNBits compute: 1 float32, 4 int8 activations (faster)
    max_seq_len: int = 4096  # context the graph serves (capped by the model's)
    kv: KVFormat = "float32"  # the cache at the graph's inputs/outputs: float32, or int8 codes + scales
    kv_calibration: str | None = None  # int8 KV: a sidecar from `press-play kv calibrate` (keys pre-scaled)
    parity_prompt_tokens: int = 64
    parity_decode_tokens: int = 32
    media_placeholders: tuple[int, ...] = ()  # ids whose rows come from a media_embeds input (GraphOptions)

    def __post_init__(self) -> None:
        self.graph_options(self.max_seq_len)  # validates the graph's fields
        if self.block_size not in (16, 32, 64, 128, 256):
            raise UnsupportedExportError(f"block_size must be 16, 32, 64, 128 or 256, got {self.block_size}")
        if self.kv_calibration is not None and self.kv != "int8":
            raise UnsupportedExportError("a KV calibration applies to an int8 KV cache (--kv int8)")
        if self.parity_prompt_tokens < 1 or self.parity_decode_tokens < 0:
            raise ExportError("parity_prompt_tokens must be >= 1 and parity_decode_tokens >= 0")

    def graph_options(self, max_seq_len: int) -> GraphOptions:
        return GraphOptions(self.weights, self.accuracy_level, max_seq_len, self.kv, self.media_placeholders)


def export_onnx(
    source: str | Path, out: str | Path, config: ExportConfig | None = None, on_progress: Progress | None = None,
    parity_text: str | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Export `source` (zoo name, folder or GGUF) to the folder `out`; returns the manifest."""
    config = config or ExportConfig()
    report = on_progress or (lambda what, done, total: None)
    out = Path(out)
    report("loading the model", 0, 5)
    lm = omni_model.load(source, fuse=False)
    cfg = lm.config
    check_supported(cfg, config.graph_options(config.max_seq_len))
    max_seq = min(config.max_seq_len, cfg.max_seq_len)
    report(f"preparing {config.weights} weights", 1, 5)
    state = lm.model.state_dict()
    if config.weights in ("float32", "float16"):
        weights: dict[str, Any] = float_weights(state)
        if cfg.tie_embeddings:
            weights.pop("lm_head.weight", None)
        origin = {"converted": 0, "quantized": 0}
    else:
        bits = 4 if config.weights == "int4" else 8
        origin = {"converted": 0, "quantized": 0}

        def count(name: str, how: str) -> None:
            origin["converted" if how.startswith("converted") else "quantized"] += 1

        weights = quantized_weights(state, cfg, resolve_source(source), bits, config.block_size,
                                    config.symmetric, count)  # fmt: skip
        origin["quantized"] += _quantize_experts(weights, cfg, bits, config.block_size, config.symmetric)
    report("building the graph", 2, 5)
    opts = config.graph_options(max_seq)
    calibration = None
    if config.kv_calibration is not None:
        from omni_kv.calibration import KVCalibration

        calibration = KVCalibration.load(config.kv_calibration)
        calibration.check_model(cfg.n_layers, cfg.n_kv_heads, cfg.head_size, str(source))
    key_scales = None
    if calibration is not None:
        key_scales = np.stack([calibration.key_scales(i).numpy() for i in range(cfg.n_layers)])
    graph = build_decoder_graph(cfg, weights, opts, key_scales)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        onnx.save_model(
            graph, str(tmp / GRAPH), save_as_external_data=True, location=DATA, size_threshold=1024
        )
        del graph
        tokenizer_files = lm.tokenizer.save(tmp)
        if calibration is not None:
            calibration.save(tmp / KV_CALIBRATION)
        report("measuring parity against PyTorch", 3, 5)
        parity = measure_parity(lm, tmp / GRAPH, cfg, config, parity_text)
        weight_bytes = sum(_nbytes(w) for w in weights.values())
        manifest = {
            "format": FORMAT, "version": VERSION, "graph": GRAPH, "weights_file": DATA,
            "source": str(source),
            "config": _config_json(cfg), "max_seq_len": max_seq,
            "quantization": {"weights": config.weights, "block_size": config.block_size,
                             "symmetric": config.symmetric, "accuracy_level": config.accuracy_level,
                             "embedding_and_head_bits": 8 if config.weights in ("int4", "int8") else None,
                             "tensors_converted_from_gguf": origin["converted"],
                             "tensors_quantized_from_float": origin["quantized"]},
            "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask", "logits_to_keep": "logits_to_keep",
                       "past_key": "past_key_values.{i}.key", "past_value": "past_key_values.{i}.value"}
                      | ({"media_embeds": "media_embeds"} if config.media_placeholders else {}),
            "media_placeholders": sorted(set(config.media_placeholders)),
            "outputs": {"logits": "logits", "hidden_states": "hidden_states", "present_key": "present.{i}.key", "present_value": "present.{i}.value"},
            "kv": _kv_manifest(cfg, config.kv) | ({"calibration": KV_CALIBRATION} if calibration else {}),
            "weight_bytes": weight_bytes, "file_bytes": (tmp / DATA).stat().st_size + (tmp / GRAPH).stat().st_size,
            "tokenizer": {"files": tokenizer_files, "eos_token_ids": sorted(lm.tokenizer.eos_token_ids),
                          "bos_token_id": lm.tokenizer.bos_token_id},
            "parity": parity,
        }  # fmt: skip
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        report("writing the folder", 4, 5)
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 and mkstemp-like 0600 are for the temporary name only
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        replace_dir(tmp, out, marker=MANIFEST, what="an exported model", error=ExportError)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report("done", 5, 5)
    return manifest


def measure_parity(lm, graph: Path, cfg, config: ExportConfig, text: str | None) -> dict[str, Any]:
    """The exported graph against the PyTorch decoder: max |logits difference| over a prefill and
    cached decode steps, and the greedy tokens that agree. Both sides run on one thread: the figures
    go into the manifest, which a build's later stages hash, and a thread pool's split of a sum can
    change its last bits from one run to the next on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _measure_parity(lm, graph, cfg, config, text)
    finally:
        torch.set_num_threads(before)


@torch.inference_mode()
def _measure_parity(lm, graph: Path, cfg, config: ExportConfig, text: str | None) -> dict[str, Any]:
    n_prompt, n_decode = config.parity_prompt_tokens, config.parity_decode_tokens
    if text is None:
        from omni_model.corpus import text_path

        text = text_path("hamlet").read_text(encoding="utf-8")
    ids = lm.tokenizer.encode(text[: 40 * n_prompt])[:n_prompt]
    if len(ids) < n_prompt:
        raise ExportError(f"the parity text has {len(ids)} tokens, fewer than the {n_prompt} asked for")
    threads = 1
    if cfg.mla is None and not config.media_placeholders:
        session: OnnxDecoder | _Session = OnnxDecoder(graph, cfg, threads=threads, kv=config.kv)
    else:
        session = _Session(graph, threads, append=cfg.mla is not None or config.kv == "int8")
    onnx_logits = session.step(np.array([ids]))[0, -1]
    if config.kv == "int8":  # the graph codes its cache as omni_kv's int8 cache does: compare with that
        from omni_kv import CacheSpec

        cache = lm.model.make_cache(spec=CacheSpec("int8", calibration=config.kv_calibration))
    else:
        cache = lm.model.make_cache(max_len=n_prompt + n_decode + 1)
    torch_logits = lm.model(torch.tensor([ids]), cache=cache)[0].numpy()
    prefill_err = float(np.abs(session.last_all - torch_logits).max())
    decode_err, agree, ours, theirs = 0.0, 1, int(onnx_logits.argmax()), int(torch_logits[-1].argmax())
    agree = int(ours == theirs)
    for _ in range(n_decode):
        if ours != theirs:
            break
        o = session.step(np.array([[ours]]))[0, -1]
        t = lm.model(torch.tensor([[theirs]]), cache=cache)[0, -1].numpy()
        decode_err = max(decode_err, float(np.abs(o - t).max()))
        ours, theirs = int(o.argmax()), int(t.argmax())
        agree += int(ours == theirs)
    return {"prompt_tokens": n_prompt, "decode_steps": n_decode, "max_abs_logits_diff_prefill": prefill_err,
            "max_abs_logits_diff_decode": decode_err, "greedy_tokens_agreeing": agree,
            "greedy_tokens_compared": n_decode + 1,
            "reference": "omni_model PyTorch decoder, float32" + (", omni_kv int8 cache" if config.kv == "int8" else "")}  # fmt: skip


class _Session:
    """The parity loop for graphs session.OnnxDecoder does not know: latent caches (present outputs
    hold the new tokens only, appended here) and a media_embeds input (zeros: text only). Cache
    shapes and types come from the graph's inputs."""

    def __init__(self, graph: Path, threads: int, append: bool) -> None:
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(graph), so, providers=["CPUExecutionProvider"])
        types = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(uint8)": np.uint8}
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.past = {name: np.zeros((1, i.shape[1], 0, i.shape[3]), types[i.type])
                     for name, i in self.inputs.items() if name.startswith("past_key_values.")}  # fmt: skip
        self.append, self.last_all = append, np.zeros((0,))

    def step(self, ids: np.ndarray) -> np.ndarray:
        """Logits (1, T, V) of the new tokens `ids` (1, T); the cache advances."""
        t = ids.shape[1]
        total = t + next(iter(self.past.values())).shape[2]
        feeds = {"input_ids": ids.astype(np.int64), "attention_mask": np.ones((1, total), np.int64),
                 "logits_to_keep": np.array(0, np.int64), **self.past}  # fmt: skip
        if "media_embeds" in self.inputs:
            feeds["media_embeds"] = np.zeros((1, t, self.inputs["media_embeds"].shape[2]), np.float32)
        names = [o.name for o in self.session.get_outputs()]
        out = dict(zip(names, self.session.run(None, feeds), strict=True))
        for name, old in self.past.items():
            new = out[name.replace("past_key_values.", "present.", 1)]
            self.past[name] = np.concatenate([old, new], axis=2) if self.append else new
        self.last_all = out["logits"][0]
        return out["logits"]


def _quantize_experts(weights: dict[str, Weight], cfg, bits: int, block_size: int, symmetric: bool) -> int:
    """Replace each MoE layer's stacked experts (in place) by the two wide quantized matrices the graph
    runs them as (onnx_sparse.wide_experts); returns how many tensors were quantized."""
    n = 0
    for i in range(cfg.n_layers):
        p = f"layers.{i}.mlp.experts."
        if not cfg.is_moe_layer(i) or not isinstance(weights.get(p + "gate_up_proj"), np.ndarray):
            continue
        w1, w2 = wide_experts(weights[p + "gate_up_proj"], weights[p + "down_proj"])  # type: ignore[arg-type]
        weights[p + "gate_up_proj"] = QuantLinear(quantize_blockwise(w1, bits, block_size, symmetric))
        weights[p + "down_proj"] = QuantLinear(quantize_blockwise(w2, bits, block_size, symmetric))
        n += 2
    return n


def _kv_manifest(cfg, kv: str) -> dict[str, Any]:
    if cfg.mla is not None:  # check_supported refuses an int8 cache here
        return {"layout": "latent", "n_layers": cfg.n_layers, "latent_dim": cfg.mla.kv_lora_rank,
                "rope_dim": cfg.mla.qk_rope_head_dim, "dtype": kv, "bytes_per_token": cfg.kv_bytes_per_token(4),
                "inputs": "past_key_values.{i}.key: normed latents (batch, 1, capacity, latent_dim); .value: rotated "
                          "shared keys (batch, 1, capacity, rope_dim); the graph reads the first total_sequence - "
                          "sequence positions",
                "outputs": "present.{i}.key|value: the new tokens only; the runtime appends them"}  # fmt: skip
    out = {"n_layers": cfg.n_layers, "n_kv_heads": cfg.n_kv_heads, "head_dim": cfg.head_size, "dtype": kv}
    if kv == "int8":
        from omni_kv import CacheSpec

        out |= {"scheme": KV_SCHEME_INT8, "bytes_per_token": int(CacheSpec("int8").bytes_per_token(
                    cfg.n_layers, cfg.n_kv_heads, cfg.head_size)),
                "inputs": "past_key_values.{i}.{key|value}[_scale|_offset]: the whole buffers (batch, kv_heads, "
                          "capacity, head_dim|1); the graph reads the first total_sequence - sequence positions",
                "outputs": "present.{i}.{key|value}[_scale|_offset]: the new tokens only; the runtime appends them"}  # fmt: skip
    else:
        out["bytes_per_token"] = cfg.kv_bytes_per_token(4)
    return out


def _nbytes(w: Any) -> int:
    return w.nbytes if isinstance(w, QuantLinear | np.ndarray) else 0


def _config_json(cfg) -> dict[str, Any]:
    def convert(v: Any) -> Any:
        if isinstance(v, tuple | frozenset | set):
            return [convert(x) for x in v]
        if isinstance(v, dict):
            return {k: convert(x) for k, x in v.items()}
        return v

    return convert(dataclasses.asdict(cfg))
