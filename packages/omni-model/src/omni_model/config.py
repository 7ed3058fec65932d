"""Model configuration: architecture only, as frozen dataclasses validated on construction.

One decoder family covers Llama, Mistral, Qwen2, Qwen3, SmolLM, Mixtral, Qwen-MoE and DeepSeek-V3
checkpoints; their differences (qkv bias, q/k norm, sliding windows, RoPE scaling, tied head, MoE
layers, latent attention, MTP modules) are fields here, never branches on a model's name. Export,
quantization and runtime knobs live with the packages that own them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from omni_model.errors import ConfigError
from omni_moe import MoEConfig

RopeType = Literal["default", "linear", "dynamic", "yarn", "llama3"]


def _positive(name: str, value: float | int | None, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if value is None or isinstance(value, bool) or not value > 0:
        raise ConfigError(f"{name} must be positive, got {value!r}")


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding: base frequency and the scaling variant of long-context checkpoints."""

    theta: float = 10000.0
    type: RopeType = "default"
    factor: float = 1.0
    # llama3: the band between low and high frequency wavelengths is interpolated smoothly.
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    # yarn / llama3 / dynamic: the context length the base model was trained at.
    original_max_position: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None  # yarn: cos/sin scale; None derives it from factor
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True

    def __post_init__(self) -> None:
        if self.type not in ("default", "linear", "dynamic", "yarn", "llama3"):
            raise ConfigError(
                f"rope.type must be one of default, linear, dynamic, yarn, llama3; got {self.type!r}"
            )
        _positive("rope.theta", self.theta)
        _positive("rope.factor", self.factor)
        _positive("rope.original_max_position", self.original_max_position, optional=True)
        if self.type in ("yarn", "llama3") and self.original_max_position is None:
            raise ConfigError(f"rope.original_max_position is required for rope.type={self.type!r}")
        if self.type == "llama3" and not self.high_freq_factor > self.low_freq_factor > 0:
            raise ConfigError(
                f"rope.high_freq_factor ({self.high_freq_factor}) must exceed rope.low_freq_factor "
                f"({self.low_freq_factor}) > 0"
            )


