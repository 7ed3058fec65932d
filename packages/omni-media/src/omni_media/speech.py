"""Spoken words made in-process with eSpeak NG, a spoken-digit data set, and a digit classifier.

`synthesize` drives libespeak-ng (the formant synthesiser of the eSpeak NG project, shipped with its
data by `espeakng_loader`) through ctypes in synchronous retrieval mode: a callback collects its 16-bit
samples at 22050 Hz, which are resampled to 16 kHz. The library is process-global state, so every call
holds one lock and loads a fresh private copy of it (see `_espeak`). A voice is an accent, optionally
with a timbre variant ("en-us+f3"); `spoken_digits` speaks "zero".."nine" in many of them at random
speeds and pitches, and `digit_split` keeps its test voices (accent and variant both) out of training,
so the classifier below, a small 1-D CNN on Whisper log-mel features, is judged on unseen speakers.
"""

from __future__ import annotations

import _ctypes
import atexit
import contextlib
import ctypes
import functools
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from omni_media.audio import MelConfig, log_mel_batch, resample
from omni_media.errors import MediaError

ESPEAK_RATE = 22050  # what espeak_Initialize reports for the shipped voices; checked at every load
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CLIP_SAMPLES = 16000  # 1 s at 16 kHz: the slowest digit word we speak (120 wpm) is about 0.8 s
ENGLISH_ACCENTS = ("en", "en-us", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-us-nyc", "en-gb-x-gbclan",
                   "en-gb-x-gbcwmd")  # fmt: skip
# English words read with another language's letter-to-sound rules: foreign-accented English.
FOREIGN_ACCENTS = ("de", "fr", "es", "nl", "it")
# Held-out speakers: test accents and variants appear nowhere in training.
TRAIN_VOICES = tuple(
    f"{a}{v}"
    for a in ("en", "en-us", "en-gb-scotland", "en-gb-x-rp", "en-029", "de", "es")
    for v in ("", "+m1", "+m2", "+m3", "+m4", "+f1", "+f2", "+f4")
)
TEST_VOICES = tuple(
    f"{a}{v}" for a in ("en-us-nyc", "en-gb-x-gbclan", "en-gb-x-gbcwmd") for v in ("+m5", "+m6", "+f3", "+f5")
)

# speak_lib.h constants
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_DONT_EXIT = 0x8000  # report errors instead of calling exit()
_POS_CHARACTER, _CHARS_UTF8 = 1, 1
_RATE, _VOLUME, _PITCH, _RANGE, _WORDGAP = 1, 2, 3, 4, 7
_EE_OK = 0
_Callback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


class _Voice(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("languages", ctypes.c_void_p), ("identifier", ctypes.c_char_p),
                ("gender", ctypes.c_ubyte), ("age", ctypes.c_ubyte), ("variant", ctypes.c_ubyte),
                ("xx1", ctypes.c_ubyte), ("score", ctypes.c_int), ("spare", ctypes.c_void_p)]  # fmt: skip


_lock = threading.Lock()
_chunks: list[np.ndarray] = []  # filled by the callback while `_lock` is held


def _collect(wav, n, events) -> int:
    if wav and n > 0:
        _chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
    return 0  # 0: carry on synthesising


_callback = _Callback(_collect)  # module-level: the C side keeps only a raw pointer to it
_unload = getattr(_ctypes, "dlclose", None) or _ctypes.FreeLibrary  # POSIX, else Windows


@functools.cache
def _private_copy() -> tuple[str, Path]:
    """(a private copy of libespeak-ng, the data folder). A copy of our own, so loading and unloading
    it never touches an instance someone else in the process has loaded from the package."""
    import espeakng_loader

    src, data = espeakng_loader.get_library_path(), Path(espeakng_loader.get_data_path())
    folder = tempfile.mkdtemp(prefix="omni-espeak-")
    atexit.register(shutil.rmtree, folder, True)
    try:
        return shutil.copy(src, folder), data
    except OSError as e:
        raise MediaError(f"{src}: cannot copy libespeak-ng: {e}") from None


