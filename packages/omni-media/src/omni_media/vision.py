"""SigLIP and CLIP vision encoders (ViT): one pre-LN transformer, two checkpoint families.

The two differ in a handful of places, all keyed on `VisionConfig.kind`: CLIP prepends a class token,
normalises before the first block (`pre_layrnorm`) and pools that token through `post_layernorm`;
SigLIP has no class token, normalises the whole output and pools with a learned-probe attention head
(MAP). Module attribute names are the checkpoints' own, so loading only strips the `vision_model.` prefix.
Position embeddings can be resized bicubically for other resolutions, as transformers'
`interpolate_pos_encoding=True` does. References: Radford et al. 2021 (CLIP), Zhai et al. 2023 (SigLIP).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from omni_media.checkpoint import config_int, read_folder, take
from omni_media.errors import MediaError

ACTIVATIONS = {
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),  # SigLIP
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),  # CLIP (OpenAI's sigmoid approximation)
    "gelu": F.gelu,  # some CLIP fine-tunes (e.g. LAION)
}

# transformers' defaults for keys a config.json may leave out (SiglipVisionConfig / CLIPVisionConfig).
_HF_DEFAULTS = {
    "siglip": dict(
        image_size=224, patch_size=16, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, use_head=True
    ),
    "clip": dict(image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5, use_head=False),
}
_MODEL_TYPES = {
    "siglip_vision_model": "siglip",
    "clip_vision_model": "clip",
    "siglip": "siglip",
    "clip": "clip",
}


@dataclass(frozen=True)
class VisionConfig:
    kind: Literal["siglip", "clip"]
    image_size: int  # the resolution the position embeddings were trained for
    patch_size: int
    num_channels: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    layer_norm_eps: float
    hidden_act: str
    use_head: bool  # SigLIP's attention-pooling head; always False for CLIP

    def __post_init__(self) -> None:
        if self.kind not in ("siglip", "clip"):
            raise ValueError(f"kind must be 'siglip' or 'clip', got {self.kind!r}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act must be one of {sorted(ACTIVATIONS)}, got {self.hidden_act!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.patch_size > self.image_size:
            raise ValueError(f"patch_size {self.patch_size} is larger than image_size {self.image_size}")
        if self.kind == "clip" and self.use_head:
            raise ValueError("use_head is SigLIP's pooling head; CLIP pools its class token")

    @property
    def grid(self) -> int:
        """Patches per side at `image_size` (a remainder is dropped, as the strided conv does)."""
        return self.image_size // self.patch_size

    @classmethod
    def from_hf(cls, cfg: dict[str, Any], origin: Path | str) -> VisionConfig:
        """From a transformers config.json: Siglip/CLIP vision configs, or full Siglip/CLIP models."""
        model_type = cfg.get("model_type")
        kind = _MODEL_TYPES.get(model_type) if isinstance(model_type, str) else None
        if kind is None:
            raise MediaError(
                f"{origin}: model_type must be one of {sorted(_MODEL_TYPES)}, got {model_type!r}"
            )
        if model_type in ("siglip", "clip"):  # a two-tower model: the vision tower's config is nested
            cfg = cfg.get("vision_config") or {}
            if not isinstance(cfg, dict):
                raise MediaError(f"{origin}: vision_config must be a JSON object")
            origin = f"{origin}: vision_config"
        d = _HF_DEFAULTS[kind]
        act = cfg.get("hidden_act", d["hidden_act"])
        if act not in ACTIVATIONS:
            raise MediaError(f"{origin}: hidden_act must be one of {sorted(ACTIVATIONS)}, got {act!r}")
        eps = cfg.get("layer_norm_eps", d["layer_norm_eps"])
        if isinstance(eps, bool) or not isinstance(eps, int | float) or not 0 < eps < 1:
            raise MediaError(f"{origin}: layer_norm_eps must be a number in (0, 1), got {eps!r}")
        use_head = cfg.get("vision_use_head", d["use_head"]) if kind == "siglip" else False
        if not isinstance(use_head, bool):
            raise MediaError(f"{origin}: vision_use_head must be true or false, got {use_head!r}")
        try:
            return cls(
                kind=kind,
                image_size=config_int(cfg, "image_size", origin, d["image_size"]),
                patch_size=config_int(cfg, "patch_size", origin, d["patch_size"]),
                num_channels=config_int(cfg, "num_channels", origin, 3, hi=64),
                hidden_size=config_int(cfg, "hidden_size", origin, 768),
                num_layers=config_int(cfg, "num_hidden_layers", origin, 12, hi=1024),
                num_heads=config_int(cfg, "num_attention_heads", origin, 12, hi=1024),
                intermediate_size=config_int(cfg, "intermediate_size", origin, 3072),
                layer_norm_eps=float(eps),
                hidden_act=act,
                use_head=use_head,
            )
        except ValueError as e:
            if isinstance(e, MediaError):
                raise
            raise MediaError(f"{origin}: {e}") from None


@dataclass(frozen=True)
class VisionOutput:
    last_hidden_state: Tensor  # (B, T, D); T = patches (+1 class token for CLIP)
    pooled: Tensor | None  # (B, D): CLIP's normed class token, SigLIP's head output, None without a head


class MLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    """Bidirectional multi-head self-attention (no mask: every patch sees every patch)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.n_heads = cfg.num_heads
        d = cfg.hidden_size
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: Tensor) -> Tensor:
        B, T, D = x.shape
        q, k, v = (
            p(x).view(B, T, self.n_heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        y = F.scaled_dot_product_attention(q, k, v)  # (B, H, T, Dh), scale Dh**-0.5
        return self.out_proj(y.transpose(1, 2).reshape(B, T, D))


class Block(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = Attention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class Embeddings(nn.Module):
    """Patches (strided conv) plus learned positions; CLIP's class token takes position 0."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        d, p = cfg.hidden_size, cfg.patch_size
        # CLIP's patch projection has no bias; SigLIP's has one.
        self.patch_embedding = nn.Conv2d(cfg.num_channels, d, p, stride=p, bias=cfg.kind == "siglip")
        self.n_prefix = 1 if cfg.kind == "clip" else 0
        if self.n_prefix:
            self.class_embedding = nn.Parameter(torch.zeros(d))
        self.position_embedding = nn.Embedding(self.n_prefix + cfg.grid**2, d)

    def positions(self, gh: int, gw: int, interpolate: bool) -> Tensor:
        """(1, prefix + gh*gw, D) position embeddings for a gh x gw patch grid."""
        w = self.position_embedding.weight
        g = self.cfg.grid
        if (gh, gw) == (g, g):
            return w[None]
        if not interpolate:
            s = self.cfg.image_size
            raise ValueError(f"image gives a {gh}x{gw} patch grid, the model's is {g}x{g} ({s}x{s} pixels); "
                             "pass interpolate_pos_encoding=True")  # fmt: skip
        prefix, grid = w[: self.n_prefix], w[self.n_prefix :]
        grid = grid.reshape(1, g, g, -1).permute(0, 3, 1, 2)  # (1, D, g, g)
        grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False)
        grid = grid.permute(0, 2, 3, 1).reshape(gh * gw, -1)  # (gh*gw, D), row-major like the patches
        return torch.cat([prefix, grid])[None]

    def forward(self, pixel_values: Tensor, interpolate: bool) -> Tensor:
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # (B, D, gh, gw)
        B, _, gh, gw = x.shape
        x = x.flatten(2).transpose(1, 2)  # (B, gh*gw, D)
        if self.n_prefix:
            x = torch.cat([self.class_embedding.expand(B, 1, -1), x], dim=1)
        return x + self.positions(gh, gw, interpolate)


class PoolAttention(nn.Module):
    """Cross-attention from a probe to the patches, with torch.nn.MultiheadAttention's packed weights."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.n_heads = cfg.num_heads
        d = cfg.hidden_size
        self.in_proj_weight = nn.Parameter(torch.zeros(3 * d, d))  # q, k, v stacked
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * d))
        self.out_proj = nn.Linear(d, d)

    def forward(self, query: Tensor, x: Tensor) -> Tensor:
        (B, Tq, D), T = query.shape, x.shape[1]
        wq, wk, wv = self.in_proj_weight.chunk(3)
        bq, bk, bv = self.in_proj_bias.chunk(3)
        q = F.linear(query, wq, bq).view(B, Tq, self.n_heads, -1).transpose(1, 2)  # (B, H, Tq, Dh)
        k = F.linear(x, wk, bk).view(B, T, self.n_heads, -1).transpose(1, 2)  # (B, H, T, Dh)
        v = F.linear(x, wv, bv).view(B, T, self.n_heads, -1).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, H, Tq, Dh)
        return self.out_proj(y.transpose(1, 2).reshape(B, Tq, D))