@dataclass(frozen=True)
class MLAConfig:
    """Multi-head Latent Attention (DeepSeek-V2/V3): keys and values come from one compressed latent.

    Each head's query and key split into a part without position (`qk_nope_head_dim`) and a rotary
    part (`qk_rope_head_dim`) whose key is shared by all heads (the decoupled RoPE key). A token's
    cache entry is its normalised latent (`kv_lora_rank`) plus that rotary key.
    """

    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    q_lora_rank: int | None = None  # None: a full-rank query projection

    def __post_init__(self) -> None:
        for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"mla.{name} must be a positive integer, got {v!r}")
        q = self.q_lora_rank
        if q is not None and (not isinstance(q, int) or isinstance(q, bool) or q <= 0):
            raise ConfigError(f"mla.q_lora_rank must be a positive integer or None, got {q!r}")
        if self.qk_rope_head_dim % 2:
            raise ConfigError(
                f"mla.qk_rope_head_dim must be even for rotary embeddings, got {self.qk_rope_head_dim}"
            )

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int  # < n_heads: grouped-query attention
    ffn_dim: int
    head_dim: int | None = None  # None: dim // n_heads
    norm_eps: float = 1e-5
    max_seq_len: int = 2048
    rope: RopeConfig = field(default_factory=RopeConfig)
    tie_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2
    qk_norm: bool = False  # Qwen3: RMSNorm over each head's q and k before RoPE
    sliding_window: int | None = None  # Mistral, Qwen2: attend to at most this many past positions
    sliding_layers: tuple[int, ...] | None = None  # layers that use the window; None: all of them
    attention_scale: float | None = None  # None: 1/sqrt(head_dim)
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    moe: MoEConfig | None = None  # None: every layer has a dense SwiGLU of ffn_dim
    mla: MLAConfig | None = None  # None: grouped-query attention; set: latent attention
    mtp_depth: int = 0  # DeepSeek-V3 multi-token prediction modules after the main stack

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        _positive("head_dim", self.head_dim, optional=True)
        _positive("norm_eps", self.norm_eps)
        _positive("sliding_window", self.sliding_window, optional=True)
        _positive("attention_scale", self.attention_scale, optional=True)
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})"
            )
        if self.head_dim is None and self.dim % self.n_heads:
            raise ConfigError(
                f"dim ({self.dim}) must be a multiple of n_heads ({self.n_heads}) when head_dim is unset"
            )
        if self.mla is None and self.head_size % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_size}")
        if self.mla is not None and (self.sliding_window is not None or self.qk_norm):
            raise ConfigError("latent attention (mla) has no sliding window or q/k norm")
        if not isinstance(self.mtp_depth, int) or isinstance(self.mtp_depth, bool) or self.mtp_depth < 0:
            raise ConfigError(f"mtp_depth must be a non-negative integer, got {self.mtp_depth!r}")
        if self.sliding_layers is not None:
            bad = [i for i in self.sliding_layers if not 0 <= i < self.n_layers]
            if bad:
                raise ConfigError(f"sliding_layers holds layer indices outside 0..{self.n_layers - 1}: {bad}")
        for name in ("bos_token_id", "eos_token_id"):
            v = getattr(self, name)
            if v is not None and not 0 <= v < self.vocab_size:
                raise ConfigError(f"{name} ({v}) is outside the vocabulary (0..{self.vocab_size - 1})")

    @property
    def head_size(self) -> int:
        return self.head_dim if self.head_dim is not None else self.dim // self.n_heads

    @property
    def attention(self) -> Literal["gqa", "mla"]:
        return "gqa" if self.mla is None else "mla"

    @property
    def rope_dim(self) -> int:
        """Dimensions each rotary table covers: the head, or MLA's decoupled rotary part."""
        return self.head_size if self.mla is None else self.mla.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        if self.attention_scale is not None:
            return self.attention_scale
        return (self.head_size if self.mla is None else self.mla.qk_head_dim) ** -0.5

    def kv_bytes_per_token(self, bytes_per_value: int = 4) -> int:
        """KV-cache bytes one token adds, over all layers: keys and values, or MLA's latent + rope key."""
        if self.mla is None:
            per_layer = 2 * self.n_kv_heads * self.head_size
        else:
            per_layer = self.mla.kv_lora_rank + self.mla.qk_rope_head_dim
        return self.n_layers * per_layer * bytes_per_value

    def window_of(self, layer: int) -> int | None:
        """The sliding window of one layer, or None for full attention."""
        if self.sliding_window is None:
            return None
        if self.sliding_layers is None or layer in self.sliding_layers:
            return self.sliding_window
        return None

    def n_params(self) -> int:
        """Parameter count (embedding counted once when tied), MTP modules included."""
        d = self.dim
        total = self.vocab_size * d * (1 if self.tie_embeddings else 2) + d
        for i in range(self.n_layers):
            total += self._block_params(self.is_moe_layer(i))
        # An MTP module: two norms, the (2D -> D) projection, a block (MoE when the model has
        # MoE layers) and the norm before the shared head.
        for _ in range(self.mtp_depth):
            total += 3 * d + 2 * d * d + self._block_params(self.moe is not None)
        return total

    def _block_params(self, moe: bool) -> int:
        d = self.dim
        ffn = self._moe_params(d) if moe else 3 * d * self.ffn_dim
        return self._attn_params() + 2 * d + ffn

    def _attn_params(self) -> int:
        d, h = self.dim, self.n_heads
        m = self.mla
        if m is not None:
            q = (
                d * h * m.qk_head_dim
                if m.q_lora_rank is None
                else m.q_lora_rank * (d + 1 + h * m.qk_head_dim)
            )
            kv = d * (m.kv_lora_rank + m.qk_rope_head_dim) + m.kv_lora_rank
            kv += m.kv_lora_rank * h * (m.qk_nope_head_dim + m.v_head_dim)
            bias = (m.q_lora_rank or 0) + m.kv_lora_rank + m.qk_rope_head_dim + d if self.qkv_bias else 0
            return q + kv + h * m.v_head_dim * d + bias
        dh = self.head_size
        attn = d * dh * (h * 2 + self.n_kv_heads * 2)
        if self.qkv_bias:
            attn += dh * (h + 2 * self.n_kv_heads)
        if self.qk_norm:
            attn += 2 * dh
        return attn

    def is_moe_layer(self, layer: int) -> bool:
        return self.moe is not None and self.moe.is_moe_layer(layer)

    def _moe_params(self, d: int) -> int:
        m = self.moe
        assert m is not None  # only called for MoE layers
        shared = 3 * d * m.shared_dim + (d if m.shared_expert_gate else 0) if m.n_shared_experts else 0
        return m.n_experts * (3 * d * m.expert_dim + d) + shared