@contextlib.contextmanager
def _espeak() -> Iterator[tuple[ctypes.CDLL, Path]]:
    """A freshly loaded and initialised library, unloaded afterwards (hold `_lock`). eSpeak keeps
    static state that no call resets (the pitch-flutter index, a roughness cycle counter, the noise
    seed), so a reused instance speaks the same text slightly differently each time; a fresh load
    (~10 ms) makes every call a pure function of its arguments."""
    path, data = _private_copy()
    try:
        lib = ctypes.CDLL(path)
    except OSError as e:
        raise MediaError(f"{path}: cannot load libespeak-ng: {e}") from None
    try:
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
                                     ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]  # fmt: skip
        lib.espeak_ListVoices.argtypes = [ctypes.c_void_p]
        lib.espeak_ListVoices.restype = ctypes.POINTER(ctypes.POINTER(_Voice))
        rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, str(data).encode(), _INITIALIZE_DONT_EXIT)
        if rate != ESPEAK_RATE:
            raise MediaError(f"{data}: espeak_Initialize returned {rate}, expected {ESPEAK_RATE} Hz")
        lib.espeak_SetSynthCallback(_callback)
        try:
            yield lib, data
        finally:
            lib.espeak_Terminate()
    finally:
        _unload(lib._handle)


@functools.cache
def list_voices() -> tuple[str, ...]:
    """Every language/accent the shipped data speaks, lower-case ("en-us", "en-gb-scotland", "de", ...)."""
    names = set()
    with _lock, _espeak() as (lib, _):
        voices = lib.espeak_ListVoices(None)
        i = 0
        while voices[i]:
            # languages: repeated (priority byte, NUL-terminated name), ended by a zero priority byte
            p = voices[i].contents.languages
            while ctypes.c_ubyte.from_address(p).value:
                name = ctypes.string_at(p + 1)
                names.add(name.decode().lower())
                p += len(name) + 2
            i += 1
    return tuple(sorted(names))


@functools.cache
def list_variants() -> tuple[str, ...]:
    """The timbre variants that can follow a '+' in a voice ("m1".."m7", "f1".."f5", "klatt", ...)."""
    _, data = _private_copy()
    return tuple(sorted(p.name for p in (data / "voices" / "!v").iterdir() if p.is_file()))


def _check_int(name: str, v: object, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int | np.integer) or not lo <= v <= hi:
        raise MediaError(f"synthesize: {name} must be an integer in [{lo}, {hi}], got {v!r}")
    return int(v)


def synthesize(text: str, voice: str = "en", speed_wpm: int = 175, pitch: int = 50, pitch_range: int = 50,
               rate: int = 16000) -> np.ndarray:  # fmt: skip
    """`text` spoken by eSpeak NG as float32 mono in [-1, 1) at `rate` Hz; deterministic per arguments."""
    if not isinstance(text, str) or not text.strip():
        raise MediaError(f"synthesize: text must be a non-empty string, got {text!r}")
    speed_wpm = _check_int("speed_wpm", speed_wpm, 80, 450)  # espeak's own limits
    pitch = _check_int("pitch", pitch, 0, 100)
    pitch_range = _check_int("pitch_range", pitch_range, 0, 100)
    rate = _check_int("rate", rate, 1000, 192000)
    accent, _, variant = voice.partition("+") if isinstance(voice, str) else ("", "", "")
    if accent not in list_voices():
        raise MediaError(f"synthesize: unknown voice {voice!r} (list_voices() names the accents)")
    if variant and variant not in list_variants():
        raise MediaError(f"synthesize: unknown variant {variant!r} in voice {voice!r} (see list_variants())")
    with _lock, _espeak() as (lib, _):
        if lib.espeak_SetVoiceByName(voice.encode()) != _EE_OK:
            raise MediaError(f"synthesize: eSpeak NG cannot load voice {voice!r}")
        # Set every parameter on every call: they persist in the library between calls.
        for param, value in ((_RATE, speed_wpm), (_VOLUME, 100), (_PITCH, pitch), (_RANGE, pitch_range),
                             (_WORDGAP, 0)):  # fmt: skip
            lib.espeak_SetParameter(param, value, 0)
        raw = text.encode()
        _chunks.clear()
        err = lib.espeak_Synth(raw, len(raw) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
        pcm = np.concatenate(_chunks) if _chunks else np.zeros(0, np.int16)
        _chunks.clear()
    if err != _EE_OK or pcm.size == 0:
        raise MediaError(f"synthesize: eSpeak NG produced no audio for {text[:40]!r} in voice {voice!r}")
    return resample(pcm.astype(np.float64) / 32768.0, ESPEAK_RATE, rate).astype(np.float32)


# ---------------------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class SpokenDigits:
    """Clips of one spoken digit each; voice_ids index `voices`."""

    waves: tuple[np.ndarray, ...]  # float32 16 kHz, each at most CLIP_SAMPLES long
    labels: np.ndarray  # (N,) int64 digit
    voice_ids: np.ndarray  # (N,) int64
    voices: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.waves)

    def padded(self, n: int = CLIP_SAMPLES) -> np.ndarray:
        """(N, n) float32: every clip cut or padded with silence to n samples."""
        return pad_batch(self.waves, n)


