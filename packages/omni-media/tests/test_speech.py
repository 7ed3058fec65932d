"""omni_media.speech: eSpeak NG synthesis through ctypes, the spoken-digit data set and its classifier."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from omni_media.errors import MediaError
from omni_media.speech import (
    DIGITS,
    ENGLISH_ACCENTS,
    FOREIGN_ACCENTS,
    TEST_VOICES,
    TRAIN_VOICES,
    ClassifierTrainConfig,
    accuracy,
    digit_features,
    digit_split,
    list_variants,
    list_voices,
    pad_batch,
    predict_digits,
    spoken_digits,
    synthesize,
    train_spoken_digit_classifier,
)

SR = 16000


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from a second intra-op thread, and on a busy machine OpenMP threads
    waiting on each other turned a 5 s training test into minutes."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(x.astype(np.float64) ** 2)))


def test_synthesize_speaks_a_word_at_16k():
    w = synthesize("seven")
    assert w.dtype == np.float32 and w.ndim == 1
    assert 0.2 * SR < len(w) < 1.5 * SR  # one two-syllable word
    assert _rms(w) > 0.02 and np.abs(w).max() <= 1.0
    # Speech energy sits below 4 kHz: a resampler or sample-format slip would show up as broadband hash.
    spec = np.abs(np.fft.rfft(w)) ** 2
    freqs = np.fft.rfftfreq(len(w), 1 / SR)
    assert spec[freqs < 4000].sum() > 0.9 * spec.sum()


def test_synthesize_rate_speed_and_text_length():
    w16, w8 = synthesize("four", rate=16000), synthesize("four", rate=8000)
    assert abs(len(w16) - 2 * len(w8)) <= 2
    slow, fast = synthesize("nine", speed_wpm=100), synthesize("nine", speed_wpm=300)
    assert len(slow) > 1.5 * len(fast)
    assert len(synthesize("one two three four five")) > 3 * len(synthesize("one"))


def test_synthesize_is_deterministic_across_calls():
    a = synthesize("three", "en-gb-scotland+f2", speed_wpm=150, pitch=30, pitch_range=70)
    synthesize("eight", "de+m3", speed_wpm=300, pitch=90, pitch_range=10)  # library state in between
    b = synthesize("three", "en-gb-scotland+f2", speed_wpm=150, pitch=30, pitch_range=70)
    np.testing.assert_array_equal(a, b)


def _same_length_distance(a: np.ndarray, b: np.ndarray) -> float:
    n = min(len(a), len(b))
    return _rms(a[:n] - b[:n]) / _rms(a[:n])


def test_voices_variants_and_pitch_change_the_audio():
    base = synthesize("five", "en")
    for other in (
        synthesize("five", "en-us"),
        synthesize("five", "en+f3"),
        synthesize("five", "en", pitch=90),
    ):
        assert other.shape != base.shape or _same_length_distance(base, other) > 0.1
    # A higher pitch setting raises the fundamental: more zero crossings in the voiced part.
    low, high = synthesize("oh", "en", pitch=10), synthesize("oh", "en", pitch=95)

    def crossings(x: np.ndarray) -> float:
        return float(np.mean(np.abs(np.diff(np.sign(x[np.abs(x) > 0.05 * np.abs(x).max()])))))

    assert crossings(high) > crossings(low)


def test_voice_lists_cover_the_curated_accents():
    voices, variants = set(list_voices()), set(list_variants())
    assert set(ENGLISH_ACCENTS + FOREIGN_ACCENTS) <= voices
    assert {"m1", "m5", "f3", "f5"} <= variants
    for v in TRAIN_VOICES + TEST_VOICES:
        accent, _, variant = v.partition("+")
        assert accent in voices and (not variant or variant in variants)


def test_test_voices_are_held_out():
    train_accents = {v.partition("+")[0] for v in TRAIN_VOICES}
    train_variants = {v.partition("+")[2] for v in TRAIN_VOICES}
    for v in TEST_VOICES:
        accent, _, variant = v.partition("+")
        assert accent not in train_accents and variant not in train_variants


@pytest.mark.parametrize(
    ("text", "voice", "kw", "match"),
    [
        ("", "en", {}, "non-empty"),
        ("   ", "en", {}, "non-empty"),
        ("one", "xx-nowhere", {}, "unknown voice"),
        ("one", "en+nosuchvariant", {}, "unknown variant"),
        ("one", "en", {"speed_wpm": 10}, "speed_wpm"),
        ("one", "en", {"pitch": 101}, "pitch"),
        ("one", "en", {"rate": 0}, "rate"),
    ],
)
def test_bad_requests_raise_media_error(text, voice, kw, match):
    with pytest.raises(MediaError, match=match):
        synthesize(text, voice, **kw)


def test_spoken_digits_are_labelled_deterministic_and_varied():
    a = spoken_digits(2, seed=3)
    b = spoken_digits(2, seed=3)
    assert len(a) == 20 and sorted(a.labels.tolist()) == sorted(list(range(10)) * 2)
    assert all(np.array_equal(x, y) for x, y in zip(a.waves, b.waves, strict=True))
    assert all(w.dtype == np.float32 and 0 < len(w) <= SR for w in a.waves)
    assert len(set(a.voice_ids.tolist())) > 3  # random voices among the 56 training ones
    c = spoken_digits(2, seed=4)
    assert not all(np.array_equal(x, y) for x, y in zip(a.waves, c.waves, strict=True))
    assert a.padded().shape == (20, SR)
    with pytest.raises(MediaError, match="n_per_class"):
        spoken_digits(0)


def test_pad_batch_cuts_and_pads():
    out = pad_batch([np.ones(3, np.float32), np.ones(10, np.float32)], 5)
    np.testing.assert_array_equal(out, [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])


def test_digit_features_refuse_a_clip_that_is_not_1d():
    assert digit_features([np.zeros(8000, np.float32)]).shape == (1, 80, 100)
    with pytest.raises(MediaError, match=r"clip 1: expected 1-D samples, got shape \(2, 800\)"):
        digit_features([np.zeros(800, np.float32), np.zeros((2, 800), np.float32)])


def test_classifier_beats_chance_on_unseen_voices():
    train, test = digit_split(8, 3, seed=0)
    assert set(test.voices) == set(TEST_VOICES) and len(train) == 80 and len(test) == 30
    clf = train_spoken_digit_classifier(train, ClassifierTrainConfig(epochs=12, batch_size=16))
    assert accuracy(clf, test.waves, test.labels) >= 0.4  # chance is 0.1
    assert predict_digits(clf, test.waves[:4]).shape == (4,)
    assert len(DIGITS) == 10


def test_classifier_config_names_the_field():
    with pytest.raises(ValueError, match="epochs"):
        ClassifierTrainConfig(epochs=0)
    with pytest.raises(ValueError, match="lr"):
        ClassifierTrainConfig(lr=-1.0)
