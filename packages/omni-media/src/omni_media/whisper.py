"""The encoder half of Whisper (Radford et al. 2022, "Robust Speech Recognition via Large-Scale Weak
Supervision"): two convolutions, learned positions and a pre-LN transformer over log-mel features.

Module names equal the checkpoint's, so a Hugging Face Whisper folder loads without a rename table;
the features come from `omni_media.audio.log_mel`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from omni_media.audio import MelConfig
from omni_media.checkpoint import config_int, read_folder, take
from omni_media.errors import MediaError


@dataclass(frozen=True)
class WhisperEncoderConfig:
    """The encoder half of a Hugging Face Whisper config.json."""

    num_mel_bins: int  # 80, or 128 for large-v3
    d_model: int
    encoder_layers: int
    encoder_attention_heads: int
    encoder_ffn_dim: int
    max_source_positions: int  # positions after the stride-2 conv: 1500 covers 3000 frames = 30 s
    activation_function: str = "gelu"

    def __post_init__(self) -> None:
        if self.d_model % self.encoder_attention_heads:
            raise ValueError(
                f"WhisperEncoderConfig.d_model ({self.d_model}) must be a multiple of "
                f"encoder_attention_heads ({self.encoder_attention_heads})"
            )
        if self.activation_function != "gelu":
            raise ValueError(
                f"WhisperEncoderConfig.activation_function must be 'gelu', got {self.activation_function!r}"
            )

    @classmethod
    def from_hf(cls, cfg: dict[str, Any], origin: Path | str = "config.json") -> WhisperEncoderConfig:
        """From a parsed config.json; MediaError naming `origin` and the key for a missing or bad field."""
        if cfg.get("model_type", "whisper") != "whisper":
            raise MediaError(f"{origin}: model_type is {cfg.get('model_type')!r}, not 'whisper'")
        ints = {
            k: config_int(cfg, k, origin, hi=hi)
            for k, hi in (("num_mel_bins", 1024), ("d_model", 16384), ("encoder_layers", 256),
                          ("encoder_attention_heads", 1024), ("encoder_ffn_dim", 65536),
                          ("max_source_positions", 1 << 16))
        }  # fmt: skip
        act = cfg.get("activation_function", "gelu")
        if act != "gelu":
            raise MediaError(f"{origin}: activation_function must be 'gelu', got {act!r}")
        if ints["d_model"] % ints["encoder_attention_heads"]:
            raise MediaError(
                f"{origin}: d_model {ints['d_model']} is not a multiple of encoder_attention_heads"
            )
        return cls(**ints, activation_function=act)

    @property
    def mel(self) -> MelConfig:
        """The front end this encoder was trained on."""
        return MelConfig(n_mels=self.num_mel_bins)


class WhisperAttention(nn.Module):
    """Bidirectional multi-head self-attention; Whisper's k_proj has no bias (it would cancel in softmax)."""

    def __init__(self, config: WhisperEncoderConfig):
        super().__init__()
        d = config.d_model
        self.n_heads = config.encoder_attention_heads
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: Tensor) -> Tensor:
        B, T, D = x.shape
        q, k, v = (
            p(x).view(B, T, self.n_heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        y = F.scaled_dot_product_attention(q, k, v)  # (B, H, T, Dh)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, D))


class WhisperEncoderLayer(nn.Module):
    """Pre-LN block: x + attn(LN(x)), then x + fc2(gelu(fc1(LN(x))))."""

    def __init__(self, config: WhisperEncoderConfig):
        super().__init__()
        self.self_attn_layer_norm = nn.LayerNorm(config.d_model)
        self.self_attn = WhisperAttention(config)
        self.final_layer_norm = nn.LayerNorm(config.d_model)
        self.fc1 = nn.Linear(config.d_model, config.encoder_ffn_dim)
        self.fc2 = nn.Linear(config.encoder_ffn_dim, config.d_model)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x))
        return x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))


class WhisperEncoder(nn.Module):
    """Log-mel (B, n_mels, frames) -> (B, frames/2, d_model): two convolutions, learned positions, layers."""

    def __init__(self, config: WhisperEncoderConfig):
        super().__init__()
        self.config = config
        d = config.d_model
        self.conv1 = nn.Conv1d(config.num_mel_bins, d, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(d, d, kernel_size=3, stride=2, padding=1)  # halves time: 100 -> 50 per second
        self.embed_positions = nn.Embedding(config.max_source_positions, d)
        self.layers = nn.ModuleList(WhisperEncoderLayer(config) for _ in range(config.encoder_layers))
        self.layer_norm = nn.LayerNorm(d)

    def forward(self, input_features: Tensor) -> Tensor:
        """Frames may be fewer than 2 * max_source_positions (the first positions are used); Whisper itself
        was trained on full 30 s windows only, so shorter inputs trade accuracy for speed."""
        c = self.config
        if input_features.ndim != 3 or input_features.shape[1] != c.num_mel_bins:
            raise MediaError(
                f"input_features: expected (B, {c.num_mel_bins}, frames), got {tuple(input_features.shape)}"
            )
        if input_features.shape[2] > 2 * c.max_source_positions:
            raise MediaError(
                f"input_features: {input_features.shape[2]} frames, more than the encoder's "
                f"{2 * c.max_source_positions} (pad or cut the audio to {c.max_source_positions // 50} s)"
            )
        x = F.gelu(self.conv1(input_features))  # (B, D, frames)
        x = F.gelu(self.conv2(x)).transpose(1, 2)  # (B, T, D) with T = ceil(frames / 2)
        x = x + self.embed_positions.weight[: x.shape[1]]
        for layer in self.layers:
            x = layer(x)
        return self.layer_norm(x)


def load_whisper_encoder(folder: str | Path) -> tuple[WhisperEncoderConfig, WhisperEncoder]:
    """The encoder of a WhisperModel or WhisperForConditionalGeneration safetensors folder, in eval mode."""
    folder = Path(folder)
    cfg, state = read_folder(folder)
    config = WhisperEncoderConfig.from_hf(cfg, folder / "config.json")
    prefix = next((p for p in ("model.encoder.", "encoder.") if p + "conv1.weight" in state), None)
    if prefix is None:
        raise MediaError(
            f"{folder}: no Whisper encoder tensors (neither 'model.encoder.' nor 'encoder.' names)"
        )
    with torch.device("meta"):  # shapes only: every weight comes from the checkpoint
        encoder = WhisperEncoder(config)
    expected = {name: tuple(t.shape) for name, t in encoder.state_dict().items()}
    weights = {name: take(state, prefix + name, shape, folder) for name, shape in expected.items()}
    extra = sorted(k for k in state if k.startswith(prefix) and k[len(prefix) :] not in expected)
    if extra:
        raise MediaError(
            f"{folder}: {len(extra)} unexpected encoder tensors, e.g. {extra[0]!r} (more layers than the config?)"
        )
    encoder.load_state_dict(weights, strict=True, assign=True)
    return config, encoder.eval()