def pad_batch(waves: Sequence[np.ndarray], n: int = CLIP_SAMPLES) -> np.ndarray:
    """(N, n) float32 from 1-D clips, each cut or padded with trailing silence to n samples."""
    out = np.zeros((len(waves), n), np.float32)
    for i, w in enumerate(waves):
        out[i, : min(n, len(w))] = w[:n]
    return out


def spoken_digits(n_per_class: int, seed: int = 0, voices: Sequence[str] = TRAIN_VOICES,
                  speed_wpm: tuple[int, int] = (120, 240), pitch: tuple[int, int] = (25, 75),
                  pitch_range: tuple[int, int] = (20, 80), peak: tuple[float, float] = (0.25, 0.9),
                  snr_db: tuple[float, float] | None = (25.0, 50.0)) -> SpokenDigits:  # fmt: skip
    """n_per_class clips of each English digit word, each in a random voice, speed, pitch and loudness,
    with white noise at a random SNR (None: clean). Deterministic for a seed."""
    if isinstance(n_per_class, bool) or not isinstance(n_per_class, int) or n_per_class < 1:
        raise MediaError(f"spoken_digits: n_per_class must be a positive integer, got {n_per_class!r}")
    if not voices:
        raise MediaError("spoken_digits: no voices")
    rng = np.random.default_rng(seed)
    waves, labels, vids = [], [], []
    for _ in range(n_per_class):
        for label, word in enumerate(DIGITS):
            v = int(rng.integers(len(voices)))
            w = synthesize(word, voices[v], int(rng.integers(speed_wpm[0], speed_wpm[1] + 1)),
                           int(rng.integers(pitch[0], pitch[1] + 1)),
                           int(rng.integers(pitch_range[0], pitch_range[1] + 1)))  # fmt: skip
            w = w[:CLIP_SAMPLES] * (rng.uniform(*peak) / max(float(np.abs(w).max()), 1e-6))
            if snr_db is not None:
                noise_rms = np.sqrt(np.mean(w**2)) * 10 ** (-rng.uniform(*snr_db) / 20)
                w = w + noise_rms * rng.standard_normal(len(w))
            waves.append(w.astype(np.float32))
            labels.append(label)
            vids.append(v)
    return SpokenDigits(tuple(waves), np.array(labels, np.int64), np.array(vids, np.int64), tuple(voices))


def digit_split(
    n_train_per_class: int, n_test_per_class: int, seed: int = 0
) -> tuple[SpokenDigits, SpokenDigits]:
    """(train, test): the test set speaks in TEST_VOICES only, accents and variants unseen in training."""
    train = spoken_digits(n_train_per_class, seed, TRAIN_VOICES)
    return train, spoken_digits(n_test_per_class, seed + 1_000_003, TEST_VOICES)


# ---------------------------------------------------------------------------------------------------- classifier

_MEL = MelConfig(chunk_seconds=None)  # Whisper's 80-band front end at 100 frames/s


def digit_features(waves: Sequence[np.ndarray]) -> Tensor:
    """(N, 80, 100) Whisper log-mel features of clips cut or padded to CLIP_SAMPLES."""
    for i, w in enumerate(waves):
        if np.ndim(w) != 1:
            raise MediaError(f"clip {i}: expected 1-D samples, got shape {np.shape(w)}")
    return torch.from_numpy(log_mel_batch(list(pad_batch(waves)), _MEL))