class PoolingHead(nn.Module):
    """SigLIP's multihead attention pooling (MAP): one learned query attends over all patches."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.probe = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size))
        self.attention = PoolAttention(cfg)
        self.layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor) -> Tensor:
        h = self.attention(self.probe.expand(x.shape[0], -1, -1), x)  # (B, 1, D)
        h = h + self.mlp(self.layernorm(h))
        return h[:, 0]


class VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = Embeddings(cfg)
        if cfg.kind == "clip":
            self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # sic: CLIP's key
        self.encoder = Encoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        if cfg.use_head:
            self.head = PoolingHead(cfg)

    def forward(self, pixel_values: Tensor, interpolate_pos_encoding: bool = False) -> VisionOutput:
        """(B, C, H, W) normalised pixels -> patch features and a pooled image feature."""
        x = self.embeddings(pixel_values, interpolate_pos_encoding)  # (B, T, D)
        if self.cfg.kind == "clip":
            x = self.encoder(self.pre_layrnorm(x))
            return VisionOutput(last_hidden_state=x, pooled=self.post_layernorm(x[:, 0]))
        x = self.post_layernorm(self.encoder(x))
        return VisionOutput(last_hidden_state=x, pooled=self.head(x) if self.cfg.use_head else None)


def load_vision(folder: str | Path) -> tuple[VisionConfig, VisionEncoder]:
    """A SiglipVisionModel / CLIPVisionModel folder (or a full SiglipModel / CLIPModel), in eval mode."""
    folder = Path(folder)
    cfg, state = read_folder(folder)
    config = VisionConfig.from_hf(cfg, folder / "config.json")
    # Two-tower models and transformers<5 vision models nest the tower under `vision_model.`; the text
    # tower, logit scale/bias and projections outside it are not ours and are skipped.
    prefix = "vision_model." if any(k.startswith("vision_model.") for k in state) else ""
    with torch.device("meta"):
        model = VisionEncoder(config)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    weights = {name: take(state, prefix + name, shape, folder) for name, shape in expected.items()}
    for k in state:
        # Older checkpoints saved the position_ids buffer (an arange); it carries nothing.
        if k.startswith(prefix) and k[len(prefix) :] not in expected and not k.endswith("position_ids"):
            raise MediaError(
                f"{folder}: unexpected tensor {k!r} for a {config.kind} vision encoder with this config"
            )
    model.load_state_dict(weights, strict=True, assign=True)
    return config, model.eval()
