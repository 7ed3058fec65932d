"""A small cross-modal verifier: scores how well a digit image or a spoken word matches a word.

CLIP-style (Radford et al. 2021): a text tower (an embedding table over word ids), an image tower (a
small CNN on (B, 1, 28, 28) pixels) and an audio tower (a 1-D CNN on the Whisper log-mel features of
`omni_media.speech.digit_features`) each map into one L2-normalised space with a learned logit scale.
All three are trained together with a contrastive loss, so images and speech share the text side.
Generation keeps the best of several candidates by their score (`rerank`). This is the product's own
model, trained apart from the judges in `omni_media.digits` and `omni_media.speech`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from omni_media.checkpoint import read_with_config, save_with_config
from omni_media.digits import as_float_images
from omni_media.errors import MediaError
from omni_media.speech import conv_blocks, digit_features

CHECKPOINT_FORMAT = "omni-media-verifier/1"
IMAGE_SHAPE = (1, 28, 28)
N_MELS = 80  # digit_features: Whisper's 80 mel bands, 100 frames for a 1 s clip

Audio = Tensor | np.ndarray | Sequence[np.ndarray]  # (B, 80, T) features, (B, N) waves, or 1-D clips
WordIds = Tensor | np.ndarray | Sequence[int]


def _positive_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


@dataclass(frozen=True)
class VerifierConfig:
    dim: int = 64  # width of the shared embedding space
    n_words: int = 10  # rows of the text table: word ids 0..n_words-1 ("zero".."nine")
    image_width: int = 16  # channels of the first image conv; the second has twice as many
    audio_width: int = 64  # channels of each of the three audio conv blocks
    temperature: float = 0.07  # CLIP's initial softmax temperature: logit scale 1/0.07 ~ 14
    max_logit_scale: float = 100.0  # CLIP's clamp, so the scale cannot grow without bound

    def __post_init__(self) -> None:
        for name in ("dim", "n_words", "image_width", "audio_width"):
            if not _positive_int(v := getattr(self, name)):
                raise ValueError(f"VerifierConfig.{name} must be a positive integer, got {v!r}")
        t, s = self.temperature, self.max_logit_scale
        if isinstance(t, bool) or not isinstance(t, int | float) or not 0 < t <= 1:
            raise ValueError(f"VerifierConfig.temperature must be in (0, 1], got {t!r}")
        if isinstance(s, bool) or not isinstance(s, int | float) or not 1 / t <= s <= 1e4:
            raise ValueError(f"VerifierConfig.max_logit_scale must be in [1/temperature, 1e4], got {s!r}")

    @classmethod
    def from_json(cls, text: str, origin: str | Path) -> VerifierConfig:
        try:
            return cls(**json.loads(text))
        except (ValueError, TypeError, RecursionError) as e:
            raise MediaError(f"{origin}: bad verifier config: {' '.join(str(e).split())[:200]}") from None


@dataclass(frozen=True)
class VerifierTrainConfig:
    # Both modalities share one schedule of max(image_steps, audio_steps) steps; the rarer one's batches
    # are spread evenly over it, so neither tower falls behind the text table they share.
    image_steps: int = 1200  # ~42 s of one core on MNIST's 60k: 99.1% top-1 on its test set
    audio_steps: int = 600  # ~25 s of one core on digit_split(60, 20): 100% top-1 on 500 unseen-voice clips
    image_batch: int = 128
    audio_batch: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-2

    def __post_init__(self) -> None:
        for name in ("image_steps", "audio_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"VerifierTrainConfig.{name} must be an integer >= 0, got {v!r}")
        if self.image_steps == self.audio_steps == 0:
            raise ValueError("VerifierTrainConfig: image_steps and audio_steps are both 0")
        for name in ("image_batch", "audio_batch"):
            if not _positive_int(v := getattr(self, name)):
                raise ValueError(f"VerifierTrainConfig.{name} must be a positive integer, got {v!r}")
        if isinstance(self.lr, bool) or not isinstance(self.lr, int | float) or not 0 < self.lr < 1:
            raise ValueError(f"VerifierTrainConfig.lr must be in (0, 1), got {self.lr!r}")
        wd = self.weight_decay
        if isinstance(wd, bool) or not isinstance(wd, int | float) or not 0 <= wd < 1:
            raise ValueError(f"VerifierTrainConfig.weight_decay must be in [0, 1), got {wd!r}")


# ---------------------------------------------------------------------------------------------------- model


class ImageTower(nn.Module):
    """(B, 1, 28, 28) in [0, 1] -> (B, dim), unnormalised: two conv+pool stages and two dense layers."""

    def __init__(self, width: int, dim: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(), nn.MaxPool2d(2),
        )  # fmt: skip
        # Flatten, not global pooling: where the strokes are tells a 6 from a 9.
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(2 * width * 7 * 7, 128), nn.ReLU(), nn.Linear(128, dim)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x * 2 - 1))  # centre the pixels


class AudioTower(nn.Module):
    """Log-mel (B, 80, T) -> (B, dim), unnormalised: three conv blocks, then mean and max over time."""

    def __init__(self, width: int, dim: int):
        super().__init__()
        self.body = conv_blocks(width, N_MELS)  # the spoken-digit classifier's blocks, its own weights
        self.head = nn.Linear(2 * width, dim)

    def forward(self, mel: Tensor) -> Tensor:
        h = self.body(mel)  # (B, W, T / 8)
        return self.head(torch.cat([h.mean(-1), h.amax(-1)], dim=-1))


class CrossModalVerifier(nn.Module):
    """Word ids, digit images and spoken words in one cosine space; higher score: a better match."""

    def __init__(self, config: VerifierConfig = VerifierConfig()):
        super().__init__()
        self.config = c = config
        self.text = nn.Embedding(c.n_words, c.dim)  # a table: more words are more rows
        self.image = ImageTower(c.image_width, c.dim)
        self.audio = AudioTower(c.audio_width, c.dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / c.temperature)))  # log, as in CLIP

    def scale(self) -> Tensor:
        return self.logit_scale.clamp(max=math.log(self.config.max_logit_scale)).exp()

    def embed_text(self, word_ids: WordIds, n: int | None = None) -> Tensor:
        """(B,) word ids -> (B, dim) unit vectors; `n`, if given, is the batch size they must match."""
        ids = _word_ids(word_ids, self.config.n_words, n)
        return F.normalize(self.text(ids), dim=-1)

    def embed_images(self, images: Tensor | np.ndarray) -> Tensor:
        """(B, 1, 28, 28) float in [0, 1] (or uint8 (B, 28, 28)) -> (B, dim) unit vectors."""
        return F.normalize(self.image(_images(images)), dim=-1)

    def embed_audio(self, waves_or_features: Audio) -> Tensor:
        """16 kHz clips of one word (a list of 1-D arrays or a (B, N) array), or their (B, 80, T)
        `digit_features` -> (B, dim) unit vectors."""
        return F.normalize(self.audio(audio_features(waves_or_features)), dim=-1)

    @torch.no_grad()
    def image_scores(self, images: Tensor | np.ndarray, word_ids: WordIds) -> Tensor:
        """(B,) cosine of each image with its word, in [-1, 1]."""
        m = self.embed_images(images)
        return (m * self.embed_text(word_ids, len(m))).sum(-1)

    @torch.no_grad()
    def audio_scores(self, waves_or_features: Audio, word_ids: WordIds) -> Tensor:
        """(B,) cosine of each clip with its word, in [-1, 1]."""
        m = self.embed_audio(waves_or_features)
        return (m * self.embed_text(word_ids, len(m))).sum(-1)

    @torch.no_grad()
    def image_logits(self, images: Tensor | np.ndarray) -> Tensor:
        """(B, n_words) scaled cosines of each image with every word; argmax is the word it shows."""
        return self.scale() * self.embed_images(images) @ self._all_words().T

    @torch.no_grad()
    def audio_logits(self, waves_or_features: Audio) -> Tensor:
        """(B, n_words) scaled cosines of each clip with every word; argmax is the word it says."""
        return self.scale() * self.embed_audio(waves_or_features) @ self._all_words().T

    def _all_words(self) -> Tensor:
        return F.normalize(self.text.weight, dim=-1)  # (n_words, dim)


def _word_ids(word_ids: WordIds, n_words: int, n: int | None) -> Tensor:
    ids = word_ids if isinstance(word_ids, Tensor) else torch.as_tensor(np.asarray(word_ids))
    if ids.ndim != 1 or ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise MediaError(f"word ids must be a 1-D integer array, got {ids.dtype} {tuple(ids.shape)}")
    if n is not None and len(ids) != n:
        raise MediaError(f"{len(ids)} word ids for {n} media items")
    if ids.numel() and not (int(ids.min()) >= 0 and int(ids.max()) < n_words):
        raise MediaError(
            f"word ids must be in [0, {n_words}), got values in [{int(ids.min())}, {int(ids.max())}]"
        )
    return ids.long()


def _images(images: Tensor | np.ndarray) -> Tensor:
    x = as_float_images(images)
    if tuple(x.shape[1:]) != IMAGE_SHAPE or len(x) == 0:
        raise MediaError(f"images must be (B, 1, 28, 28) with B >= 1, got {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise MediaError("images contain NaN or infinite pixels")
    return x


def audio_features(waves_or_features: Audio) -> Tensor:
    """(B, 80, T) float32 log-mel: features pass through checked, clips go through `digit_features`."""
    x = waves_or_features
    if isinstance(x, Tensor | np.ndarray) and x.ndim == 3:
        f = torch.as_tensor(x).float()
        if f.shape[1] != N_MELS or f.shape[2] < 8 or len(f) == 0:  # three 2x pools need 8 frames
            raise MediaError(f"audio features must be (B, {N_MELS}, T) with T >= 8, got {tuple(f.shape)}")
        if not torch.isfinite(f).all():
            raise MediaError("audio features contain NaN or infinite values")
        return f
    if isinstance(x, Tensor | np.ndarray):
        if x.ndim != 2:
            raise MediaError(
                f"audio must be (B, N) waves, (B, {N_MELS}, T) features or a list of clips, got {tuple(x.shape)}"
            )
        x = list(x.numpy() if isinstance(x, Tensor) else x)
    if len(x) == 0:
        raise MediaError("no audio clips")
    for i, w in enumerate(x):  # digit_features pads before it checks, so look at each clip first
        w = np.asarray(w)
        if w.ndim != 1 or w.size == 0 or not np.issubdtype(w.dtype, np.number):
            raise MediaError(f"audio clip {i}: expected non-empty 1-D samples, got shape {w.shape} {w.dtype}")
    return digit_features(x)  # MediaError for NaN or infinite samples


def rerank(scores: Tensor, n_candidates: int) -> Tensor:
    """(G,) index of the best-scoring candidate in each group of `scores` laid out (G * n_candidates,)
    as [prompt 0's candidates, prompt 1's candidates, ...]."""
    if not _positive_int(n_candidates):
        raise MediaError(f"rerank: n_candidates must be a positive integer, got {n_candidates!r}")
    if scores.ndim != 1 or len(scores) % n_candidates or len(scores) == 0:
        raise MediaError(f"rerank: need (G * {n_candidates},) scores, got shape {tuple(scores.shape)}")
    return scores.view(-1, n_candidates).argmax(-1)  # (G, n) -> (G,)


# ---------------------------------------------------------------------------------------------------- files


def save_verifier(model: CrossModalVerifier, path: str | Path) -> Path:
    """Weights and config in one .safetensors file, written atomically."""
    return save_with_config(model, model.config, CHECKPOINT_FORMAT, path)


def load_verifier(path: str | Path) -> CrossModalVerifier:
    """A verifier written by `save_verifier`, in eval mode; MediaError naming the file otherwise."""
    path = Path(path)
    meta, state = read_with_config(path)
    if meta.get("format") != CHECKPOINT_FORMAT or "config" not in meta:
        raise MediaError(f"{path}: not a verifier checkpoint (format {meta.get('format')!r})")
    model = CrossModalVerifier(VerifierConfig.from_json(meta["config"], path))
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if got != expected:
        bad = sorted(set(got) ^ set(expected)) or sorted(k for k in got if got[k] != expected[k])
        raise MediaError(f"{path}: tensors do not fit its config, e.g. {bad[0]!r}")
    model.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in state.items()}, strict=True)
    return model.eval()


# ---------------------------------------------------------------------------------------------------- training


def contrastive_loss(media: Tensor, words: Tensor, labels: Tensor, scale: Tensor) -> Tensor:
    """Symmetric InfoNCE between (B, D) unit media embeddings and the (n_words, D) unit word table.

    With only n_words texts a batch repeats them, so CLIP's one-positive-per-row targets would be wrong.
    Media -> text: every word is a class, a plain cross-entropy (each medium has one right word).
    Text -> media: for each word present in the batch, a softmax over the batch's media whose target is
    spread evenly over all media of that word (multi-positive, as in SupCon), not one of them picked.
    """
    logits = scale * media @ words.T  # (B, n_words)
    to_text = F.cross_entropy(logits, labels)
    present = labels.unique()  # (P,)
    positive = (present[:, None] == labels[None, :]).float()  # (P, B)
    target = positive / positive.sum(-1, keepdim=True)
    to_media = -(target * F.log_softmax(logits[:, present].T, dim=-1)).sum(-1).mean()  # over (P, B)
    return (to_text + to_media) / 2


def _shift_images(x: Tensor, g: torch.Generator, max_shift: int = 2) -> Tensor:
    """Each image translated by its own random whole-pixel offset of up to `max_shift`, zero filled."""
    B, _, H, W = x.shape
    padded = F.pad(x, (max_shift,) * 4)  # (B, 1, H + 2s, W + 2s)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, B, 1), generator=g)
    rows, cols = dy + torch.arange(H), dx + torch.arange(W)  # (B, H), (B, W)
    return padded[torch.arange(B)[:, None, None], 0, rows[:, :, None], cols[:, None, :]].unsqueeze(1)


def _augment_mel(mel: Tensor, g: torch.Generator) -> Tensor:
    """Per clip: a time shift (words start at different points), a gain of up to 6 dB either way, and one
    masked band of mels and one of frames (SpecAugment), so no single formant or instant carries it."""
    B, M, T = mel.shape
    shift = torch.randint(-8, 9, (B, 1, 1), generator=g)
    mel = mel.gather(-1, ((torch.arange(T) - shift) % T).expand(B, M, T))  # (B, M, T), rolled per clip
    # Features are (log10 power + 4) / 4, each clip floored against its own peak, so a gain is an offset:
    # 6 dB of amplitude is 0.6 in log10 power, 0.15 in features.
    mel = mel + (torch.rand(B, 1, 1, generator=g) * 2 - 1) * 0.15
    floor = mel.amin(dim=(1, 2), keepdim=True)
    lo_m = torch.randint(0, M - 8, (B, 1, 1), generator=g)
    lo_t = torch.randint(0, max(T - 10, 1), (B, 1, 1), generator=g)
    m, t = torch.arange(M).view(1, M, 1), torch.arange(T).view(1, 1, T)
    mask = ((m >= lo_m) & (m < lo_m + 8)) | ((t >= lo_t) & (t < lo_t + 10))  # (B, M, T)
    return torch.where(mask, floor, mel)


def _labels(labels: WordIds, n: int, n_words: int, what: str) -> Tensor:
    try:
        return _word_ids(labels, n_words, n)
    except MediaError as e:
        raise MediaError(f"{what} labels: {e}") from None


def _every(k: int, n: int) -> Callable[[int], bool]:
    """Whether step s (of n) is one of k steps spread evenly over them."""
    return lambda s: (s + 1) * k // n > s * k // n


def train_verifier(
    images: Tensor | np.ndarray,
    image_labels: WordIds,
    waves: Audio,
    wave_labels: WordIds,
    config: VerifierConfig = VerifierConfig(),
    train: VerifierTrainConfig = VerifierTrainConfig(),
    seed: int = 0,
    on_step: Callable[[int, int, float], None] | None = None,
) -> CrossModalVerifier:
    """Train a verifier on labelled digit images and spoken-word clips (or their features) with AdamW,
    warmup and cosine decay; on_step(step, steps, loss). Deterministic for a seed, and the caller's torch
    random state is left as it was."""
    x = _images(images)
    y = _labels(image_labels, len(x), config.n_words, "image")
    mel = audio_features(waves)
    a = _labels(wave_labels, len(mel), config.n_words, "audio")
    steps = max(train.image_steps, train.audio_steps)
    image_now, audio_now = _every(train.image_steps, steps), _every(train.audio_steps, steps)
    with torch.random.fork_rng(devices=[]):  # seed a private RNG, leave the caller's alone
        torch.manual_seed(seed)
        model = CrossModalVerifier(config)
        decay = [p for n, p in model.named_parameters() if n != "logit_scale"]
        opt = torch.optim.AdamW(
            [{"params": decay}, {"params": [model.logit_scale], "weight_decay": 0.0}],
            lr=train.lr, weight_decay=train.weight_decay,
        )  # fmt: skip
        g = torch.Generator().manual_seed(seed)
        warmup = min(100, steps // 10)
        model.train()
        for step in range(steps):
            t = (step - warmup) / max(steps - warmup, 1)
            lr_scale = (step + 1) / warmup if step < warmup else 0.5 * (1 + math.cos(math.pi * t))
            for group in opt.param_groups:
                group["lr"] = train.lr * lr_scale
            words, scale = model._all_words(), model.scale()
            loss = torch.zeros(())
            if image_now(step):
                idx = torch.randint(len(x), (train.image_batch,), generator=g)
                media = F.normalize(model.image(_shift_images(x[idx], g)), dim=-1)
                loss = loss + contrastive_loss(media, words, y[idx], scale)
            if audio_now(step):
                idx = torch.randint(len(mel), (train.audio_batch,), generator=g)
                media = F.normalize(model.audio(_augment_mel(mel[idx], g)), dim=-1)
                loss = loss + contrastive_loss(media, words, a[idx], scale)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if on_step is not None:
                on_step(step + 1, steps, float(loss.detach()))
        return model.eval()
