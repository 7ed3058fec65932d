"""omni_media.audio against transformers' WhisperFeatureExtractor and WhisperModel, plus WAV reading,
resampling and the inputs that must be refused."""

from __future__ import annotations

import json
import pickle
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from omni_media.audio import (
    MelConfig,
    log_mel,
    log_mel_batch,
    mel_filters,
    read_wav,
    resample,
)
from omni_media.errors import MediaError
from omni_media.whisper import WhisperEncoder, WhisperEncoderConfig, load_whisper_encoder

SR = 16000
TOL = 1e-4


def _signals() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    t = np.arange(8 * SR) / SR
    return {
        "chirp": (0.5 * np.sin(2 * np.pi * (100 * t + (7000 - 100) / (2 * 8) * t**2))).astype(np.float32),
        "noise": (0.1 * rng.standard_normal(5 * SR)).astype(np.float32),
        "short": (0.3 * np.sin(2 * np.pi * 440 * np.arange(SR // 3) / SR)).astype(np.float32),  # 0.33 s
        "long": (0.2 * rng.standard_normal(32 * SR)).astype(np.float64),  # > 30 s, and float64 input
    }


SIGNALS = _signals()


# ---------------------------------------------------------------------------------------------------- log-mel


@pytest.mark.parametrize("n_mels", [80, 128])
def test_mel_filters_match_transformers(n_mels):
    from transformers.audio_utils import mel_filter_bank

    ref = mel_filter_bank(201, n_mels, 0.0, 8000.0, SR, norm="slaney", mel_scale="slaney")
    assert mel_filters(MelConfig(n_mels=n_mels)).shape == ref.shape
    assert np.abs(mel_filters(MelConfig(n_mels=n_mels)) - ref).max() < 1e-12


@pytest.mark.parametrize("n_mels", [80, 128])
def test_log_mel_matches_whisper_feature_extractor(n_mels):
    from transformers import WhisperFeatureExtractor

    fe = WhisperFeatureExtractor(feature_size=n_mels)
    config = MelConfig(n_mels=n_mels)
    for name, x in SIGNALS.items():
        ref = fe(x, sampling_rate=SR, return_tensors="np").input_features[0]
        ours = log_mel(x, config)
        assert ours.shape == ref.shape == (n_mels, 3000), name
        assert ours.dtype == np.float32
        assert np.abs(ours - ref).max() <= TOL, name
    batch = log_mel_batch(list(SIGNALS.values()), config)
    ref = fe(list(SIGNALS.values()), sampling_rate=SR, return_tensors="np").input_features
    assert batch.shape == ref.shape == (4, n_mels, 3000)
    assert np.abs(batch - ref).max() <= TOL


def test_log_mel_without_chunking_matches_padding_longest():
    from transformers import WhisperFeatureExtractor

    x = SIGNALS["noise"][: 2 * SR + 37]
    ours = log_mel(x, MelConfig(chunk_seconds=None))
    ref = WhisperFeatureExtractor()(
        x, sampling_rate=SR, padding="longest", return_tensors="np"
    ).input_features[0]
    assert ours.shape == ref.shape == (80, len(x) // 160)
    assert np.abs(ours - ref).max() <= TOL


def test_log_mel_floor_is_per_clip():
    loud, quiet = SIGNALS["noise"], SIGNALS["noise"] * 1e-3
    both = log_mel_batch([loud, quiet])
    assert np.array_equal(both[1], log_mel(quiet))  # the loud clip does not set the quiet one's floor
    assert both[0].max() - both[0].min() == pytest.approx(2.0, abs=1e-5)  # 8 decades / 4


@pytest.mark.parametrize(
    "bad", [np.zeros((2, 100), np.float32), np.zeros(0, np.float32), np.array([0.0, np.nan] * 200)]
)
def test_log_mel_refuses_bad_waveforms(bad):
    with pytest.raises(MediaError, match="waveform"):
        log_mel(bad)


def test_mel_config_validates():
    with pytest.raises(ValueError, match="f_max"):
        MelConfig(f_max=9000.0)
    with pytest.raises(ValueError, match="n_mels"):
        MelConfig(n_mels=0)
    with pytest.raises(ValueError, match="chunk_seconds"):
        MelConfig(chunk_seconds=2.5)


# ---------------------------------------------------------------------------------------------------- wav


def _write_wav(path: Path, samples: np.ndarray, rate: int = SR, width: int = 2) -> Path:
    """samples (n,) or (n, channels) in [-1, 1) written as `width`-byte PCM."""
    s = samples.reshape(len(samples), -1)
    scale = 2.0 ** (8 * width - 1)
    q = np.clip(np.round(s * scale), -scale, scale - 1).astype(np.int64)
    if width == 1:
        raw = (q + 128).astype(np.uint8).tobytes()
    elif width == 3:
        raw = (q.astype("<i4").view(np.uint8).reshape(*q.shape, 4)[..., :3]).tobytes()
    else:
        raw = q.astype(f"<i{width}").tobytes()
    with wave.open(str(path), "wb") as f:
        f.setnchannels(s.shape[1])
        f.setsampwidth(width)
        f.setframerate(rate)
        f.writeframes(raw)
    return path


@pytest.mark.parametrize("width", [1, 2, 3, 4])
def test_read_wav_mono_each_width(tmp_path, width):
    x = 0.8 * np.sin(2 * np.pi * 300 * np.arange(4000) / SR)
    y = read_wav(_write_wav(tmp_path / "a.wav", x, width=width))
    assert y.dtype == np.float32 and y.shape == x.shape
    assert np.abs(y - x).max() <= 1.0 / 2 ** (8 * width - 1) + 1e-7  # one quantisation step


def test_read_wav_stereo_averages_channels(tmp_path):
    t = np.arange(3000) / SR
    left, right = 0.5 * np.sin(2 * np.pi * 200 * t), 0.25 * np.cos(2 * np.pi * 700 * t)
    y = read_wav(_write_wav(tmp_path / "s.wav", np.stack([left, right], axis=1)))
    assert y.shape == (3000,)
    assert np.abs(y - (left + right) / 2).max() < 1e-4


def _peak_hz(y: np.ndarray, rate: int) -> float:
    spec = np.abs(np.fft.rfft(y * np.hanning(len(y))))
    k = int(np.argmax(spec))
    a, b, c = np.log(spec[k - 1 : k + 2])  # parabolic interpolation of the peak bin
    return (k + 0.5 * (a - c) / (a - 2 * b + c)) * rate / len(y)


@pytest.mark.parametrize("src_rate, hz", [(44100, 1000.0), (8000, 440.0), (48000, 3000.0)])
def test_read_wav_resamples_keeping_frequency_and_level(tmp_path, src_rate, hz):
    n = 2 * src_rate
    x = 0.5 * np.sin(2 * np.pi * hz * np.arange(n) / src_rate)
    y = read_wav(_write_wav(tmp_path / "r.wav", x, rate=src_rate))
    assert len(y) == -(-n * SR // src_rate)
    assert _peak_hz(y, SR) == pytest.approx(hz, abs=0.5)
    mid = y[len(y) // 4 : 3 * len(y) // 4]
    assert np.sqrt(np.mean(mid.astype(np.float64) ** 2)) == pytest.approx(0.5 / np.sqrt(2), rel=0.01)


def test_resample_filters_what_would_alias():
    # 12 kHz at 44.1 kHz is above 16 kHz's Nyquist: without the low-pass it would fold to 4 kHz.
    x = np.sin(2 * np.pi * 12000 * np.arange(44100) / 44100)
    y = resample(x, 44100, SR)
    assert np.sqrt(np.mean(y[1000:-1000] ** 2)) < 1e-3


def test_read_wav_refuses_truncated_and_non_wav(tmp_path):
    good = _write_wav(tmp_path / "t.wav", np.zeros(1000))
    cut = tmp_path / "cut.wav"
    cut.write_bytes(good.read_bytes()[:-500])
    with pytest.raises(MediaError, match=r"cut\.wav.*truncated"):
        read_wav(cut)
    header_only = tmp_path / "h.wav"
    header_only.write_bytes(good.read_bytes()[:20])
    with pytest.raises(MediaError, match=r"h\.wav"):
        read_wav(header_only)
    text = tmp_path / "notes.wav"
    text.write_text("this is not audio\n" * 10)
    with pytest.raises(MediaError, match=r"notes\.wav"):
        read_wav(text)
    with pytest.raises(MediaError, match=r"missing\.wav"):
        read_wav(tmp_path / "missing.wav")


# ---------------------------------------------------------------------------------------------------- encoder


def _hf_config(**over):
    from transformers import WhisperConfig

    kw = dict(
        vocab_size=64, d_model=32, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64,
        decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=64, max_source_positions=1500,
        max_target_positions=16, num_mel_bins=80, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        decoder_start_token_id=1, suppress_tokens=None, begin_suppress_tokens=None,
    )  # fmt: skip
    return WhisperConfig(**(kw | over))


@pytest.fixture(scope="module")
def whisper(tmp_path_factory):
    """A tiny random WhisperModel and its safetensors folder."""
    from transformers import WhisperModel

    torch.manual_seed(0)
    model = WhisperModel(_hf_config()).eval()
    with torch.no_grad():  # random LayerNorm affine and biases too, so a mix-up shows
        for p in model.encoder.parameters():
            p.add_(0.1 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("whisper")
    model.save_pretrained(folder, safe_serialization=True)
    return model, folder


def _features() -> torch.Tensor:
    return torch.from_numpy(log_mel_batch([SIGNALS["chirp"], SIGNALS["noise"]]))  # (2, 80, 3000)


def test_encoder_matches_transformers(whisper):
    model, folder = whisper
    config, encoder = load_whisper_encoder(folder)
    assert config == WhisperEncoderConfig(80, 32, 2, 4, 64, 1500)
    assert not encoder.training
    x = _features()
    with torch.no_grad():
        ref = model.encoder(x).last_hidden_state
        ours = encoder(x)
    assert ours.shape == ref.shape == (2, 1500, 32)
    assert (ours - ref).abs().max().item() <= TOL


def test_encoder_loads_from_conditional_generation_folder(whisper, tmp_path):
    from transformers import WhisperForConditionalGeneration

    model, _ = whisper
    full = WhisperForConditionalGeneration(_hf_config()).eval()
    full.model.load_state_dict(model.state_dict())
    full.save_pretrained(tmp_path, safe_serialization=True)
    assert any(k.startswith("model.encoder.") for k in load_file(tmp_path / "model.safetensors"))
    _, encoder = load_whisper_encoder(tmp_path)
    x = _features()[:1]
    with torch.no_grad():
        assert (encoder(x) - model.encoder(x).last_hidden_state).abs().max().item() <= TOL


def test_encoder_refuses_bad_input(whisper):
    _, encoder = load_whisper_encoder(whisper[1])
    with pytest.raises(MediaError, match="input_features"):
        encoder(torch.zeros(1, 128, 3000))
    with pytest.raises(MediaError, match="3000"):
        encoder(torch.zeros(1, 80, 3002))
    assert encoder(torch.zeros(1, 80, 1000)).shape == (1, 500, 32)  # shorter clips use the first positions


def _copy_folder(src: Path, dst: Path, config_edit=None, tensor_edit=None) -> Path:
    dst.mkdir()
    cfg = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(config_edit(cfg) if config_edit else cfg))
    state = load_file(src / "model.safetensors")
    save_file(tensor_edit(state) if tensor_edit else state, dst / "model.safetensors")
    return dst


def test_loader_refuses_bad_folders(whisper, tmp_path):
    src = whisper[1]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MediaError, match=r"no config\.json"):
        load_whisper_encoder(empty)

    bad_type = _copy_folder(src, tmp_path / "bad_type", config_edit=lambda c: c | {"d_model": "32"})
    with pytest.raises(MediaError, match=r"config\.json: d_model must be an integer"):
        load_whisper_encoder(bad_type)

    relu = _copy_folder(src, tmp_path / "relu", config_edit=lambda c: c | {"activation_function": "relu"})
    with pytest.raises(MediaError, match="activation_function"):
        load_whisper_encoder(relu)

    def wrong_shape(s):
        s["encoder.conv1.weight"] = torch.zeros(32, 80, 5)
        return s

    with pytest.raises(MediaError, match=r"'encoder.conv1.weight' has shape \(32, 80, 5\)"):
        load_whisper_encoder(_copy_folder(src, tmp_path / "shape", tensor_edit=wrong_shape))

    missing = _copy_folder(
        src, tmp_path / "missing", tensor_edit=lambda s: {k: v for k, v in s.items() if "fc2" not in k}
    )
    with pytest.raises(MediaError, match=r"missing tensor 'encoder\.layers\.0\.fc2"):
        load_whisper_encoder(missing)

    one_layer = _copy_folder(src, tmp_path / "extra", config_edit=lambda c: c | {"encoder_layers": 1})
    with pytest.raises(MediaError, match="unexpected encoder tensors"):
        load_whisper_encoder(one_layer)


class _Tripwire:
    """Unpickling this would create a file: the test proves the loader never unpickles."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_loader_refuses_pickles_without_loading_them(whisper, tmp_path):
    (tmp_path / "config.json").write_text((whisper[1] / "config.json").read_text())
    sentinel = tmp_path / "unpickled"
    (tmp_path / "pytorch_model.bin").write_bytes(pickle.dumps(_Tripwire(sentinel)))
    with pytest.raises(MediaError, match=r"pytorch_model\.bin are pickles, never loaded"):
        load_whisper_encoder(tmp_path)
    assert not sentinel.exists()
    pickle.loads((tmp_path / "pytorch_model.bin").read_bytes())  # the tripwire works when it is unpickled
    assert sentinel.exists()


def test_encoder_config_from_hf_dict():
    cfg = {"model_type": "whisper", "num_mel_bins": 128, "d_model": 1280, "encoder_layers": 32,
           "encoder_attention_heads": 20, "encoder_ffn_dim": 5120, "max_source_positions": 1500}  # fmt: skip
    config = WhisperEncoderConfig.from_hf(cfg)
    assert config.mel == MelConfig(n_mels=128)
    with pytest.raises(MediaError, match="model_type"):
        WhisperEncoderConfig.from_hf(cfg | {"model_type": "llama"})
    with pytest.raises(MediaError, match="multiple"):
        WhisperEncoderConfig.from_hf(cfg | {"encoder_attention_heads": 3})
    assert sum(p.numel() for p in WhisperEncoder(WhisperEncoderConfig(80, 32, 1, 4, 64, 10)).parameters()) > 0
