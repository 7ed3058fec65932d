"""A decoder as one ONNX graph on ONNX Runtime's contrib operators, built directly (no tracing).

Per layer: `SkipSimplifiedLayerNormalization` (residual add + RMSNorm in one op), one projection for
q, k and v together, `GroupQueryAttention` (rotary embedding from cos/sin tables, causal masking,
grouped heads, the KV cache, q/k norm for Qwen3, sliding windows), the output projection, and a
SwiGLU whose gate and up projections are one matmul. Projections are `MatMul` over float weights or
`MatMulNBits` over 4/8-bit block-quantized ones (omni_kernels.quant's layout).

Inputs: `input_ids` (batch, sequence) int64; `attention_mask` (batch, total_sequence) int64, ones
for every cached and new token; `logits_to_keep` int64 scalar (0: logits for every position, k:
the last k); `past_key_values.{i}.key|value` (batch, kv_heads, past_sequence, head_dim). Outputs:
`logits` (batch, kept positions, vocab) float32, `hidden_states` (batch, kept positions, dim), the
final-normed states the head reads (what Medusa-style draft heads take), and `present.{i}.key|value`. When a runtime binds
a past buffer of max_sequence positions to its present output as well, GroupQueryAttention writes
the new entries in place: decode copies nothing (omni_runtime does this). Latent attention (MLA),
MoE layers and the `media_embeds` input (GraphOptions.media_placeholders) are built in onnx_sparse.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx
from onnx import TensorProto

from omni_export.errors import UnsupportedExportError
from omni_export.graph import MS, Graph
from omni_export.onnx_sparse import SparseLayers
from omni_export.weights import Weight, concat_rows
from omni_model.config import ModelConfig

WeightFormat = Literal["float32", "float16", "int8", "int4"]
KVFormat = Literal["float32", "int8"]
KV_SCHEME_INT8 = "per token and kv head: uint8 codes, float16 scale and offset (omni_kv int8)"
INT64_MAX = 2**63 - 1


@dataclass(frozen=True)
class GraphOptions:
    weights: WeightFormat = "float32"
    accuracy_level: int = 4  # MatMulNBits: 0 default, 1 fp32, 2 fp16, 3 bf16, 4 int8 compute
    max_seq_len: int = 2048  # rows of the rotary tables: the longest sequence the graph serves
    kv: KVFormat = "float32"  # the cache's format at the graph's inputs and outputs
    # Token ids whose embeddings come from a `media_embeds` input (B, T, D) instead of the table:
    # the placeholders omni_model.multimodal.splice fills with encoder features. () = no such input.
    media_placeholders: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        ph = self.media_placeholders
        if not isinstance(ph, tuple) or any(
            isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in ph
        ):
            raise UnsupportedExportError(
                f"media_placeholders must be a tuple of token ids (non-negative integers), got {ph!r}"
            )
        if self.kv not in ("float32", "int8"):
            raise UnsupportedExportError(f"the KV cache format must be float32 or int8, got {self.kv!r}")
        if self.weights not in ("float32", "float16", "int8", "int4"):
            raise UnsupportedExportError(
                f"weights must be float32, float16, int8 or int4, got {self.weights!r}"
            )
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise UnsupportedExportError(f"accuracy_level must be 0..4, got {self.accuracy_level!r}")
        if self.max_seq_len < 1:
            raise UnsupportedExportError(f"max_seq_len must be positive, got {self.max_seq_len}")


def check_supported(cfg: ModelConfig, opts: GraphOptions | None = None) -> None:
    """Raise UnsupportedExportError naming what this exporter cannot express yet."""
    if (
        opts is not None
        and opts.kv == "int8"
        and any(cfg.window_of(i) is not None for i in range(cfg.n_layers))
    ):
        raise UnsupportedExportError("an int8 KV cache is not supported with sliding-window attention yet")
    if opts is not None and opts.kv == "int8" and cfg.mla is not None:
        raise UnsupportedExportError("an int8 KV cache is not supported with latent attention (MLA) yet")
    if opts is not None and any(t >= cfg.vocab_size for t in opts.media_placeholders):
        raise UnsupportedExportError(
            f"media_placeholders {sorted(opts.media_placeholders)} reach past the vocabulary "
            f"(0..{cfg.vocab_size - 1})"
        )
    if cfg.rope.type == "dynamic":
        raise UnsupportedExportError(
            "rope type 'dynamic' is not supported by the ONNX export (its frequencies depend on the length)"
        )


def rope_tables(cfg: ModelConfig, n: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin (n, rotary_dim/2) for positions 0..n-1, with the scaling variant's attention factor."""
    from omni_model.rope import inv_frequencies

    inv, scale = inv_frequencies(cfg.rope, cfg.rope_dim, None, cfg.max_seq_len)
    freqs = np.outer(np.arange(n, dtype=np.float64), inv.double().numpy())
    return (np.cos(freqs) * scale).astype(np.float32), (np.sin(freqs) * scale).astype(np.float32)


