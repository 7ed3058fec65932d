"""Latent attention (MLA), mixture-of-experts layers and media embeddings in the ONNX decoder graph.

MLA (DeepSeek-V2/V3, as omni_model.mla computes it) runs in its absorbed form at every length: the
key up-projection of kv_b_proj is folded into the query and the value up-projection into the output,
so attention reads the cached latents directly, all heads sharing them (DeepSeek-V3's `absorb`
inference path). The cache keeps MLA's point: per layer and token, the normed latent (kv_lora_rank
values, `past_key_values.{i}.key`) and the rotated shared key (qk_rope_head_dim, `.value`), nothing
per head. As with the int8 cache, the graph reads the first total_sequence - sequence positions of
capacity-sized past buffers and outputs only the new tokens' entries, which the runtime appends. A
prompt pays for the absorbed form with scores over rank + rope values per head instead of nope + rope.
Positions and the causal mask come from the input shapes (every row of a batch the same length).

MoE layers route exactly as omni_moe.route does (softmax or sigmoid scores, selection bias, groups,
top-k, renormalisation, scaling factor) with plain operators. Float experts then run in ONNX Runtime's
contrib `MoE` (CPU kernel; SwiGLU with interleaved gate/up rows), which computes only the chosen
experts. It applies its own softmax top-k to what it is given, so the graph gives it the log of the
chosen weights (-1e30 elsewhere) and multiplies its renormalised result back by their sum: every
router reaches it unchanged. Quantized experts run densely instead: every expert on every token as
one wide SwiGLU (MatMulNBits) whose hidden units are scaled by the token's gates, zero for experts
not chosen: E/K times the active compute, the known cost of that form for the 4-8 experts targeted.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from omni_export.graph import MS, Graph
from omni_export.weights import QuantLinear, Weight
from omni_kernels.quant import dequantize
from omni_model.config import ModelConfig
from omni_model.mla import LATENT_NORM_EPS

FLOAT = TensorProto.FLOAT


def dense(w: Weight) -> np.ndarray:
    """The float32 matrix a weight stands for (what MatMulNBits multiplies by, minimums included)."""
    if isinstance(w, np.ndarray):
        return w.astype(np.float32, copy=False)
    out = dequantize(w.packed)
    if w.mins is not None:
        out = out + np.repeat(w.mins, w.packed.block_size, axis=1)[:, : w.packed.K]
    return out


def wide_experts(gate_up: np.ndarray, down: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Stacked experts (E, 2I, D) and (E, D, I) as one wide SwiGLU: (2EI, D), every expert's gate
    rows before every expert's up rows, and (D, EI); hidden unit e*I + j is expert e's unit j."""
    e, two_i, d = gate_up.shape
    i = two_i // 2
    w1 = np.concatenate([gate_up[:, :i].reshape(e * i, d), gate_up[:, i:].reshape(e * i, d)])
    return w1, np.ascontiguousarray(down.transpose(1, 0, 2).reshape(d, e * i))  # (D, E, I) -> (D, EI)