def conv_blocks(width: int, n_mels: int = _MEL.n_mels) -> nn.Sequential:
    """Log-mel (B, n_mels, T) -> (B, width, T / 8): three blocks of conv, batch norm, GELU and pooling."""
    layers: list[nn.Module] = []
    c_in = n_mels
    for _ in range(3):
        layers += [nn.Conv1d(c_in, width, 5, padding=2), nn.BatchNorm1d(width), nn.GELU(), nn.MaxPool1d(2)]
        c_in = width
    return nn.Sequential(*layers)


class DigitClassifier(nn.Module):
    """Log-mel (B, 80, frames) -> (B, 10) logits: three conv blocks, then mean and max over time."""

    def __init__(self, width: int = 96):
        super().__init__()
        self.body = conv_blocks(width)
        self.head = nn.Linear(2 * width, len(DIGITS))

    def forward(self, mel: Tensor) -> Tensor:
        h = self.body(mel)  # (B, W, frames / 8)
        return self.head(torch.cat([h.mean(-1), h.amax(-1)], dim=-1))


@dataclass(frozen=True)
class ClassifierTrainConfig:
    epochs: int = 20
    batch_size: int = 64
    lr: float = 3e-3
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"ClassifierTrainConfig.{name} must be a positive integer, got {v!r}")
        if not self.lr > 0:
            raise ValueError(f"ClassifierTrainConfig.lr must be positive, got {self.lr!r}")


def _augment(mel: Tensor, g: torch.Generator) -> Tensor:
    """Random shift in time (words start at different points) and one masked band of mels
    (SpecAugment), so the classifier leans on no single formant of the training voices."""
    B, M, _ = mel.shape
    shift = int(torch.randint(-8, 9, (), generator=g))
    mel = torch.roll(mel, shift, dims=-1)
    lo = torch.randint(0, M - 8, (B, 1, 1), generator=g)
    band = (torch.arange(M).view(1, M, 1) >= lo) & (torch.arange(M).view(1, M, 1) < lo + 8)
    return torch.where(band, mel.amin(dim=(1, 2), keepdim=True), mel)


def train_spoken_digit_classifier(data: SpokenDigits, config: ClassifierTrainConfig = ClassifierTrainConfig(),
                                  on_progress: Callable[[int, int, float], None] | None = None
                                  ) -> DigitClassifier:  # fmt: skip
    """A DigitClassifier trained with AdamW on `data`; on_progress(epoch, epochs, mean loss). Seeded by
    `config.seed` without touching the caller's random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return _train_classifier(data, config, on_progress)


def _train_classifier(data: SpokenDigits, config: ClassifierTrainConfig,
                      on_progress: Callable[[int, int, float], None] | None) -> DigitClassifier:  # fmt: skip
    g = torch.Generator().manual_seed(config.seed)
    x, y = digit_features(data.waves), torch.from_numpy(data.labels)
    model = DigitClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=1e-2)
    steps = config.epochs * -(-len(y) // config.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, config.lr, total_steps=steps)
    model.train()
    for epoch in range(config.epochs):
        order = torch.randperm(len(y), generator=g)
        total = 0.0
        for i in range(0, len(y), config.batch_size):
            idx = order[i : i + config.batch_size]
            loss = F.cross_entropy(model(_augment(x[idx], g)), y[idx], label_smoothing=0.05)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        if on_progress is not None:
            on_progress(epoch + 1, config.epochs, total / len(y))
    return model.eval()


@torch.no_grad()
def predict_digits(classifier: DigitClassifier, waves: Sequence[np.ndarray]) -> np.ndarray:
    """(N,) int64 predicted digit of each clip."""
    classifier.eval()
    return classifier(digit_features(waves)).argmax(-1).numpy()


def accuracy(classifier: DigitClassifier, waves: Sequence[np.ndarray], labels: np.ndarray) -> float:
    """Fraction of clips whose predicted digit equals the label."""
    if len(waves) != len(labels) or len(waves) == 0:
        raise MediaError(f"accuracy: {len(waves)} clips for {len(labels)} labels")
    return float((predict_digits(classifier, waves) == np.asarray(labels)).mean())