class _Builder(SparseLayers):
    def __init__(self, cfg: ModelConfig, weights: Mapping[str, Weight], opts: GraphOptions) -> None:
        self.cfg, self.w, self.opts = cfg, weights, opts
        self.g = Graph("omnicoder_decoder")

    def float_const(self, name: str, array: np.ndarray) -> str:
        if self.opts.weights == "float16":
            return self.g.op("Cast", [self.g.const(name, array.astype(np.float16))], to=TensorProto.FLOAT)
        return self.g.const(name, array.astype(np.float32))

    def linear(
        self, x: str, w: Weight, name: str, bias: np.ndarray | None = None, out: str | None = None
    ) -> str:
        """x @ w.T (+ bias) through MatMul (float weights) or MatMulNBits (packed); `out` names the result."""
        g = self.g
        outs = [out] if out else 1
        if isinstance(w, np.ndarray):
            wt = self.float_const(name + ".weight_t", np.ascontiguousarray(w.T))
            if bias is None:
                return g.op("MatMul", [x, wt], name=name, outputs=outs)  # type: ignore[return-value]
            y = g.op("MatMul", [x, wt], name=name)
            return g.op("Add", [y, g.const(name + ".bias", bias.astype(np.float32))], outputs=outs)  # type: ignore[return-value]
        p = w.packed
        zp = "" if p.zero_points is None else g.const(name + ".zero_points", p.zero_points)
        b = "" if bias is None or w.mins is not None else g.const(name + ".bias", bias.astype(np.float32))
        y = g.op(
            "MatMulNBits", [x, g.const(name + ".qweight", p.packed), g.const(name + ".scales", p.scales), zp, "", b],
            domain=MS, name=name, outputs=outs if w.mins is None else 1, **p.attributes,
            accuracy_level=self.opts.accuracy_level,
        )  # fmt: skip
        if w.mins is None:
            return y  # type: ignore[return-value]
        # GGUF Q4_1: each block's minimum m adds sum(x over the block) * m to every output.
        sums = g.op("ReduceSum", [g.op("Reshape", [x, g.const("blocks", np.array([0, 0, -1, p.block_size], np.int64))]),
                                  g.const("axis_last", np.array([-1], np.int64))], keepdims=0)  # fmt: skip
        y = g.op(
            "Add",
            [y, g.op("MatMul", [sums, g.const(name + ".block_mins_t", np.ascontiguousarray(w.mins.T))])],
        )
        if bias is not None:
            y = g.op("Add", [y, g.const(name + ".bias", bias.astype(np.float32))])
        return g.op("Identity", [y], outputs=outs)  # type: ignore[return-value]

    def fused_linear(self, x: str, ws: list[Weight], name: str, bias: np.ndarray | None = None) -> str:
        """x through several projections at once: one matmul when their formats fuse, else one each
        and a Concat (a file may store q, k and v in different types)."""
        try:
            return self.linear(x, concat_rows(ws), name, bias)
        except UnsupportedExportError:
            outs, start = [], 0
            for i, w in enumerate(ws):
                n = w.shape[0] if isinstance(w, np.ndarray) else w.packed.N
                outs.append(
                    self.linear(x, w, f"{name}.{i}", None if bias is None else bias[start : start + n])
                )
                start += n
            return self.g.op("Concat", outs, axis=-1)

    def vector(self, name: str) -> str:
        return self.g.const(name, np.asarray(self.w[name], dtype=np.float32))

    def build(self) -> onnx.ModelProto:
        cfg, g = self.cfg, self.g
        hkv, dh = cfg.n_kv_heads, cfg.head_size
        ids = g.input("input_ids", TensorProto.INT64, ["batch", "sequence"])
        mask = g.input("attention_mask", TensorProto.INT64, ["batch", "total_sequence"])
        keep = g.input("logits_to_keep", TensorProto.INT64, [])
        g.output("logits", TensorProto.FLOAT, ["batch", "kept_sequence", cfg.vocab_size])
        past: list = []
        for i in range(cfg.n_layers):
            if cfg.mla is not None:
                past.append(self.latent_past(i))
                continue
            if self.opts.kv == "int8":
                past.append(self.int8_past(i))
                continue
            shape = ["batch", hkv, "past_sequence", dh]
            past.append((g.input(f"past_key_values.{i}.key", TensorProto.FLOAT, shape),
                         g.input(f"past_key_values.{i}.value", TensorProto.FLOAT, shape)))  # fmt: skip
        plain = self.opts.kv == "int8" or cfg.mla is not None  # attention from plain operators
        seqlens_k = total = ""
        if not plain:
            # GroupQueryAttention's view of the lengths: index of each row's last token, and the total.
            lens = g.op("ReduceSum", [mask, g.const("axis1", np.array([1], np.int64))], keepdims=0)
            seqlens_k = g.op(
                "Cast", [g.op("Sub", [lens, g.const("one", np.array(1, np.int64))])], to=TensorProto.INT32
            )
            total = g.op("Cast", [g.op("Gather", [g.op("Shape", [mask]), g.const("idx1", np.array(1, np.int64))])],
                         to=TensorProto.INT32)  # fmt: skip
        cos, sin = rope_tables(cfg, self.opts.max_seq_len)
        cos_name, sin_name = g.const("rope.cos", cos), g.const("rope.sin", sin)
        if plain:
            self.lengths(ids, mask)

        x = self.embed(ids)  # (B, S, D) residual stream
        if self.opts.media_placeholders:
            x = self.splice_media(ids, x, self.opts.media_placeholders)
        h = g.op("SimplifiedLayerNormalization", [x, self.vector("layers.0.input_layernorm.weight")],
                 axis=-1, epsilon=cfg.norm_eps)  # fmt: skip
        for i in range(cfg.n_layers):
            p = f"layers.{i}."
            if cfg.mla is not None:
                attn = self.attention_latent(i, h, past[i], cos_name, sin_name)
            elif self.opts.kv == "int8":
                attn = self.attention_int8(i, h, past[i], cos_name, sin_name)
            else:
                attn = self.attention(i, h, past[i], seqlens_k, total, cos_name, sin_name)
            h, x = self.skip_norm(attn, x, p + "post_attention_layernorm.weight")
            mlp = self.moe(p, h) if cfg.is_moe_layer(i) else self.mlp(p + "mlp.", h)
            nxt = f"layers.{i + 1}.input_layernorm.weight" if i + 1 < cfg.n_layers else "norm.weight"
            h, x = self.skip_norm(mlp, x, nxt)
        starts = g.op("Neg", [g.op("Reshape", [keep, g.const("shape1", np.array([1], np.int64))])])
        h = g.op(
            "Slice",
            [h, starts, g.const("int64_max", np.array([INT64_MAX], np.int64)), g.const("axes1", np.array([1], np.int64))],
            outputs=["hidden_states"],
        )  # fmt: skip
        g.output("hidden_states", TensorProto.FLOAT, ["batch", "kept_sequence", cfg.dim])
        head = (
            self.w.get("lm_head.weight", self.w["embed_tokens.weight"])
            if cfg.tie_embeddings
            else self.w["lm_head.weight"]
        )
        self.linear(h, head, "lm_head", out="logits")
        return g.model()

    def embed(self, ids: str) -> str:
        g, table = self.g, self.w["embed_tokens.weight"]
        if isinstance(table, np.ndarray):
            return g.op("Gather", [self.float_const("embed_tokens.weight", table), ids])
        p = table.packed
        if (
            table.mins is not None
            or p.bits != 8
            or (p.zero_points is not None and p.zero_points.dtype != np.uint8)
        ):
            raise UnsupportedExportError("the quantized embedding must be 8-bit with integer zero points")
        zp = [] if p.zero_points is None else [g.const("embed.zero_points", p.zero_points[..., None])]
        # Blocks (N, k_blocks, block): the same bytes a tied head's MatMulNBits reads.
        rows = g.op(
            "GatherBlockQuantized", [g.const("lm_head.qweight", p.packed), ids, g.const("embed.scales", p.scales[..., None]), *zp],
            domain=MS, gather_axis=0, quantize_axis=2, block_size=p.block_size, bits=8,
        )  # fmt: skip
        x = g.op("Reshape", [rows, g.const("flatten_blocks", np.array([0, 0, -1], np.int64))])
        if p.K % p.block_size:
            x = g.op("Slice", [x, g.const("zero1", np.array([0], np.int64)), g.const("dim1", np.array([p.K], np.int64)),
                               g.const("axis_last", np.array([-1], np.int64))])  # fmt: skip
        return x

    def skip_norm(self, y: str, residual: str, gain: str) -> tuple[str, str]:
        """(RMSNorm(residual + y) * gain, residual + y)."""
        out = self.g.op(
            "SkipSimplifiedLayerNormalization", [y, residual, self.vector(gain)], domain=MS, outputs=4,
            epsilon=self.cfg.norm_eps,
        )  # fmt: skip
        return out[0], out[3]

    def attention(
        self, i: int, h: str, past: tuple[str, str], seqlens_k: str, total: str, cos: str, sin: str
    ) -> str:
        cfg, g, w = self.cfg, self.g, self.w
        p = f"layers.{i}.self_attn."
        bias = None
        if cfg.qkv_bias:
            bias = np.concatenate([np.asarray(w[p + n + "_proj.bias"]) for n in "qkv"])
        qkv = self.fused_linear(h, [w[p + n + "_proj.weight"] for n in "qkv"], p + "qkv_proj", bias)
        q_k_v = [qkv, "", ""]  # packed: GroupQueryAttention splits q, k and v itself
        if cfg.qk_norm:  # Qwen3: RMSNorm over each head of q and k before the rotation
            dh = cfg.head_size
            sizes = g.const(
                "qkv_sizes", np.array([cfg.n_heads * dh, cfg.n_kv_heads * dh, cfg.n_kv_heads * dh], np.int64)
            )
            q, k, v = g.op("Split", [qkv, sizes], outputs=3, axis=-1)
            q_k_v = [self.head_norm(q, p + "q_norm.weight"), self.head_norm(k, p + "k_norm.weight"), v]
        window = cfg.window_of(i)
        out = g.op(
            "GroupQueryAttention",
            [*q_k_v, past[0], past[1], seqlens_k, total, cos, sin],
            outputs=[g.unique(f"{p}attn"), f"present.{i}.key", f"present.{i}.value"], domain=MS, name=p + "gqa",
            num_heads=cfg.n_heads, kv_num_heads=cfg.n_kv_heads, do_rotary=1, rotary_interleaved=0,
            scale=cfg.softmax_scale, local_window_size=-1 if window is None else window,
        )  # fmt: skip
        shape = ["batch", cfg.n_kv_heads, "total_sequence", cfg.head_size]
        g.output(f"present.{i}.key", TensorProto.FLOAT, shape)
        g.output(f"present.{i}.value", TensorProto.FLOAT, shape)
        return self.linear(out[0], w[p + "o_proj.weight"], p + "o_proj")

    # ---- int8 KV cache: attention built from plain operators around the quantized cache

    def c(self, name: str, value, dtype=np.int64) -> str:
        """A small constant, one initializer per name."""
        cache = self.__dict__.setdefault("_consts", {})
        if name not in cache:
            cache[name] = self.g.const(name, np.array(value, dtype))
        return cache[name]

    def int8_past(self, i: int) -> dict[str, str]:
        """Inputs of layer i's cache: codes (batch, kv_heads, capacity, head_dim) uint8 and per-token
        scale and offset (batch, kv_heads, capacity, 1) float16. Only the first past_sequence positions
        (total_sequence - sequence, from the input shapes) are read, so a runtime can bind buffers of
        its whole capacity. Outputs: the new tokens' codes, scales and offsets, for the runtime to append."""
        g, hkv, dh = self.g, self.cfg.n_kv_heads, self.cfg.head_size
        names = {}
        for kv in ("key", "value"):
            base = f"past_key_values.{i}.{kv}"
            names[kv] = g.input(base, TensorProto.UINT8, ["batch", hkv, "capacity", dh])
            for part in ("scale", "offset"):
                names[f"{kv}_{part}"] = g.input(
                    f"{base}_{part}", TensorProto.FLOAT16, ["batch", hkv, "capacity", 1]
                )
            g.output(f"present.{i}.{kv}", TensorProto.UINT8, ["batch", hkv, "sequence", dh])
            for part in ("scale", "offset"):
                g.output(f"present.{i}.{kv}_{part}", TensorProto.FLOAT16, ["batch", hkv, "sequence", 1])
        return names

    def lengths(self, ids: str, mask: str) -> None:
        """Past length P, positions P.. of the new tokens (batch, T) and the causal mask (T, P + T).
        (Initializers made from numpy scalars come out 1-D here, hence the Squeezes for Range.)"""
        g = self.g
        t = g.op("Gather", [g.op("Shape", [ids]), self.c("idx1", [1])])  # (1,)
        total = g.op("Gather", [g.op("Shape", [mask]), self.c("idx1", [1])])
        self.past_len_1d = g.op("Sub", [total, t])
        start, stop, step = (g.op("Squeeze", [x]) for x in (self.past_len_1d, total, self.c("one", [1])))
        pos = g.op("Range", [start, stop, step])  # (T,)
        self.positions = g.op(
            "Expand", [g.op("Unsqueeze", [pos, self.c("axes0", [0])]), g.op("Shape", [ids])]
        )
        keys = g.op("Range", [g.op("Squeeze", [self.c("zero1", [0])]), stop, step])  # (S,)
        allowed = g.op("LessOrEqual", [g.op("Unsqueeze", [keys, self.c("axes0", [0])]),
                                       g.op("Unsqueeze", [pos, self.c("axes1", [1])])])  # fmt: skip
        self.mask_bias = g.op(
            "Where", [allowed, self.c("f0", 0.0, np.float32), self.c("ninf", -np.inf, np.float32)]
        )

    def rotate(self, x: str, n_heads: int, cos: str, sin: str) -> str:
        return self.g.op("RotaryEmbedding", [x, self.positions, cos, sin], domain=MS, interleaved=0,
                         num_heads=n_heads)  # fmt: skip

    def heads(self, x: str, n: int) -> str:
        """(B, T, n * Dh) -> (B, n, T, Dh)."""
        g = self.g
        x = g.op("Reshape", [x, self.c(f"heads{n}", [0, 0, n, self.cfg.head_size])])
        return g.op("Transpose", [x], perm=[0, 2, 1, 3])

    def quantize_int8(self, x: str, out: str, channel_scale: str | None = None) -> str:
        """Code x (B, Hkv, T, Dh) per token as omni_kv's int8 cache does (divided by `channel_scale`
        first when given); write the codes, scales and offsets to the outputs `out`, `out`_scale,
        `out`_offset; return the decoded x."""
        g = self.g
        if channel_scale is not None:
            x = g.op("Div", [x, channel_scale])
        lo = g.op("ReduceMin", [x, self.c("axis_last", [-1])], keepdims=1)
        hi = g.op("ReduceMax", [x, self.c("axis_last", [-1])], keepdims=1)
        step = g.op("Max", [g.op("Div", [g.op("Sub", [hi, lo]), self.c("f255", 255.0, np.float32)]),
                            self.c("f1e-8", 1e-8, np.float32)])  # fmt: skip
        scale16 = g.op("Cast", [step], to=TensorProto.FLOAT16, outputs=[out + "_scale"])
        offset16 = g.op("Cast", [lo], to=TensorProto.FLOAT16, outputs=[out + "_offset"])
        scale = g.op("Cast", [scale16], to=TensorProto.FLOAT)
        offset = g.op("Cast", [offset16], to=TensorProto.FLOAT)
        q = g.op("Round", [g.op("Div", [g.op("Sub", [x, offset]), scale])])
        q = g.op("Clip", [q, self.c("f0", 0.0, np.float32), self.c("f255", 255.0, np.float32)])
        codes = g.op("Cast", [q], to=TensorProto.UINT8, outputs=[out])
        y = g.op("Add", [g.op("Mul", [g.op("Cast", [codes], to=TensorProto.FLOAT), scale]), offset])
        return y if channel_scale is None else g.op("Mul", [y, channel_scale])

    def dequantize_past(self, codes: str, scale: str, offset: str, channel_scale: str | None = None) -> str:
        g = self.g
        first = [self.c("zero1", [0]), self.past_len_1d, self.c("axes2", [2])]
        c, s, o = (g.op("Slice", [t, *first]) for t in (codes, scale, offset))
        cast = TensorProto.FLOAT
        y = g.op("Add", [g.op("Mul", [g.op("Cast", [c], to=cast), g.op("Cast", [s], to=cast)]),
                         g.op("Cast", [o], to=cast)])  # fmt: skip
        return y if channel_scale is None else g.op("Mul", [y, channel_scale])

    def attention_int8(self, i: int, h: str, past: dict[str, str], cos: str, sin: str) -> str:
        cfg, g, w = self.cfg, self.g, self.w
        p = f"layers.{i}.self_attn."
        nh, hkv, dh = cfg.n_heads, cfg.n_kv_heads, cfg.head_size
        bias = None
        if cfg.qkv_bias:
            bias = np.concatenate([np.asarray(w[p + n + "_proj.bias"]) for n in "qkv"])
        qkv = self.fused_linear(h, [w[p + n + "_proj.weight"] for n in "qkv"], p + "qkv_proj", bias)
        sizes = self.c("qkv_sizes_int8", [nh * dh, hkv * dh, hkv * dh])
        q, k, v = g.op("Split", [qkv, sizes], outputs=3, axis=-1)
        if cfg.qk_norm:
            q, k = self.head_norm(q, p + "q_norm.weight"), self.head_norm(k, p + "k_norm.weight")
        q, k = self.heads(self.rotate(q, nh, cos, sin), nh), self.heads(self.rotate(k, hkv, cos, sin), hkv)
        v = self.heads(v, hkv)
        keys, values = [], []
        ks = getattr(self, "key_scales", None)
        key_scale = (
            None if ks is None else g.const(f"{p}key_scales", ks[i][None, :, None, :].astype(np.float32))
        )
        for kv, new, acc in (("key", k, keys), ("value", v, values)):
            cs = key_scale if kv == "key" else None
            old = self.dequantize_past(past[kv], past[f"{kv}_scale"], past[f"{kv}_offset"], cs)
            acc.append(g.op("Concat", [old, self.quantize_int8(new, f"present.{i}.{kv}", cs)], axis=2))
        # Grouped heads: the G query heads of a kv head attend together, (B, Hkv, G, T, Dh).
        q5 = g.op("Reshape", [q, self.c("group_q", [0, hkv, nh // hkv, -1, dh])])
        k5 = g.op("Unsqueeze", [keys[0], self.c("axes2", [2])])
        v5 = g.op("Unsqueeze", [values[0], self.c("axes2", [2])])
        scores = g.op("MatMul", [q5, g.op("Transpose", [k5], perm=[0, 1, 2, 4, 3])])  # (B, Hkv, G, T, S)
        scores = g.op("Add", [g.op("Mul", [scores, self.c("softmax_scale", cfg.softmax_scale, np.float32)]),
                              self.mask_bias])  # fmt: skip
        out = g.op("MatMul", [g.op("Softmax", [scores], axis=-1), v5])  # (B, Hkv, G, T, Dh)
        out = g.op(
            "Transpose", [g.op("Reshape", [out, self.c("merge_groups", [0, nh, -1, dh])])], perm=[0, 2, 1, 3]
        )
        out = g.op("Reshape", [out, self.c("merge_heads", [0, 0, -1])])
        return self.linear(out, w[p + "o_proj.weight"], p + "o_proj")

    def head_norm(self, x: str, gain: str) -> str:
        """RMSNorm over each head_dim slice of x (B, S, heads * head_dim)."""
        g, dh = self.g, self.cfg.head_size
        heads = g.op("Reshape", [x, g.const("per_head", np.array([0, 0, -1, dh], np.int64))])
        normed = g.op(
            "SimplifiedLayerNormalization", [heads, self.vector(gain)], axis=-1, epsilon=self.cfg.norm_eps
        )
        return g.op("Reshape", [normed, g.const("merge_heads", np.array([0, 0, -1], np.int64))])

    def mlp(self, prefix: str, h: str) -> str:
        """The SwiGLU whose weights are `prefix`{gate,up,down}_proj.weight."""
        g, w = self.g, self.w
        gate_up = self.fused_linear(
            h, [w[prefix + "gate_proj.weight"], w[prefix + "up_proj.weight"]], prefix + "gate_up_proj"
        )
        gate, up = g.op("Split", [gate_up], outputs=2, axis=-1, num_outputs=2)
        act = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])]), up])
        return self.linear(act, w[prefix + "down_proj.weight"], prefix + "down_proj")


def build_decoder_graph(
    cfg: ModelConfig, weights: Mapping[str, Weight], opts: GraphOptions, key_scales: np.ndarray | None = None
) -> onnx.ModelProto:
    """The decoder `cfg` with `weights` (plain module names -> float arrays or packed weights; an MoE
    layer's experts stacked as the checkpoint has them, or packed in onnx_sparse.wide_experts' layout).
    `key_scales` (n_layers, n_kv_heads, head_dim), int8 KV only: per-channel divisors applied to keys
    before coding and undone after decoding (omni_kv.calibration's `key_scales`)."""
    check_supported(cfg, opts)
    if key_scales is not None:
        want = (cfg.n_layers, cfg.n_kv_heads, cfg.head_size)
        if opts.kv != "int8":
            raise UnsupportedExportError("key scales from a KV calibration apply to an int8 KV cache only")
        if key_scales.shape != want:
            raise UnsupportedExportError(
                f"KV key scales have shape {key_scales.shape}; the model needs {want}"
            )
    b = _Builder(cfg, weights, opts)
    b.key_scales = key_scales
    return b.build()
