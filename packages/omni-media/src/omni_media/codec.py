"""A small trainable 16 kHz neural audio codec: waveform -> integer tokens -> waveform.

The encoder's first layer is a strided Conv1d whose fixed kernels are a Hann-windowed DFT (an STFT,
hop 160), so every learned layer runs at 100 or 50 frames/s instead of 16 kHz: that is what makes
training on one CPU core in minutes possible. ConvNeXt blocks and a stride-2 conv give 50 frames/s,
quantised by residual FSQ (Mentzer et al. 2023, stacked as in residual VQ, Zeghidour et al. 2021,
"SoundStream"). The decoder mirrors it and predicts a log-magnitude and a phase per STFT bin, turned
into samples by a fixed inverse-DFT ConvTranspose1d with overlap-add (the iSTFT head of Vocos, Siuzdenko
et al. 2023). Training uses multi-resolution STFT and mel losses plus waveform L1; no discriminator.
`encode` and `decode` have no data-dependent Python control flow, so each exports with torch.export.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from omni_media.audio import MelConfig, log_mel_batch, mel_filters
from omni_media.checkpoint import read_with_config, save_with_config
from omni_media.errors import MediaError
from omni_media.quantize import FSQ
from omni_media.speech import (
    ClassifierTrainConfig,
    DigitClassifier,
    accuracy,
    digit_split,
    pad_batch,
    train_spoken_digit_classifier,
)

_FORMAT = "omni-media-audio-codec/1"


@dataclass(frozen=True)
class CodecConfig:
    sample_rate: int = 16000
    hop: int = 160  # STFT hop of the analysis and synthesis layers: 100 frames/s
    n_fft: int = 640  # 4 * hop: Hann windows overlapping by 75% sum to a constant
    downsample: int = 2  # learned stride after the STFT: tokens at 16000 / (160 * 2) = 50 per second
    channels: int = 192
    n_blocks: int = 2  # ConvNeXt blocks at each of the two frame rates, in encoder and decoder alike
    levels: tuple[int, ...] = (8, 5, 5, 5)  # FSQ per stage: 1000 codes, ~10 bits
    n_q: int = 2  # residual stages: 2 tokens per frame, ~1 kbit/s

    def __post_init__(self) -> None:
        for name in ("sample_rate", "hop", "n_fft", "downsample", "channels", "n_blocks", "n_q"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"CodecConfig.{name} must be a positive integer, got {v!r}")
        if self.hop % 2 or self.n_fft % self.hop:
            raise ValueError(
                f"CodecConfig.n_fft ({self.n_fft}) must be a multiple of hop ({self.hop}), and hop even "
                "(frames are centred by padding (n_fft - hop) / 2 on each side)"
            )
        if (
            not isinstance(self.levels, tuple)
            or not self.levels
            or any(isinstance(n, bool) or not isinstance(n, int) or n < 2 for n in self.levels)
        ):
            raise ValueError(f"CodecConfig.levels must be a tuple of integers >= 2, got {self.levels!r}")

    @property
    def stride(self) -> int:
        """Samples per token frame."""
        return self.hop * self.downsample

    @property
    def frame_rate(self) -> float:
        return self.sample_rate / self.stride

    @property
    def vocab_size(self) -> int:
        """Codes per residual stage (every stage has the same levels)."""
        return math.prod(self.levels)

    @property
    def bitrate(self) -> float:
        """Bits per second: n_q tokens of log2(vocab_size) bits at frame_rate."""
        return self.frame_rate * self.n_q * math.log2(self.vocab_size)

    @classmethod
    def from_json(cls, text: str, origin: str | Path) -> CodecConfig:
        try:
            d = json.loads(text)
            d["levels"] = tuple(d["levels"])
            return cls(**d)
        except (ValueError, TypeError, KeyError) as e:
            raise MediaError(f"{origin}: bad codec config: {' '.join(str(e).split())[:200]}") from None


class ConvNeXt(nn.Module):
    """Depthwise conv (k7) -> LayerNorm -> pointwise x3 -> GELU -> pointwise, residual (Liu et al. 2022)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv1d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.pw1 = nn.Linear(dim, 3 * dim)
        self.pw2 = nn.Linear(3 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 0.1))  # small residual branches at first

    def forward(self, x: Tensor) -> Tensor:
        h = self.dwconv(x).transpose(1, 2)  # (B, frames, C)
        h = self.pw2(F.gelu(self.pw1(self.norm(h)))) * self.gamma
        return x + h.transpose(1, 2)


