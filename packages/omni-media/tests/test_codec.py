"""omni_media.codec: shapes and token ranges, the STFT layers, residual FSQ, checkpoints as untrusted
input, torch.export of both halves, training that lowers the loss, and the evaluation figures."""

from __future__ import annotations

import dataclasses
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from omni_media.codec import (
    AudioCodec,
    CodecConfig,
    ResidualFSQ,
    TrainConfig,
    codec_loss,
    evaluate_codec,
    load_codec,
    mel_distance,
    reconstruct,
    save_codec,
    speech_experiment,
    train_codec,
)
from omni_media.errors import MediaError
from omni_media.speech import DigitClassifier, spoken_digits

TINY = CodecConfig(channels=32, n_blocks=1)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from a second intra-op thread, and on a busy machine OpenMP threads
    waiting on each other turned a 5 s training test into minutes."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _codec(config: CodecConfig = TINY, seed: int = 0) -> AudioCodec:
    torch.manual_seed(seed)
    return AudioCodec(config).eval()


def _speech(n: int, length: int, seed: int = 0) -> torch.Tensor:
    """(n, length) harmonic tones with a moving pitch and an envelope: speech-like enough to train on."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(length) / 16000
    f0 = 100 + 150 * torch.rand(n, 1, generator=g)
    phase = 2 * torch.pi * torch.cumsum(f0 * (1 + 0.2 * torch.sin(2 * torch.pi * 3 * t)), -1) / 16000
    x = sum(torch.sin(k * phase) / k for k in range(1, 8))
    return (0.2 * x * torch.sin(torch.pi * t / t[-1]) ** 2).float()


def test_config_properties_and_validation():
    c = CodecConfig()
    assert c.stride == 320 and c.frame_rate == 50.0 and c.vocab_size == 1000
    assert c.bitrate == pytest.approx(50 * 2 * np.log2(1000))
    for field, bad in (
        ("hop", 0),
        ("channels", -1),
        ("n_q", True),
        ("levels", (8, 1)),
        ("n_fft", 500),
        ("hop", 161),
    ):
        with pytest.raises(ValueError, match=field):
            dataclasses.replace(c, **{field: bad})
    with pytest.raises(ValueError, match="segment_samples"):
        TrainConfig(segment_samples=0)
    with pytest.raises(ValueError, match="time_budget_s"):
        TrainConfig(time_budget_s=0.0)


def test_stft_layers_invert_each_other():
    # The fixed analysis / synthesis kernels are an STFT and its inverse: a round trip is the identity.
    codec = _codec()
    x = torch.randn(2, 3200)
    p, hop = codec._pad(), codec.config.hop
    spec = F.conv1d(F.pad(x.unsqueeze(1), (p, p)), codec.analysis, stride=hop)  # (B, 2F, T/hop)
    n_fft = codec.config.n_fft
    ref = torch.stft(F.pad(x, (p, p)), n_fft, hop, window=torch.hann_window(n_fft), center=False,
                     return_complex=True)  # fmt: skip
    torch.testing.assert_close(torch.complex(*spec.chunk(2, dim=1)), ref, atol=2e-3, rtol=1e-4)
    y = F.conv_transpose1d(spec, codec.synthesis, stride=hop)
    env = F.conv_transpose1d(torch.ones_like(spec[:, :1]), codec.window_sq, stride=hop)
    torch.testing.assert_close((y / env)[:, 0, p:-p], x, atol=1e-5, rtol=0)


def test_residual_fsq_decodes_its_own_indices_and_each_stage_refines():
    torch.manual_seed(0)
    z = (torch.rand(256, 4) * 2 - 1) * 0.7  # latents well inside the bounded range
    errors = []
    for n_q in (1, 2, 3):
        rfsq = ResidualFSQ((8, 5, 5, 5), n_q)
        q, idx = rfsq(z)
        assert idx.shape == (256, n_q) and idx.min() >= 0 and idx.max() < 1000
        torch.testing.assert_close(rfsq.decode(idx), q, atol=1e-6, rtol=0)
        errors.append(float((q - z).abs().mean()))
    assert errors[1] < 0.5 * errors[0] and errors[2] < 0.5 * errors[1]


def test_shapes_token_range_and_determinism():
    codec = _codec()
    x = _speech(3, 5000)  # not a multiple of the 320-sample stride
    tokens = codec.encode(x)
    assert tokens.shape == (3, 2, 16) and tokens.dtype == torch.int64  # ceil(5000 / 320) = 16
    assert int(tokens.min()) >= 0 and int(tokens.max()) < codec.vocab_size
    wave = codec.decode(tokens)
    assert wave.shape == (3, 16 * 320) and wave.dtype == torch.float32
    with torch.no_grad():
        recon, t2 = codec(x)
    assert recon.shape == x.shape
    torch.testing.assert_close(t2, tokens, atol=0, rtol=0)
    torch.testing.assert_close(recon, wave[:, :5000], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(codec.encode(x), tokens, atol=0, rtol=0)
    torch.testing.assert_close(_codec().encode(x), tokens, atol=0, rtol=0)  # same seed, same codec
    assert codec.frame_rate == 50.0 and codec.vocab_size == 1000


@pytest.mark.parametrize("downsample", [1, 3, 4])
def test_other_frame_rates_keep_the_shapes(downsample: int):
    codec = _codec(dataclasses.replace(TINY, downsample=downsample, n_q=1, levels=(5, 5, 5)))
    x = _speech(2, 3000)
    tokens = codec.encode(x)
    frames = -(-3000 // (160 * downsample))
    assert tokens.shape == (2, 1, frames) and int(tokens.max()) < 125
    assert codec.decode(tokens).shape == (2, frames * 160 * downsample) and codec(x)[0].shape == x.shape


def test_check_tokens():
    codec = _codec()
    codec.check_tokens(torch.zeros(1, 2, 5, dtype=torch.int64))
    with pytest.raises(MediaError, match=r"\[0, 1000\)"):
        codec.check_tokens(torch.full((1, 2, 5), 1000))
    with pytest.raises(MediaError, match="expected"):
        codec.check_tokens(torch.zeros(1, 3, 5, dtype=torch.int64))


@pytest.mark.export
def test_both_halves_pass_torch_export():
    codec = _codec()
    x = _speech(2, 3200)
    tokens = codec.encode(x)
    enc = torch.export.export(codec.encoder_module(), (x,), strict=False).module()
    dec = torch.export.export(codec.decoder_module(), (tokens,), strict=False).module()
    torch.testing.assert_close(enc(x), tokens, atol=0, rtol=0)
    torch.testing.assert_close(dec(tokens), codec.decode(tokens), atol=1e-6, rtol=1e-5)


def test_save_load_roundtrip_is_exact(tmp_path: Path):
    codec = _codec(seed=3)
    path = save_codec(codec, tmp_path / "codec.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["codec.safetensors"]  # no temporary left behind
    loaded = load_codec(path, TINY)
    assert loaded.config == TINY and not loaded.training
    for (name, a), (_, b) in zip(codec.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    x = _speech(1, 3200)
    torch.testing.assert_close(loaded.encode(x), codec.encode(x), atol=0, rtol=0)


def test_bad_checkpoints_raise_media_error_naming_the_file(tmp_path: Path):
    path = save_codec(_codec(), tmp_path / "codec.safetensors")
    data = path.read_bytes()

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(MediaError, match=r"truncated\.safetensors"):
        load_codec(truncated)

    with pytest.raises(MediaError, match=r"codec\.safetensors: a checkpoint for"):
        load_codec(path, dataclasses.replace(TINY, channels=48))

    pickled = tmp_path / "pickled.safetensors"
    pickled.write_bytes(pickle.dumps({"enc_in.weight": np.zeros(3)}))
    with pytest.raises(MediaError, match=r"pickled\.safetensors: not a readable safetensors"):
        load_codec(pickled)

    bare = tmp_path / "bare.safetensors"  # the right tensors but no config in the metadata
    save_file({k: v.contiguous() for k, v in _codec().state_dict().items()}, str(bare))
    with pytest.raises(MediaError, match=r"bare\.safetensors: no codec config"):
        load_codec(bare)

    lying = tmp_path / "lying.safetensors"  # metadata says one configuration, tensors are another's
    other = dataclasses.asdict(dataclasses.replace(TINY, channels=48))
    save_file({k: v.contiguous() for k, v in _codec().state_dict().items()}, str(lying),
              metadata={"format": "omni-media-audio-codec/1", "config": json.dumps(other)})  # fmt: skip
    with pytest.raises(MediaError, match=r"lying\.safetensors: tensors do not fit"):
        load_codec(lying)

    with pytest.raises(MediaError, match=r"missing\.safetensors"):
        load_codec(tmp_path / "missing.safetensors")


def test_short_training_lowers_the_loss():
    waves = [w.numpy() for w in _speech(16, 4800, seed=1)]
    held_out = _speech(8, 3200, seed=2)
    train = TrainConfig(steps=40, batch_size=8, segment_samples=3200, lr=3e-3, seed=0)
    before = _codec(seed=train.seed)  # train_codec seeds torch the same way before building its codec
    with torch.no_grad():
        loss_before = float(codec_loss(held_out, before(held_out)[0]))
    losses: list[float] = []
    codec = train_codec(waves, TINY, train, on_progress=lambda step, steps, loss: losses.append(loss))
    with torch.no_grad():
        loss_after = float(codec_loss(held_out, codec(held_out)[0]))
    assert len(losses) == 40 and not codec.training
    assert loss_after < 0.75 * loss_before
    assert np.mean(losses[-5:]) < 0.75 * np.mean(losses[:5])


def test_time_budget_stops_training_early():
    waves = [w.numpy() for w in _speech(4, 3200)]
    steps: list[int] = []
    train_codec(waves, TINY, TrainConfig(steps=10_000, batch_size=2, segment_samples=640, time_budget_s=0.5),
                on_progress=lambda step, n, loss: steps.append(step))  # fmt: skip
    assert 0 < len(steps) < 10_000
    with pytest.raises(MediaError, match="stride"):
        train_codec(waves, TINY, TrainConfig(segment_samples=1000))


def test_mel_distance_and_evaluation_figures():
    data = spoken_digits(1, seed=0)
    waves = list(data.waves)
    assert mel_distance(waves, waves) == 0.0
    noisy = [w + 0.05 * np.random.default_rng(0).standard_normal(len(w)).astype(np.float32) for w in waves]
    assert mel_distance(waves, noisy) > 0.05
    with pytest.raises(MediaError, match="mel_distance"):
        mel_distance(waves, waves[:3])
    codec = _codec()
    recon = reconstruct(codec, waves)
    assert [len(r) for r in recon] == [len(w) for w in waves]
    figures = evaluate_codec(codec, DigitClassifier().eval(), waves, data.labels)
    assert figures["bitrate_bps"] == pytest.approx(TINY.bitrate) and figures["tokens_per_second"] == 100.0
    assert 0 <= figures["accuracy_reconstructed"] <= 1 and figures["mel_distance"] > 0


@pytest.mark.slow
def test_speech_experiment_runs_end_to_end():
    from omni_media.speech import ClassifierTrainConfig

    codec, classifier, figures = speech_experiment(
        seed=0, n_train_per_class=3, n_test_per_class=1, codec_config=TINY,
        train=TrainConfig(steps=5, batch_size=4), classifier_train=ClassifierTrainConfig(epochs=2),
    )  # fmt: skip
    assert figures["n_train"] == 30 and figures["n_test"] == 10
    assert figures["codec_train_seconds"] > 0 and figures["mel_distance"] > 0
    assert isinstance(codec, AudioCodec) and isinstance(classifier, DigitClassifier)
