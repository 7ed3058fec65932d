"""MoE architecture config, shared by the router, the experts and the decoder that stacks MoE layers.

One frozen dataclass covers Mixtral, Qwen2/3-MoE and DeepSeek-V3: the families differ only in the
router's scoring (softmax or sigmoid), whether the top-k weights are renormalised, group-limited
selection, the score-correction bias, and the shape of the shared experts.
"""

from dataclasses import dataclass
from typing import Literal


class MoEConfigError(ValueError):
    """A MoEConfig field holds a value the layer cannot be built from."""


@dataclass(frozen=True)
class MoEConfig:
    n_experts: int
    top_k: int
    expert_dim: int  # hidden size of one routed expert's SwiGLU
    router: Literal["softmax", "sigmoid"] = "softmax"
    norm_topk_prob: bool = True  # renormalise the K chosen weights to sum to 1
    n_group: int = 1  # DeepSeek-V3 group-limited routing; 1 = off
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    score_correction_bias: bool = False  # DeepSeek-V3 aux-loss-free balancing bias
    sinkhorn_iters: int = 0  # > 0: Sinkhorn-balanced selection in training
    n_shared_experts: int = 0
    shared_expert_dim: int | None = None  # whole shared MLP; None = expert_dim * n_shared
    shared_expert_gate: bool = False  # Qwen2-MoE: sigmoid(Linear(D, 1)) on shared out
    first_k_dense_replace: int = 0  # the first k layers keep a dense MLP
    moe_layer_freq: int = 1  # after those, every n-th layer is MoE
    dense_layers: tuple[int, ...] = ()  # listed layers keep a dense MLP too (Qwen2-MoE's mlp_only_layers)

    def __post_init__(self) -> None:
        for name in ("n_experts", "top_k", "expert_dim", "n_group", "topk_group", "moe_layer_freq"):
            if getattr(self, name) < 1:
                raise MoEConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("n_shared_experts", "first_k_dense_replace", "sinkhorn_iters"):
            if getattr(self, name) < 0:
                raise MoEConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.router not in ("softmax", "sigmoid"):
            raise MoEConfigError(f"router must be 'softmax' or 'sigmoid', got {self.router!r}")
        if self.top_k > self.n_experts:
            raise MoEConfigError(f"top_k ({self.top_k}) must be <= n_experts ({self.n_experts})")
        if self.n_experts % self.n_group:
            raise MoEConfigError(
                f"n_experts ({self.n_experts}) must be divisible by n_group ({self.n_group})"
            )
        if self.topk_group > self.n_group:
            raise MoEConfigError(f"topk_group ({self.topk_group}) must be <= n_group ({self.n_group})")
        per_group = self.n_experts // self.n_group
        # A group is scored by the sum of its two best experts, so it needs at least two.
        if self.n_group > 1 and per_group < 2:
            raise MoEConfigError(f"n_group ({self.n_group}) leaves fewer than 2 experts per group")
        if self.n_group > 1 and self.top_k > self.topk_group * per_group:
            raise MoEConfigError(
                f"top_k ({self.top_k}) exceeds the {self.topk_group * per_group} experts in topk_group groups"
            )
        if self.routed_scaling_factor <= 0:
            raise MoEConfigError(f"routed_scaling_factor must be > 0, got {self.routed_scaling_factor}")
        if self.shared_expert_dim is not None and self.shared_expert_dim < 1:
            raise MoEConfigError(f"shared_expert_dim must be >= 1, got {self.shared_expert_dim}")
        if self.shared_expert_dim is not None and self.n_shared_experts == 0:
            raise MoEConfigError("shared_expert_dim is set but n_shared_experts is 0")
        if any(not isinstance(i, int) or i < 0 for i in self.dense_layers):
            raise MoEConfigError(f"dense_layers must hold layer indices >= 0, got {self.dense_layers!r}")
        if self.shared_expert_gate and self.n_shared_experts == 0:
            raise MoEConfigError("shared_expert_gate needs n_shared_experts >= 1")

    @property
    def shared_dim(self) -> int:
        """Hidden size of the shared MLP (0 when there is none)."""
        if self.n_shared_experts == 0:
            return 0
        return self.shared_expert_dim or self.expert_dim * self.n_shared_experts

    def is_moe_layer(self, i: int) -> bool:
        """Whether decoder layer i is MoE (DeepSeek's rule: past the dense prefix, every freq-th; and
        not one of `dense_layers`)."""
        if i < 0:
            raise MoEConfigError(f"layer index must be >= 0, got {i}")
        return i >= self.first_k_dense_replace and i % self.moe_layer_freq == 0 and i not in self.dense_layers