def _dft_basis(n_fft: int) -> tuple[Tensor, Tensor]:
    """(2F, 1, n_fft) analysis kernels (window * [cos; -sin]) and synthesis kernels (inverse real DFT *
    window), F = n_fft/2 + 1 bins; the window-square envelope is divided out after overlap-add."""
    n = torch.arange(n_fft, dtype=torch.float64)
    k = torch.arange(n_fft // 2 + 1, dtype=torch.float64)
    window = torch.hann_window(n_fft, dtype=torch.float64)  # periodic
    angle = 2 * math.pi * k[:, None] * n[None, :] / n_fft  # (F, n_fft)
    analysis = torch.cat([torch.cos(angle), -torch.sin(angle)]) * window
    weight = torch.full((len(k), 1), 2.0, dtype=torch.float64)
    weight[0] = weight[-1] = 1.0  # DC and Nyquist appear once in the full spectrum, the others twice
    synthesis = torch.cat([torch.cos(angle) * weight, -torch.sin(angle) * weight]) * window / n_fft
    return analysis.float().unsqueeze(1), synthesis.float().unsqueeze(1)


class ResidualFSQ(nn.Module):
    """n_q FSQ stages, stage k quantising the residual scaled up by (levels - 1)^k (ResidualFSQ of
    vector-quantize-pytorch): (..., d) -> ((..., d) quantised, (..., n_q) indices)."""

    def __init__(self, levels: tuple[int, ...], n_q: int):
        super().__init__()
        self.stages = nn.ModuleList(FSQ(levels) for _ in range(n_q))
        lv = torch.tensor(levels, dtype=torch.float32)
        self.register_buffer(
            "scales", (lv - 1) ** -torch.arange(n_q, dtype=torch.float32)[:, None], persistent=False
        )
        radix = [math.prod(levels[:i]) for i in range(len(levels))]
        self.register_buffer("_radix", torch.tensor(radix), persistent=False)
        self.register_buffer("_levels", lv.long(), persistent=False)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        out, residual, indices = torch.zeros_like(z), z, []
        for stage, scale in zip(self.stages, self.scales, strict=True):
            q, idx = stage(residual / scale)
            out = out + q * scale
            residual = residual - (q * scale).detach()
            indices.append(idx)
        return out, torch.stack(indices, dim=-1)

    def decode(self, indices: Tensor) -> Tensor:
        """(..., n_q) indices -> (..., d); arithmetic only (no range check), so it exports."""
        digits = (indices.unsqueeze(-1) // self._radix) % self._levels  # (..., n_q, d)
        half = self._levels // 2
        codes = (digits - half).float() / half  # FSQ's grid in [-1, 1]
        return (codes * self.scales).sum(-2)


class AudioCodec(nn.Module):
    """(B, T) 16 kHz waveform <-> (B, n_q, frames) int64 tokens in [0, vocab_size)."""

    def __init__(self, config: CodecConfig = CodecConfig()):
        super().__init__()
        self.config = c = config
        bins, C, d = c.n_fft // 2 + 1, c.channels, len(c.levels)
        analysis, synthesis = _dft_basis(c.n_fft)
        self.register_buffer("analysis", analysis, persistent=False)
        self.register_buffer("synthesis", synthesis, persistent=False)
        self.register_buffer("window_sq", torch.hann_window(c.n_fft).pow(2).view(1, 1, -1), persistent=False)
        self.enc_in = nn.Conv1d(bins, C, 7, padding=3)
        self.enc_fine = nn.Sequential(*(ConvNeXt(C) for _ in range(c.n_blocks)))
        k = 2 * c.downsample - c.downsample % 2  # with this padding, exactly frames / downsample out
        self.enc_down = nn.Conv1d(C, C, k, stride=c.downsample, padding=(k - c.downsample) // 2)
        self.enc_coarse = nn.Sequential(*(ConvNeXt(C) for _ in range(c.n_blocks)))
        self.enc_norm = nn.LayerNorm(C)
        self.enc_out = nn.Linear(C, d)
        self.quantizer = ResidualFSQ(c.levels, c.n_q)
        self.dec_in = nn.Conv1d(d, C, 7, padding=3)
        self.dec_coarse = nn.Sequential(*(ConvNeXt(C) for _ in range(c.n_blocks)))
        self.dec_up = nn.ConvTranspose1d(C, C, k, stride=c.downsample, padding=(k - c.downsample) // 2)
        self.dec_fine = nn.Sequential(*(ConvNeXt(C) for _ in range(c.n_blocks)))
        self.dec_norm = nn.LayerNorm(C)
        self.dec_out = nn.Linear(C, 2 * bins)  # log-magnitude and phase per bin

    @property
    def frame_rate(self) -> float:
        return self.config.frame_rate

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    def _pad(self) -> int:
        return (self.config.n_fft - self.config.hop) // 2  # frames centred on each hop, T/hop of them

    def _latents(self, wave: Tensor) -> Tensor:
        """(B, T) -> (B, frames, d) continuous latents, T padded up to a multiple of the stride."""
        s = self.config.stride
        x = F.pad(wave.unsqueeze(1), (0, (-wave.shape[-1]) % s))  # (B, 1, T')
        spec = F.conv1d(F.pad(x, (self._pad(), self._pad())), self.analysis, stride=self.config.hop)
        re, im = spec.chunk(2, dim=1)  # (B, F, T'/hop) each
        h = self.enc_in(torch.log(torch.sqrt(re**2 + im**2 + 1e-8) + 1e-4))
        h = self.enc_coarse(self.enc_down(self.enc_fine(h))).transpose(1, 2)  # (B, frames, C)
        return self.enc_out(self.enc_norm(h))

    def _synthesise(self, q: Tensor) -> Tensor:
        """(B, frames, d) quantised latents -> (B, frames * stride) samples."""
        h = self.dec_fine(self.dec_up(self.dec_coarse(self.dec_in(q.transpose(1, 2)))))  # (B, C, T'/hop)
        logmag, phase = self.dec_out(self.dec_norm(h.transpose(1, 2))).transpose(1, 2).chunk(2, dim=1)
        mag = torch.exp(logmag.clamp(max=8.0))  # e^8 ~ 3000: above any |STFT| of audio in [-1, 1]
        spec = torch.cat([mag * torch.cos(phase), mag * torch.sin(phase)], dim=1)  # (B, 2F, T'/hop)
        hop, p = self.config.hop, self._pad()
        y = F.conv_transpose1d(spec, self.synthesis, stride=hop)  # (B, 1, T' + n_fft - hop)
        env = F.conv_transpose1d(torch.ones_like(spec[:, :1]), self.window_sq, stride=hop)
        return (y / env.clamp(min=1e-3))[:, 0, p : y.shape[-1] - p]

    def encode(self, wave: Tensor) -> Tensor:
        """(B, T) float -> (B, n_q, ceil(T / stride)) int64 tokens."""
        _, indices = self.quantizer(self._latents(wave))  # (B, frames, n_q)
        return indices.transpose(1, 2)

    def decode(self, tokens: Tensor) -> Tensor:
        """(B, n_q, frames) int64 -> (B, frames * stride) float; tokens are not range-checked (see
        `check_tokens`), since a data-dependent check would not export."""
        return self._synthesise(self.quantizer.decode(tokens.transpose(1, 2)))

    def forward(self, wave: Tensor) -> tuple[Tensor, Tensor]:
        """(B, T) -> ((B, T) reconstruction with straight-through gradients, (B, n_q, frames) tokens)."""
        q, indices = self.quantizer(self._latents(wave))
        return self._synthesise(q)[:, : wave.shape[-1]], indices.transpose(1, 2)

    def check_tokens(self, tokens: Tensor) -> None:
        """MediaError unless tokens are (B, n_q, frames) integers in [0, vocab_size)."""
        c = self.config
        if tokens.ndim != 3 or tokens.shape[1] != c.n_q or tokens.dtype.is_floating_point:
            raise MediaError(
                f"tokens: expected (B, {c.n_q}, frames) integers, got {tuple(tokens.shape)} {tokens.dtype}"
            )
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= c.vocab_size):
            raise MediaError(
                f"tokens: values must be in [0, {c.vocab_size}), got [{int(tokens.min())}, {int(tokens.max())}]"
            )

    def encoder_module(self) -> nn.Module:
        return _Half(self, "encode")

    def decoder_module(self) -> nn.Module:
        return _Half(self, "decode")


class _Half(nn.Module):
    """One direction of a codec as its own module, for torch.export / ONNX."""

    def __init__(self, codec: AudioCodec, method: str):
        super().__init__()
        self.codec, self.method = codec, method

    def forward(self, x: Tensor) -> Tensor:
        return getattr(self.codec, self.method)(x)


# ---------------------------------------------------------------------------------------------------- checkpoint


def save_codec(codec: AudioCodec, path: str | Path) -> Path:
    """One .safetensors file, config JSON in its metadata, written to a temporary name then renamed."""
    return save_with_config(codec, codec.config, _FORMAT, path)


def load_codec(path: str | Path, config: CodecConfig | None = None) -> AudioCodec:
    """A codec saved by `save_codec`, in eval mode; MediaError naming the file for a truncated or foreign
    file, a missing config, or (when `config` is given) a checkpoint of another configuration."""
    path = Path(path)
    meta, state = read_with_config(path)
    if meta.get("format") != _FORMAT or "config" not in meta:
        raise MediaError(f"{path}: no codec config in the metadata (not saved by save_codec)")
    saved = CodecConfig.from_json(meta["config"], path)
    if config is not None and saved != config:
        raise MediaError(f"{path}: a checkpoint for {saved}, not the requested {config}")
    codec = AudioCodec(saved)
    expected = {k: tuple(v.shape) for k, v in codec.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if got != expected:
        bad = sorted(set(got) ^ set(expected)) or sorted(k for k in got if got[k] != expected[k])
        raise MediaError(f"{path}: tensors do not fit its config, e.g. {bad[0]!r}")
    codec.load_state_dict(state, strict=True)
    return codec.eval()


# ---------------------------------------------------------------------------------------------------- training


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000  # ~4-5 min on one free core (0.25-0.3 s a step); 97-99% held-out accuracy after
    batch_size: int = 16
    segment_samples: int = 9600  # 0.6 s: most of a digit word; a multiple of the 320-sample stride
    lr: float = 2e-3
    seed: int = 0
    time_budget_s: float | None = None  # stop early (with the learning rate annealed) when spent

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "segment_samples"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"TrainConfig.{name} must be a positive integer, got {v!r}")
        if not self.lr > 0:
            raise ValueError(f"TrainConfig.lr must be positive, got {self.lr!r}")
        if self.time_budget_s is not None and not self.time_budget_s > 0:
            raise ValueError(
                f"TrainConfig.time_budget_s must be None or positive, got {self.time_budget_s!r}"
            )


_MEL = MelConfig(chunk_seconds=None)  # Whisper's 80 Slaney bands, n_fft 400, hop 160


def codec_loss(x: Tensor, y: Tensor) -> Tensor:
    """Reference x vs reconstruction y (B, T): log-mel L1 (Whisper's bands) + multi-resolution STFT
    (spectral convergence + log-magnitude L1) over 4 window sizes + 0.1 * waveform L1."""
    fb = torch.tensor(mel_filters(_MEL), dtype=torch.float32)  # (F, 80)
    win = torch.hann_window(_MEL.n_fft)
    mx, my = ((torch.stft(s, _MEL.n_fft, _MEL.hop_length, window=win, return_complex=True).abs() ** 2).transpose(1, 2) @ fb
              for s in (x, y))  # fmt: skip
    loss = (torch.log(mx + 1e-5) - torch.log(my + 1e-5)).abs().mean()
    for n_fft in (128, 256, 512, 1024):
        w = torch.hann_window(n_fft)
        sx, sy = (torch.stft(s, n_fft, n_fft // 4, window=w, return_complex=True).abs() for s in (x, y))
        sc = torch.linalg.norm(sx - sy) / torch.linalg.norm(sx).clamp(min=1e-6)
        loss = loss + (sc + (torch.log(sx + 1e-5) - torch.log(sy + 1e-5)).abs().mean()) / 4
    return loss + 0.1 * (x - y).abs().mean()


def _batch(waves: Sequence[np.ndarray], n: int, size: int, rng: np.random.Generator) -> Tensor:
    """(size, n) random windows of random clips; a clip shorter than n sits at a random offset in silence."""
    out = np.zeros((size, n), np.float32)
    for i in range(size):
        w = waves[int(rng.integers(len(waves)))]
        if len(w) >= n:
            s = int(rng.integers(len(w) - n + 1))
            out[i] = w[s : s + n]
        else:
            s = int(rng.integers(n - len(w) + 1))
            out[i, s : s + len(w)] = w
    return torch.from_numpy(out)


def train_codec(waveforms: Sequence[np.ndarray], config: CodecConfig = CodecConfig(),
                train: TrainConfig = TrainConfig(),
                on_progress: Callable[[int, int, float], None] | None = None) -> AudioCodec:  # fmt: skip
    """An AudioCodec trained with AdamW on random windows of 16 kHz clips; on_progress(step, steps, loss).
    The learning rate warms up, then follows a cosine over max(step / steps, elapsed / time_budget_s)."""
    if len(waveforms) == 0:
        raise MediaError("train_codec: no waveforms")
    if train.segment_samples % config.stride:
        raise MediaError(
            f"train_codec: segment_samples {train.segment_samples} is not a multiple of the stride {config.stride}"
        )
    with torch.random.fork_rng(devices=[]):  # a seeded init that leaves the caller's random state alone
        torch.manual_seed(train.seed)
        codec = AudioCodec(config).train()
    rng = np.random.default_rng(train.seed)
    opt = torch.optim.AdamW(codec.parameters(), lr=train.lr, betas=(0.8, 0.99), weight_decay=1e-4)
    start, warmup = time.perf_counter(), max(1, train.steps // 20)
    for step in range(train.steps):
        done = step / train.steps
        if train.time_budget_s is not None:
            done = max(done, (time.perf_counter() - start) / train.time_budget_s)
        if done >= 1.0:
            break
        lr = train.lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * done))
        for group in opt.param_groups:
            group["lr"] = lr
        x = _batch(waveforms, train.segment_samples, train.batch_size, rng)
        y, _ = codec(x)
        loss = codec_loss(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(codec.parameters(), 1.0)
        opt.step()
        if on_progress is not None:
            on_progress(step + 1, train.steps, float(loss.detach()))
    return codec.eval()


# ---------------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def reconstruct(codec: AudioCodec, waves: Sequence[np.ndarray], batch_size: int = 32) -> list[np.ndarray]:
    """Each clip through encode then decode, cut back to its own length."""
    codec.eval()
    out: list[np.ndarray] = []
    for i in range(0, len(waves), batch_size):
        chunk = waves[i : i + batch_size]
        x = torch.from_numpy(pad_batch(chunk, max(len(w) for w in chunk)))
        y = codec.decode(codec.encode(x)).numpy()
        out += [y[j, : len(w)].copy() for j, w in enumerate(chunk)]
    return out


def mel_distance(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> float:
    """Mean L1 between Whisper log-mel features (80 Slaney bands, n_fft 400, hop 160, log10 power floored
    8 decades under each clip's peak, then (x + 4) / 4) of paired clips; x 40 gives decibels."""
    if len(a) != len(b) or len(a) == 0:
        raise MediaError(f"mel_distance: {len(a)} clips against {len(b)}")
    total = 0.0
    for x, y in zip(a, b, strict=True):
        n = min(len(x), len(y))
        fx, fy = log_mel_batch([x[:n], y[:n]], _MEL)
        total += float(np.abs(fx - fy).mean())
    return total / len(a)


def evaluate_codec(codec: AudioCodec, classifier: DigitClassifier, waves: Sequence[np.ndarray],
                   labels: np.ndarray) -> dict[str, float]:  # fmt: skip
    """Mel distance of the reconstructions and the classifier's accuracy on originals and reconstructions."""
    recon = reconstruct(codec, waves)
    mel = mel_distance(waves, recon)
    return {
        "mel_distance": mel,
        "mel_distance_db": 40.0 * mel,
        "accuracy_original": accuracy(classifier, waves, labels),
        "accuracy_reconstructed": accuracy(classifier, recon, labels),
        "tokens_per_second": codec.frame_rate * codec.config.n_q,
        "bitrate_bps": codec.config.bitrate,
        "n_clips": float(len(waves)),
    }


def speech_experiment(seed: int = 0, n_train_per_class: int = 100, n_test_per_class: int = 30,
                      codec_config: CodecConfig = CodecConfig(), train: TrainConfig = TrainConfig(),
                      classifier_train: ClassifierTrainConfig | None = None,
                      on_progress: Callable[[str, int, int, float], None] | None = None
                      ) -> tuple[AudioCodec, DigitClassifier, dict[str, float]]:  # fmt: skip
    """Synthesise train/test digits (test voices held out), train the classifier and the codec on the
    training clips, and evaluate on the test clips; on_progress(stage, step, total, loss)."""
    t0 = time.perf_counter()
    train_set, test_set = digit_split(n_train_per_class, n_test_per_class, seed)
    t1 = time.perf_counter()
    classifier = train_spoken_digit_classifier(
        train_set,
        classifier_train or ClassifierTrainConfig(),
        on_progress and (lambda i, n, loss: on_progress("classifier", i, n, loss)),
    )
    t2 = time.perf_counter()
    codec = train_codec(
        train_set.waves,
        codec_config,
        train,
        on_progress and (lambda i, n, loss: on_progress("codec", i, n, loss)),
    )
    t3 = time.perf_counter()
    figures = evaluate_codec(codec, classifier, test_set.waves, test_set.labels)
    t4 = time.perf_counter()
    return (
        codec,
        classifier,
        {
            **figures,
            "n_train": float(len(train_set)),
            "n_test": float(len(test_set)),
            "n_train_voices": float(len(train_set.voices)),
            "n_test_voices": float(len(test_set.voices)),
            "synthesis_seconds": t1 - t0,
            "classifier_train_seconds": t2 - t1,
            "codec_train_seconds": t3 - t2,
            "eval_seconds": t4 - t3,
            "total_seconds": t4 - t0,
        },
    )