class SparseLayers:
    """The MLA, MoE and media parts of omni_export.onnx_decoder's graph builder, mixed into it: they use
    its linear, float_const, vector, c (small constants), rotate and mlp."""

    cfg: ModelConfig
    g: Graph
    w: dict[str, Weight]
    positions: str
    past_len_1d: str
    mask_bias: str

    # ---- latent attention

    def latent_past(self, i: int) -> tuple[str, str]:
        """Layer i's cache inputs (batch, 1, capacity, width): latents and rotated keys; the outputs
        hold the new tokens' (batch, 1, sequence, width)."""
        g, m = self.g, self.cfg.mla
        assert m is not None  # the builder calls this for MLA configs only
        names = []
        for part, width in (("key", m.kv_lora_rank), ("value", m.qk_rope_head_dim)):
            names.append(g.input(f"past_key_values.{i}.{part}", FLOAT, ["batch", 1, "capacity", width]))
            g.output(f"present.{i}.{part}", FLOAT, ["batch", 1, "sequence", width])
        return names[0], names[1]

    def attention_latent(self, i: int, h: str, past: tuple[str, str], cos: str, sin: str) -> str:
        cfg, g, w, m = self.cfg, self.g, self.w, self.cfg.mla
        assert m is not None
        p = f"layers.{i}.self_attn."
        nh, nope, rope, rank = cfg.n_heads, m.qk_nope_head_dim, m.qk_rope_head_dim, m.kv_lora_rank

        def bias(name: str) -> np.ndarray | None:
            return np.asarray(w[p + name + ".bias"]) if cfg.qkv_bias else None

        if m.q_lora_rank is None:
            q = self.linear(h, w[p + "q_proj.weight"], p + "q_proj")
        else:
            q = self.linear(h, w[p + "q_a_proj.weight"], p + "q_a_proj", bias("q_a_proj"))
            q = self.latent_norm(q, p + "q_a_layernorm.weight")
            q = self.linear(q, w[p + "q_b_proj.weight"], p + "q_b_proj")
        q = g.op("Reshape", [q, self.c("mla_q_heads", [0, 0, nh, nope + rope])])  # (B, T, H, nope + rope)
        q_nope, q_rope = g.op("Split", [q, self.c("mla_q_split", [nope, rope])], outputs=2, axis=-1)
        q_rope = self.rotate(g.op("Reshape", [q_rope, self.c("merge_last", [0, 0, -1])]), nh, cos, sin)
        q_rope = g.op("Reshape", [q_rope, self.c("mla_rope_heads", [0, 0, nh, rope])])  # (B, T, H, rope)
        w_uk, w_uv = self.absorbed(p)
        q_latent = g.op("MatMul", [g.op("Transpose", [q_nope], perm=[0, 2, 1, 3]), w_uk])  # (B, H, T, rank)
        q_joint = g.op("Concat", [q_latent, g.op("Transpose", [q_rope], perm=[0, 2, 1, 3])], axis=-1)
        # Query rows head by head: (B, H*T, rank + rope).
        q_joint = g.op("Reshape", [q_joint, self.c("mla_rows", [0, -1, rank + rope])])

        kv = self.linear(
            h, w[p + "kv_a_proj_with_mqa.weight"], p + "kv_a_proj_with_mqa", bias("kv_a_proj_with_mqa")
        )
        latent, k_rope = g.op("Split", [kv, self.c("mla_kv_split", [rank, rope])], outputs=2, axis=-1)
        latent = self.latent_norm(latent, p + "kv_a_layernorm.weight")  # (B, T, rank)
        k_rope = self.rotate(k_rope, 1, cos, sin)  # (B, T, rope): one rotary key for every head
        first = [self.c("zero1", [0]), self.past_len_1d, self.c("axes2", [2])]
        cached = []
        for part, old, new in (("key", past[0], latent), ("value", past[1], k_rope)):
            new = g.op("Unsqueeze", [new, self.c("axes1", [1])], outputs=[f"present.{i}.{part}"])
            cached.append(g.op("Concat", [g.op("Slice", [old, *first]), new], axis=2))  # (B, 1, S, ·)
        all_latent = g.op("Squeeze", [cached[0], self.c("axes1", [1])])  # (B, S, rank)
        joint = g.op("Squeeze", [g.op("Concat", cached, axis=-1), self.c("axes1", [1])])  # (B, S, rank+rope)
        # One product for all heads reads each cached latent once: (B, H*T, rank + rope) x (B, rank + rope, S).
        scores = g.op("MatMul", [q_joint, g.op("Transpose", [joint], perm=[0, 2, 1])])  # (B, H*T, S)
        scores = g.op("Add", [g.op("Mul", [scores, self.c("mla_scale", cfg.softmax_scale, np.float32)]),
                              self.head_rows_mask(nh)])  # fmt: skip
        out = g.op("MatMul", [g.op("Softmax", [scores], axis=-1), all_latent])  # (B, H*T, rank)
        out = g.op("Reshape", [out, self.c("mla_out_heads", [0, nh, -1, rank])])  # (B, H, T, rank)
        out = g.op("Transpose", [g.op("MatMul", [out, w_uv])], perm=[0, 2, 1, 3])  # (B, T, H, v)
        out = g.op("Reshape", [out, self.c("merge_last", [0, 0, -1])])  # (B, T, H*v)
        return self.linear(out, w[p + "o_proj.weight"], p + "o_proj", bias("o_proj"))

    def latent_norm(self, x: str, gain: str) -> str:
        return self.g.op(
            "SimplifiedLayerNormalization", [x, self.vector(gain)], axis=-1, epsilon=LATENT_NORM_EPS
        )

    def absorbed(self, p: str) -> tuple[str, str]:
        """kv_b_proj split per head: W_uk (H, nope, rank), which maps a query into latent space, and
        W_uv^T (H, rank, v), which maps an attended latent to the head's value."""
        m = self.cfg.mla
        assert m is not None
        h, nope = self.cfg.n_heads, m.qk_nope_head_dim
        wkv = dense(self.w[p + "kv_b_proj.weight"]).reshape(h, nope + m.v_head_dim, m.kv_lora_rank)
        return (
            self.float_const(p + "kv_b_proj.w_uk", np.ascontiguousarray(wkv[:, :nope])),
            self.float_const(p + "kv_b_proj.w_uv_t", np.ascontiguousarray(wkv[:, nope:].transpose(0, 2, 1))),
        )

    def head_rows_mask(self, n_heads: int) -> str:
        """The causal mask (T, S) repeated for query rows ordered head by head: (H*T, S)."""
        cache = self.__dict__.setdefault("_head_masks", {})
        if n_heads not in cache:
            cache[n_heads] = self.g.op("Tile", [self.mask_bias, self.c(f"tile_heads{n_heads}", [n_heads, 1])])
        return cache[n_heads]

    # ---- mixture of experts

    def moe(self, p: str, h: str) -> str:
        """Layer `p`'s MoE block on h (B, T, D): routed experts plus shared ones."""
        g, w, m = self.g, self.w, self.cfg.moe
        assert m is not None
        # The router stays float32 in every export: its choices are discrete, as in omni_moe.
        logits = g.op(
            "MatMul",
            [h, g.const(p + "mlp.gate.weight_t", np.ascontiguousarray(dense(w[p + "mlp.gate.weight"]).T))],
        )
        scores = g.op("Softmax" if m.router == "softmax" else "Sigmoid", [logits], axis=-1 if m.router == "softmax" else None)  # fmt: skip
        choice = scores
        if m.score_correction_bias:  # moves the choice, never the weights
            choice = g.op("Add", [choice, self.vector(p + "mlp.gate.e_score_correction_bias")])
        if m.n_group > 1:
            choice = self.group_limit(choice)
        _, idx = g.op("TopK", [choice, self.c(f"top{m.top_k}", [m.top_k])], outputs=2, axis=-1)  # (B, T, K)
        weights = g.op("GatherElements", [scores, idx], axis=-1)  # (B, T, K)
        total = g.op("ReduceSum", [weights, self.c("axis_last", [-1])], keepdims=1)  # (B, T, 1)
        if m.norm_topk_prob:  # DeepSeek-V3's 1e-20, as omni_moe has it
            weights = g.op("Div", [weights, g.op("Add", [total, self.c("f1e-20", 1e-20, np.float32)])])
        if m.routed_scaling_factor != 1.0:
            weights = g.op("Mul", [weights, self.c(p + "routed_scale", m.routed_scaling_factor, np.float32)])
        gates = g.op("ScatterElements", [self.zeros_like(scores), idx, weights], axis=-1)  # (B, T, E)
        gate_up = w[p + "mlp.experts.gate_up_proj"]
        if isinstance(gate_up, QuantLinear):
            y = self.experts_dense(p, h, gates)
        else:
            y = self.experts_sparse(p, h, gates, idx, weights)
        if m.n_shared_experts:
            shared = self.mlp(p + "mlp.shared_experts.", h)
            if m.shared_expert_gate:  # Qwen2-MoE: a sigmoid of a (D -> 1) projection scales the shared output
                wt = np.ascontiguousarray(dense(w[p + "mlp.shared_expert_gate.weight"]).T)
                s = g.op("Sigmoid", [g.op("MatMul", [h, g.const(p + "mlp.shared_expert_gate.weight_t", wt)])])
                shared = g.op("Mul", [s, shared])
            y = g.op("Add", [y, shared])
        return y

    def group_limit(self, choice: str) -> str:
        """omni_moe.group_mask: only the topk_group groups whose two best scores sum highest stay."""
        g, m = self.g, self.cfg.moe
        assert m is not None
        groups = self.c(f"groups{m.n_group}", [0, 0, m.n_group, -1])
        grouped = g.op("Reshape", [choice, groups])  # (B, T, G, E/G)
        best2 = g.op("TopK", [grouped, self.c("top2", [2])], outputs=2, axis=-1)[0]
        group_scores = g.op("ReduceSum", [best2, self.c("axis_last", [-1])], keepdims=0)  # (B, T, G)
        _, keep = g.op(
            "TopK", [group_scores, self.c(f"top{m.topk_group}", [m.topk_group])], outputs=2, axis=-1
        )
        kept = g.op("ScatterElements", [self.zeros_like(group_scores), keep, self.ones_like(keep)], axis=-1)
        kept = g.op("Cast", [g.op("Unsqueeze", [kept, self.c("axis_last", [-1])])], to=TensorProto.BOOL)
        masked = g.op("Where", [kept, grouped, self.c("ninf", -np.inf, np.float32)])
        return g.op("Reshape", [masked, self.c("ungroup", [0, 0, -1])])  # (B, T, E)

    def experts_sparse(self, p: str, h: str, gates: str, idx: str, weights: str) -> str:
        """Float experts in contrib MoE, which runs the K chosen ones per token."""
        g, w, m = self.g, self.w, self.cfg.moe
        assert m is not None
        gate_up = np.asarray(w[p + "mlp.experts.gate_up_proj"], np.float32)  # (E, 2I, D)
        i = gate_up.shape[1] // 2
        fc1 = np.empty_like(gate_up)  # gate and up rows interleaved: the CPU kernel's only layout
        fc1[:, 0::2] = gate_up[:, :i]
        fc1[:, 1::2] = gate_up[:, i:]
        chosen = g.op("Cast", [g.op("ScatterElements", [self.zeros_like(gates), idx, self.ones_like(idx)], axis=-1)],
                      to=TensorProto.BOOL)  # fmt: skip
        # The kernel's softmax over these, renormalised over its top k, gives gate / sum(gates); the
        # 1e-30 floor keeps an underflowed sigmoid weight finite.
        floor = g.op("Max", [gates, self.c("f1e-30", 1e-30, np.float32)])
        logits = g.op("Where", [chosen, g.op("Log", [floor]), self.c("f-1e30", -1e30, np.float32)])
        logits = g.op("Reshape", [logits, self.c(f"rows{m.n_experts}", [-1, m.n_experts])])  # (B*T, E)
        y = g.op(
            "MoE", [h, logits, self.float_const(p + "mlp.experts.fc1", fc1), "",
                    self.float_const(p + "mlp.experts.fc2", np.asarray(w[p + "mlp.experts.down_proj"], np.float32))],
            domain=MS, name=p + "mlp.experts", k=m.top_k, normalize_routing_weights=1, activation_type="swiglu",
            swiglu_fusion=1, activation_alpha=1.0, activation_beta=0.0,
        )  # fmt: skip
        total = g.op("ReduceSum", [weights, self.c("axis_last", [-1])], keepdims=1)  # (B, T, 1)
        return g.op("Mul", [y, total])

    def experts_dense(self, p: str, h: str, gates: str) -> str:
        """Quantized experts as one wide SwiGLU (wide_experts' layout), every expert on every token."""
        g, w, m = self.g, self.w, self.cfg.moe
        assert m is not None
        name = p + "mlp.experts."
        gate_up = self.linear(h, w[name + "gate_up_proj"], name + "gate_up_proj")  # (B, T, 2EI)
        gate, up = g.op("Split", [gate_up], outputs=2, axis=-1, num_outputs=2)
        act = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])]), up])  # (B, T, EI)
        act = g.op("Reshape", [act, self.c(f"experts{m.n_experts}", [0, 0, m.n_experts, -1])])  # (B, T, E, I)
        act = g.op("Mul", [act, g.op("Unsqueeze", [gates, self.c("axis_last", [-1])])])
        act = g.op("Reshape", [act, self.c("merge_last", [0, 0, -1])])  # (B, T, EI)
        return self.linear(act, w[name + "down_proj"], name + "down_proj")

    def zeros_like(self, x: str) -> str:
        return self.g.op(
            "ConstantOfShape", [self.g.op("Shape", [x])], value=helper.make_tensor("v", FLOAT, [1], [0.0])
        )

    def ones_like(self, x: str) -> str:
        return self.g.op(
            "ConstantOfShape", [self.g.op("Shape", [x])], value=helper.make_tensor("v", FLOAT, [1], [1.0])
        )

    # ---- media

    def splice_media(self, ids: str, x: str, placeholders: tuple[int, ...]) -> str:
        """Rows of x (B, T, D) whose id is a placeholder come from the `media_embeds` input instead."""
        g = self.g
        media = g.input("media_embeds", FLOAT, ["batch", "sequence", self.cfg.dim])
        hit = None
        for t in sorted(set(placeholders)):
            eq = g.op("Equal", [ids, g.const(f"placeholder{t}", np.array(t, np.int64))])
            hit = eq if hit is None else g.op("Or", [hit, eq])
        assert hit is not None  # called only with placeholders
        return g.op("Where", [g.op("Unsqueeze", [hit, self.c("axis_last", [-1])]), media, x])
