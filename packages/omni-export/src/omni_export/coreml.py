"""Core ML export: a decoder as one stateful ML Program (`.mlpackage`, iOS 18 / macOS 15 and later).

The KV cache is Core ML state: `key_cache` and `value_cache` (n_layers, 1, Hkv, max_seq_len, Dh),
float16 (the only state type Core ML has), written in place by the model. Inputs follow Apple's
stateful Llama (machinelearning.apple.com/research/core-ml-on-device-llama): `input_ids` (1, T) int32
and `causal_mask` (1, 1, T, S), T and S flexible in 1..max_seq_len, 0 where a query attends and -inf
where it does not. The shapes carry the positions: the T new tokens sit at S-T..S-1, are written
there in the cache and attend to its first S entries, so one model serves prefill (T = S) and decode
(T = 1). Output: `logits` (1, T, V) float32. Weights: 4-bit symmetric blocks with a float16 scale
per 32 (`constexpr_blockwise_shift_scale` on every projection and the embedding), float16 or
float32. The wrapper is traced with `torch.jit.trace` (coremltools 9.0's `torch.export` path trips
on torch 2.15's shape guards).
Prediction needs macOS; elsewhere a package is checked from its spec and weight file (`validate_coreml`).
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from omni_export.errors import ExportError, UnsupportedExportError
from omni_model.block import Block
from omni_model.config import ModelConfig
from omni_model.decoder import Decoder
from omni_model.files import replace_dir
from omni_model.layers import MLP, Attention

CoreMLWeights = Literal["int4", "float16", "float32"]
ComputeUnits = Literal["all", "cpu_only", "cpu_and_gpu", "cpu_and_ne"]
Progress = Callable[[str, int, int], None]
INPUTS, OUTPUT, STATES = ("input_ids", "causal_mask"), "logits", ("key_cache", "value_cache")
MARKER = "Manifest.json"  # what makes a folder a Core ML package (replace_dir's ownership check)
SPEC_FILE = Path("Data/com.apple.CoreML/model.mlmodel")
WEIGHT_FILE = Path("Data/com.apple.CoreML/weights/weight.bin")
QUANT_OP = "constexpr_blockwise_shift_scale"
SPEC_IOS18 = 9  # Core ML specification version of iOS 18, the first with states
# weight.bin has a 64-byte file header, then per tensor a 64-byte header and its data padded to 64
# bytes: the tolerance, per tensor, on top of the tensors' own bytes.
BLOB_OVERHEAD = 128


class CoreMLPackageError(ExportError):
    """A Core ML package is missing, unreadable, or not the model its config describes."""


@dataclass(frozen=True)
class CoreMLConfig:
    weights: CoreMLWeights = "int4"
    block_size: int = 32  # int4: weights per float16 scale along each row's input dimension
    max_seq_len: int = 2048  # cache positions (capped by the model's context)
    cache_dtype: Literal["float16"] = "float16"  # Core ML states are float16 only

    def __post_init__(self) -> None:
        if self.weights not in ("int4", "float16", "float32"):
            raise UnsupportedExportError(f"weights must be int4, float16 or float32, got {self.weights!r}")
        if self.block_size not in (16, 32, 64, 128, 256):
            raise UnsupportedExportError(
                f"block_size must be 16, 32, 64, 128 or 256, got {self.block_size!r}"
            )
        n = self.max_seq_len
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise UnsupportedExportError(f"max_seq_len must be a positive integer, got {self.max_seq_len!r}")
        if self.cache_dtype != "float16":
            raise UnsupportedExportError(
                f"cache_dtype must be float16 (Core ML states are float16 only), got {self.cache_dtype!r}"
            )

    @property
    def compute_precision(self) -> Literal["float16", "float32"]:
        return "float32" if self.weights == "float32" else "float16"


def context_length(cfg: ModelConfig, config: CoreMLConfig) -> int:
    """Cache positions of the package: the config's, capped by the model's context."""
    return min(config.max_seq_len, cfg.max_seq_len)


def check_supported(cfg: ModelConfig, config: CoreMLConfig | None = None) -> None:
    """Raise UnsupportedExportError naming what the Core ML export cannot express yet."""
    config = config or CoreMLConfig()
    if cfg.mla is not None:
        raise UnsupportedExportError(
            "latent attention (MLA) models are not supported by the Core ML export yet"
        )
    if cfg.moe is not None:
        raise UnsupportedExportError("mixture-of-experts models are not supported by the Core ML export yet")
    n = context_length(cfg, config)
    windows = {w for w in map(cfg.window_of, range(cfg.n_layers)) if w is not None and w < n}
    if windows:  # a window at least as long as the context never hides anything
        raise UnsupportedExportError(
            f"sliding-window attention (window {min(windows)} < context {n}) is not supported by the "
            "Core ML export yet"
        )
    if cfg.rope.type == "dynamic":
        raise UnsupportedExportError(
            "rope type 'dynamic' is not supported by the Core ML export (frequencies depend on the length)"
        )
    if config.weights == "int4":
        dims = {"dim": cfg.dim, "ffn_dim": cfg.ffn_dim, "n_heads * head_dim": cfg.n_heads * cfg.head_size}
        for name, k in dims.items():
            if k % config.block_size:
                raise UnsupportedExportError(
                    f"int4 blocks of {config.block_size} do not divide {name} ({k}); pick another block_size"
                )


class StatefulDecoder(nn.Module):
    """The decoder's own modules around a KV cache held in buffers that forward writes in place
    (coremltools turns them into states). forward(input_ids (1, T) int, causal_mask (1, 1, T, S)
    float) -> logits (1, T, V) float32, the new tokens at positions S-T..S-1."""

    def __init__(self, model: Decoder, max_seq_len: int, cache_dtype: torch.dtype = torch.float16) -> None:
        super().__init__()
        cfg = model.config
        for i, layer in enumerate(model.layers):
            plain = isinstance(layer, Block) and isinstance(layer.self_attn, Attention)
            if not (plain and isinstance(layer.mlp, MLP)):
                raise UnsupportedExportError(
                    f"layer {i} is not a plain attention + MLP block; load the model with fuse=False"
                )
        self.model = model
        shape = (cfg.n_layers, 1, cfg.n_kv_heads, max_seq_len, cfg.head_size)
        self.register_buffer("key_cache", torch.zeros(shape, dtype=cache_dtype))
        self.register_buffer("value_cache", torch.zeros(shape, dtype=cache_dtype))
        cos, sin = model.rope(0, max_seq_len)  # (max_seq_len, Dh): constants of the traced graph
        self.register_buffer("cos", cos.clone(), persistent=False)
        self.register_buffer("sin", sin.clone(), persistent=False)

    def forward(self, input_ids: Tensor, causal_mask: Tensor) -> Tensor:
        m = self.model
        t, end = input_ids.shape[1], causal_mask.shape[-1]
        past = end - t  # traced as shape arithmetic, so it stays flexible in the converted model
        cos, sin = self.cos[past:end], self.sin[past:end]  # (T, Dh)
        x = m.embed_tokens(input_ids)  # (1, T, D)
        for i, layer in enumerate(m.layers):
            h = layer.input_layernorm(x)
            x = x + self.attention(i, layer.self_attn, h, cos, sin, causal_mask, past, end)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return m.lm_head(m.norm(x)).float()

    def attention(
        self, i: int, a: Attention, h: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, past: Any, end: Any
    ) -> Tensor:
        t, nh, hkv, dh = h.shape[1], a.n_heads, a.n_kv_heads, a.head_dim
        q = a.q_proj(h).view(1, t, nh, dh)  # (1, T, H, Dh)
        k = a.k_proj(h).view(1, t, hkv, dh)
        v = a.v_proj(h).view(1, t, hkv, dh)
        if a.q_norm is not None and a.k_norm is not None:
            q, k = a.q_norm(q), a.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (1, H|Hkv, T, Dh)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        self.key_cache[i, :, :, past:end] = k.to(self.key_cache.dtype)
        self.value_cache[i, :, :, past:end] = v.to(self.value_cache.dtype)
        keys = self.key_cache[i, :, :, :end].to(q.dtype)  # (1, Hkv, S, Dh)
        values = self.value_cache[i, :, :, :end].to(q.dtype)
        # Each kv head serves G = H / Hkv query heads: (1, Hkv, S, Dh) -> (1, Hkv, G, S, Dh) -> (1, H, S, Dh).
        g = nh // hkv
        keys = keys[:, :, None].expand(1, hkv, g, end, dh).reshape(1, nh, end, dh)
        values = values[:, :, None].expand(1, hkv, g, end, dh).reshape(1, nh, end, dh)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask.to(q.dtype), scale=a.scale)
        return a.o_proj(out.transpose(1, 2).reshape(1, t, nh * dh))  # (1, T, D)


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """omni_model.rope.apply_rope with the half-split point a constant: the traced `x.shape[-1] // 2`
    of apply_rope becomes a tensor op that coremltools 9.0 fails to convert."""
    half = int(cos.shape[-1]) // 2
    x1, x2 = x[..., :half], x[..., half:]
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def trace(wrapper: StatefulDecoder) -> torch.jit.ScriptModule:
    """The TorchScript module export_coreml converts (traced on a 2-token prefill; T and S stay symbolic)."""
    ids, mask = torch.zeros((1, 2), dtype=torch.int32), torch.from_numpy(causal_mask(0, 2, np.float32))
    with _quiet(), torch.no_grad():
        # check_trace would re-run the trace on the same inputs (15 s of 20 for SmolLM2); the tests
        # run the traced module against the decoder on other lengths instead.
        return torch.jit.trace(wrapper, (ids, mask), check_trace=False)


def causal_mask(past: int, t: int, dtype: Any = np.float16) -> np.ndarray:
    """The `causal_mask` input (1, 1, T, past + T) for T new tokens after `past` cached ones."""
    q = np.arange(past, past + t)[:, None]
    k = np.arange(past + t)[None, :]
    return np.where(k <= q, 0.0, -np.inf).astype(dtype)[None, None]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """coremltools 9.0 logs warnings about untested torch and scikit-learn versions and draws tqdm
    bars on stderr for its passes; torch warns that tracing is deprecated. A library must not print,
    so they are silenced here (stderr is redirected process-wide while the block runs)."""
    loggers = [logging.getLogger(n) for n in ("coremltools", "torch.utils._pytree", "torch.jit")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _coremltools() -> Any:
    with _quiet():
        import coremltools as ct
        import coremltools.optimize.coreml  # makes ct.optimize.coreml available
    return ct


def export_coreml(
    lm: Any, path: Path, config: CoreMLConfig | None = None, on_progress: Progress | None = None
) -> dict[str, Any]:
    """Convert a loaded model (`omni_model.load(..., fuse=False)`) to the Core ML package `path`
    (a `.mlpackage` folder, validated, then put in place atomically); returns a JSON-able summary."""
    config = config or CoreMLConfig()
    report = on_progress or (lambda what, done, total: None)
    path, cfg = Path(path), lm.config
    if path.suffix != ".mlpackage":
        raise ExportError(f"{path}: a Core ML package path must end in .mlpackage")
    if path.exists() and not (path / MARKER).is_file():
        raise ExportError(f"{path}: exists and is not a Core ML package (no {MARKER}); not overwriting it")
    check_supported(cfg, config)
    if not isinstance(lm.model, Decoder):
        raise UnsupportedExportError(f"expected an omni_model Decoder, got {type(lm.model).__name__}")
    dtype = lm.model.embed_tokens.weight.dtype
    if dtype != torch.float32:
        raise UnsupportedExportError(
            f"the Core ML export traces a float32 model, got {dtype} (load it in float32)"
        )
    n = context_length(cfg, config)
    total = 5 if config.weights == "int4" else 4
    t0 = time.perf_counter()

    report("tracing the decoder", 0, total)
    ct = _coremltools()
    fp16 = config.compute_precision == "float16"
    mask_type = np.float16 if fp16 else np.float32
    wrapper = StatefulDecoder(lm.model, n).eval()
    try:  # coremltools fails in many ways (asserts, KeyErrors, ...): each becomes one ExportError line
        traced = trace(wrapper)
        report("converting to an ML Program", 1, total)
        seq, seen = ct.RangeDim(1, n, default=1), ct.RangeDim(1, n, default=1)
        state = ct.TensorType(shape=tuple(wrapper.key_cache.shape), dtype=np.float16)
        with _quiet():
            model = ct.convert(
                traced,
                inputs=[ct.TensorType(name=INPUTS[0], shape=(1, seq), dtype=np.int32),
                        ct.TensorType(name=INPUTS[1], shape=(1, 1, seq, seen), dtype=mask_type)],
                outputs=[ct.TensorType(name=OUTPUT, dtype=np.float32)],
                states=[ct.StateType(wrapped_type=state, name=s) for s in STATES],
                minimum_deployment_target=ct.target.iOS18,
                compute_precision=ct.precision.FLOAT16 if fp16 else ct.precision.FLOAT32,
                skip_model_load=True,
            )  # fmt: skip
            del traced, wrapper
            if config.weights == "int4":
                report(f"quantizing weights to int4 (blocks of {config.block_size})", 2, total)
                model = _quantize_int4(ct, model, config.block_size)
        model.author, model.short_description = "omni-export", f"{lm.source} ({config.weights} weights)"
    except Exception as e:
        raise ExportError(f"Core ML conversion failed: {type(e).__name__}: {_first_line(e)}") from e

    report("writing the package", total - 2, total)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        tmp = staging / path.name
        with _quiet():
            model.save(str(tmp))
        report("validating the package", total - 1, total)
        figures = validate_coreml(tmp, cfg, config)  # a package that fails is never put in place
        replace_dir(tmp, path, marker=MARKER, what="a Core ML package", error=ExportError)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    report("done", total, total)
    return {
        "format": "coreml-mlprogram",
        "path": str(path),
        "source": lm.source,
        "converter": f"torch.jit.trace -> coremltools {ct.__version__}",
        "minimum_deployment_target": "iOS18",
        "compute_precision": config.compute_precision,
        "block_size": config.block_size if config.weights == "int4" else None,
        "package_bytes": sum(f.stat().st_size for f in path.rglob("*") if f.is_file()),
        "seconds": round(time.perf_counter() - t0, 2),
        **figures,
    }


def _quantize_int4(ct: Any, model: Any, block_size: int) -> Any:
    """4-bit symmetric blocks on every linear and gather (embedding) weight, however small: the
    default weight_threshold (2048) would leave small projections in float16."""
    op = ct.optimize.coreml.OpLinearQuantizerConfig(
        mode="linear_symmetric", dtype="int4", granularity="per_block", block_size=block_size,
        weight_threshold=0,
    )  # fmt: skip
    opt = ct.optimize.coreml.OptimizationConfig(op_type_configs={"linear": op, "gather": op})
    return ct.optimize.coreml.linear_quantize_weights(model, config=opt)


def _first_line(e: BaseException) -> str:
    lines = [s.strip() for s in str(e).splitlines() if s.strip()]
    return lines[0] if lines else type(e).__name__


# ---- structural validation: the spec and the weight file, no model load (works off macOS)


def expected_weight_bytes(cfg: ModelConfig, config: CoreMLConfig) -> tuple[int, int]:
    """The least and the most bytes the weights take in this format, headers aside. Matrices
    (projections, embedding, head; a tied head shares the embedding's) at 4 bits plus a float16
    scale per block, or at float16 / float32; norms, biases and the rotary tables (cos and sin,
    context x Dh) at the compute precision. coremltools gives every bias-free linear a zero bias and
    merges equal ones (only the larger), so those count in the most only."""
    d, dh, nh, hkv, v, f = cfg.dim, cfg.head_size, cfg.n_heads, cfg.n_kv_heads, cfg.vocab_size, cfg.ffn_dim
    rows = [nh * dh, hkv * dh, hkv * dh, d, f, f, d]  # q, k, v, o, gate, up, down: output features
    cols = [d, d, d, nh * dh, d, d, f]
    matrices = [v * d] * (1 if cfg.tie_embeddings else 2)
    matrices += [r * c for r, c in zip(rows, cols, strict=True)] * cfg.n_layers
    vectors = (2 * cfg.n_layers + 1) * d + (2 * cfg.n_layers * dh if cfg.qk_norm else 0)
    vectors += 2 * context_length(cfg, config) * dh
    biases = sum(rows) * cfg.n_layers + v
    real = sum(rows[:3]) * cfg.n_layers if cfg.qkv_bias else 0
    if config.weights == "int4":
        size, width = sum(m // 2 + m // config.block_size * 2 for m in matrices), 2
    else:
        width = 2 if config.weights == "float16" else 4
        size = width * sum(matrices)
    return size + width * (vectors + real), size + width * (vectors + biases)


def validate_coreml(path: Path, cfg: ModelConfig, config: CoreMLConfig) -> dict[str, Any]:
    """Check a package against the model and format it should hold, from its spec and weight file
    only (no model load, no prediction); returns the figures found. Raises CoreMLPackageError."""
    path = Path(path)
    for f in (path / MARKER, path / SPEC_FILE, path / WEIGHT_FILE):
        if not f.is_file():
            raise CoreMLPackageError(
                f"{path}: not a complete Core ML package ({f.relative_to(path)} is missing)"
            )
    ct = _coremltools()
    try:
        with _quiet():
            spec = ct.models.MLModel(str(path), skip_model_load=True).get_spec()
    except Exception as e:  # protobuf, json and coremltools each fail their own way on a damaged package
        raise CoreMLPackageError(
            f"{path}: unreadable Core ML package ({type(e).__name__}: {_first_line(e)})"
        ) from e
    if spec.WhichOneof("Type") != "mlProgram" or spec.specificationVersion < SPEC_IOS18:
        raise CoreMLPackageError(
            f"{path}: holds a {spec.WhichOneof('Type')} of spec version {spec.specificationVersion}; "
            f"expected an mlProgram of version >= {SPEC_IOS18} (iOS 18, states)"
        )
    n, desc = context_length(cfg, config), spec.description
    mask_type = "FLOAT16" if config.compute_precision == "float16" else "FLOAT32"
    want = {INPUTS[0]: ("INT32", [(1, 1), (1, n)]), INPUTS[1]: (mask_type, [(1, 1), (1, 1), (1, n), (1, n)])}
    inputs = {i.name: _array(path, i, "input") for i in desc.input}
    if set(inputs) != set(want):
        raise CoreMLPackageError(f"{path}: inputs are {sorted(inputs)}; expected {sorted(want)}")
    for name, (dtype, ranges) in want.items():
        got = inputs[name]
        if (got["dtype"], got["ranges"]) != (dtype, ranges):
            raise CoreMLPackageError(
                f"{path}: input {name!r} is {got['dtype']} with dim ranges {got['ranges']}; "
                f"expected {dtype} with {ranges}"
            )
    states = {s.name: _state(s) for s in desc.state}
    want_state = {"dtype": "FLOAT16", "shape": [cfg.n_layers, 1, cfg.n_kv_heads, n, cfg.head_size]}
    for name in STATES:
        if states.get(name) != want_state:
            raise CoreMLPackageError(f"{path}: state {name!r} is {states.get(name)}; expected {want_state}")

    fn = spec.mlProgram.functions["main"]
    block = fn.block_specializations[fn.opset]
    outputs = {o.name: _array(path, o, "output") for o in desc.output}
    logits = _program_output_shape(block, OUTPUT)
    found = (sorted(outputs), outputs.get(OUTPUT, {}).get("dtype"), logits)
    if found != ([OUTPUT], "FLOAT32", [1, None, cfg.vocab_size]):
        shape = None if logits is None else ["T" if d is None else d for d in logits]
        raise CoreMLPackageError(
            f"{path}: outputs are {sorted(outputs)}, {OUTPUT!r} of shape {shape}; expected only {OUTPUT!r} "
            f"FLOAT32 [1, T, {cfg.vocab_size}]"
        )
    quantized = _check_weights(path, block, cfg, config)
    weight_bytes = (path / WEIGHT_FILE).stat().st_size
    least, most = expected_weight_bytes(cfg, config)
    tensors = sum(1 for op in block.operations for _ in _blobs(op))
    most += BLOB_OVERHEAD * (tensors + 1)
    if not least <= weight_bytes <= most:
        raise CoreMLPackageError(
            f"{path}: weight.bin holds {weight_bytes} bytes; {config.weights} weights of this model "
            f"take {least}..{most} (headers of {tensors} tensors included)"
        )
    return {
        "inputs": inputs,
        "outputs": {OUTPUT: {"dtype": "FLOAT32", "shape": [1, "T", cfg.vocab_size]}},
        "states": states,
        "max_seq_len": n,
        "weights": config.weights,
        "weight_bytes": weight_bytes,
        "expected_weight_bytes": [least, most],
        "weight_tensors": tensors,
        "int4_tensors": quantized,
        "op_types": dict(sorted(Counter(op.type for op in block.operations).items())),
        "spec_version": spec.specificationVersion,
    }


def _array(path: Path, feature: Any, what: str) -> dict[str, Any]:
    if feature.type.WhichOneof("Type") != "multiArrayType":
        raise CoreMLPackageError(f"{path}: {what} {feature.name!r} is not a multi-array")
    a = feature.type.multiArrayType
    ranges = [(int(r.lowerBound), int(r.upperBound)) for r in a.shapeRange.sizeRanges]
    return {"dtype": type(a).ArrayDataType.Name(a.dataType), "shape": list(a.shape), "ranges": ranges}


def _state(feature: Any) -> dict[str, Any] | None:
    if feature.type.WhichOneof("Type") != "stateType":
        return None
    a = feature.type.stateType.arrayType
    return {"dtype": type(a).ArrayDataType.Name(a.dataType), "shape": list(a.shape)}


def _program_output_shape(block: Any, name: str) -> list[int | None] | None:
    """Dims of the program value `name` (None where flexible), from the op that makes it."""
    for op in block.operations:
        for o in op.outputs:
            if o.name == name:
                dims = o.type.tensorType.dimensions
                return [d.constant.size if d.WhichOneof("dimension") == "constant" else None for d in dims]
    return None


def _blobs(op: Any) -> Iterator[Any]:
    """The values of an op stored in weight.bin."""
    for arg in op.inputs.values():
        for a in arg.arguments:
            if a.WhichOneof("binding") == "value" and a.value.WhichOneof("value") == "blobFileValue":
                yield a.value
    for attr in op.attributes.values():
        if attr.WhichOneof("value") == "blobFileValue":
            yield attr


def _check_weights(path: Path, block: Any, cfg: ModelConfig, config: CoreMLConfig) -> int:
    """Every projection (linear) and the embedding (gather) read a constant weight in the package's
    format; returns how many distinct 4-bit weights they read (a tied head shares the embedding's)."""
    makers = {o.name: op for op in block.operations for o in op.outputs}
    seen, quantized = Counter(), set()
    for op in block.operations:
        if op.type not in ("linear", "gather"):
            continue
        source = op.inputs["weight" if op.type == "linear" else "x"].arguments[0]
        maker = makers.get(source.name) if source.WhichOneof("binding") == "name" else None
        if maker is None or maker.type not in ("const", QUANT_OP):
            continue  # over activations; a weight hidden behind another op shows in the counts below
        seen[op.type] += 1
        if config.weights == "int4":
            if maker.type != QUANT_OP:
                raise CoreMLPackageError(f"{path}: {_name(op)} reads a float weight in an int4 package")
            data = maker.inputs["data"].arguments[0].value.type.tensorType
            scale = maker.inputs["scale"].arguments[0].value.type.tensorType
            kind, cols = _dtype_name(data.dataType), data.dimensions[-1].constant.size
            blocks = scale.dimensions[-1].constant.size
            if kind != "INT4" or blocks * config.block_size != cols:
                raise CoreMLPackageError(
                    f"{path}: {_name(op)} reads {kind} weights in blocks of {cols // max(blocks, 1)}; "
                    f"expected INT4 in blocks of {config.block_size}"
                )
            quantized.add(maker.outputs[0].name)
        else:
            want = "FLOAT16" if config.weights == "float16" else "FLOAT32"
            kind = maker.type  # a QUANT_OP in a float package
            if kind == "const":
                kind = _dtype_name(maker.outputs[0].type.tensorType.dataType)
            if kind != want:
                raise CoreMLPackageError(f"{path}: {_name(op)} reads {kind} weights; expected {want}")
    projections = 7 * cfg.n_layers + 1  # q, k, v, o, gate, up, down per layer, and the head
    if (seen["linear"], seen["gather"]) != (projections, 1):
        raise CoreMLPackageError(
            f"{path}: {seen['linear']} linears and {seen['gather']} gathers read weights; "
            f"expected {projections} and 1 (the embedding)"
        )
    return len(quantized)


def _dtype_name(code: int) -> str:
    from coremltools.proto import MIL_pb2

    return MIL_pb2.DataType.Name(code)


def _name(op: Any) -> str:
    attr = op.attributes.get("name")
    return f"{op.type} {attr.immediateValue.tensor.strings.values[0]!r}" if attr is not None else op.type


# ---- prediction (macOS only)


def predict_parity(
    path: Path,
    lm: Any,
    ids: list[int] | Tensor,
    decode_steps: int = 4,
    compute_units: ComputeUnits = "cpu_only",
) -> dict[str, Any]:
    """Prefill ids[:-decode_steps] and decode the rest one token at a time through the package's own
    state, against the PyTorch decoder doing the same with a float16 cache (the package's cache
    precision). macOS only: Core ML predicts nowhere else."""
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    if not 0 <= decode_steps < ids.numel():
        raise ExportError(f"decode_steps must be in 0..{ids.numel() - 1}, got {decode_steps}")
    ct = _coremltools()
    with _quiet():
        model = ct.models.MLModel(str(path), compute_units=ct.ComputeUnit[compute_units.upper()])
    masks = [_array(path, i, "input") for i in model.get_spec().description.input if i.name == INPUTS[1]]
    if not masks:
        raise CoreMLPackageError(f"{path}: no input {INPUTS[1]!r}")
    mask_dtype = np.float16 if masks[0]["dtype"] == "FLOAT16" else np.float32
    prompt = ids.numel() - decode_steps
    spans = [(0, prompt)] + [(p, p + 1) for p in range(prompt, ids.numel())]
    cache = lm.model.make_cache(max_len=ids.numel(), dtype=torch.float16)
    state = model.make_state()
    got, ref = [], []
    for start, stop in spans:
        feed = {INPUTS[0]: ids[None, start:stop].numpy().astype(np.int32),
                INPUTS[1]: causal_mask(start, stop - start, mask_dtype)}  # fmt: skip
        got.append(np.asarray(model.predict(feed, state=state)[OUTPUT], dtype=np.float32)[0])
        with torch.no_grad():
            ref.append(lm.model(ids[None, start:stop], cache)[0].float().numpy())
    out, want = np.concatenate(got), np.concatenate(ref)  # (S, V)
    diff = np.abs(out - want).max(axis=-1)
    return {
        "prompt_tokens": prompt,
        "decode_steps": decode_steps,
        "compute_units": compute_units,
        "max_abs_logits_diff_prefill": float(diff[:prompt].max()),
        "max_abs_logits_diff_decode": float(diff[prompt:].max()) if decode_steps else 0.0,
        "greedy_agreement": float((out.argmax(-1) == want.argmax(-1)).mean()),
    }
