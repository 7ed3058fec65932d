"""An any-to-any digit-world model to one ONNX bundle and back through omni_runtime.omni: greedy answers
identical to omni_train.omni_eval.generate for image, speech and video prompts, generated spans decoded
as the PyTorch tokenizers decode them, a torch-free runtime process, and the bundles and inputs refused.

The model is a tiny untrained one built here (no training run); the folder is written as
press_play.omni_cmd.save_omni writes it (that app function itself is exercised in press-play's tests).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from omni_export.errors import ExportError
from omni_export.omni import MANIFEST, OmniLayout, export_omni
from omni_media.audio import MelConfig, log_mel_batch
from omni_media.codec import AudioCodec, CodecConfig, save_codec
from omni_media.image_tokenizer import ImageTokenizer, ImageTokenizerConfig, save_image_tokenizer
from omni_media.interpolate import InterpolatorConfig, KeyframeInterpolator, save_interpolator
from omni_media.keyframes import at_size, decode_clips, fill_between
from omni_media.verifier import CrossModalVerifier, VerifierConfig, save_verifier
from omni_runtime.engine import EngineError
from omni_runtime.omni import OmniRuntime
from omni_train import omni_data as od
from omni_train.omni import OmniConfig, OmniModel
from omni_train.omni_eval import generate

pytestmark = pytest.mark.export

TINY = OmniConfig(dim=32, n_layers=2, n_heads=2, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=8,
                  v_head_dim=8, expert_dim=32, encoder_width=4, speech_width=8)  # fmt: skip
RATE = 16000


def tiny_parts(seed: int = 0):
    """An untrained OmniModel and media tokenizers small enough for tests (1000 image codes and 2 x 1000
    audio codes, as the vocabulary requires)."""
    torch.manual_seed(seed)
    model = OmniModel(TINY).eval()
    tok = ImageTokenizer(ImageTokenizerConfig(widths=(8, 16), levels=(8, 5, 5, 5))).eval()
    codec = AudioCodec(CodecConfig(channels=16, n_blocks=1, levels=(8, 5, 5, 5), n_q=2)).eval()
    interp = KeyframeInterpolator(InterpolatorConfig(channels=4, hidden=8)).eval()
    for p in interp.out.parameters():  # it starts as the plain blend; make the learned part count
        torch.nn.init.normal_(p, std=0.1)
    return model, tok, codec, interp


def save_folder(model, tok, codec, interp, folder, verifier=None) -> None:
    """What press_play.omni_cmd.save_omni writes, less the figures (the export does not read them)."""
    from safetensors.torch import save_file

    from omni_model.native import save

    def extra(tmp) -> None:
        enc = {f"{m}.{k}": v.detach().contiguous() for m, mod in model.encoders().items()
               for k, v in mod.state_dict().items()}  # fmt: skip
        save_file(enc, str(tmp / "encoders.safetensors"))
        save_image_tokenizer(tok, tmp / "image_tokenizer.safetensors")
        save_codec(codec, tmp / "codec.safetensors")
        save_interpolator(interp, tmp / "interpolator.safetensors")
        if verifier is not None:
            save_verifier(verifier, tmp / "verifier.safetensors")

    vocab = od.media_vocab()
    sampling = {"temperature": 0.7, "guidance": {"image": 3.0, "audio": 2.0, "video": 1.5},
                "condition_words": list(od.CONDITION_WORDS)}  # fmt: skip
    meta = {"omni": {"config": dataclasses.asdict(model.config), "sampling": sampling,
                     "media_vocab": {"text_vocab": vocab.text_vocab, "codebooks": [list(c) for c in vocab.codebooks]}}}  # fmt: skip
    save(model.decoder, folder, tokenizer=od.make_tokenizer(), meta=meta, extra=extra)


def open_image_spans(model: OmniModel) -> None:
    """Tilt the untrained model towards opening an image span (its begin marker's tied row moves along
    the mean final hidden state), so that greedy answers cross the span constraint: 49 codes, then end."""
    ids = torch.tensor(
        [[od.WORDS.index("<|user|>"), *od.words("what digit is this ?"), od.WORDS.index("<|assistant|>")]]
    )
    with torch.no_grad():
        d = model.decoder.hidden_states(ids)[0].mean(0)
        model.decoder.embed_tokens.weight[model.vocab.marker("image", "begin")] += 3 * d / d.norm() ** 2


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.set_num_threads(1)
    parts = tiny_parts()
    open_image_spans(parts[0])
    root = tmp_path_factory.mktemp("omni")
    verifier = CrossModalVerifier(VerifierConfig(dim=8, image_width=4, audio_width=8)).eval()
    save_folder(*parts, root / "model", verifier=verifier)
    steps = []
    manifest = export_omni(
        root / "model", root / "bundle", on_progress=lambda w, d, n: steps.append((w, d, n))
    )
    return root, manifest, parts, steps, verifier


@pytest.fixture(scope="module")
def runtime(exported):
    return OmniRuntime(exported[0] / "bundle", threads=1)


def _speech(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    return (0.3 * np.sin(2 * np.pi * (200 + 100 * seed) * t) + 0.05 * rng.standard_normal(len(t))).astype(
        np.float32
    )


def _mel(wave: np.ndarray, seconds: float) -> torch.Tensor:
    """What omni_data stores for training: padded or cut to `seconds`, log-mel, float16."""
    x = np.zeros(int(seconds * RATE), np.float32)
    x[: min(len(wave), len(x))] = wave[: len(x)]
    return torch.from_numpy(log_mel_batch([x], MelConfig(chunk_seconds=None))).half()


def test_manifest_records_layout_files_and_parity(exported):
    root, m, _, steps, _ = exported
    bundle = root / "bundle"
    assert steps[0][0] == "loading the model" and steps[-1] == ("done", 13, 13)
    assert [w for w, _, _ in steps[2:11]] == [f"exporting {g}" for g in m["graphs"]]
    assert {"verifier_image", "verifier_audio"} <= set(m["graphs"])
    assert m["verifier"]["word_ids"] == [od.WORDS.index(w) for w in od.DIGIT_WORDS]
    assert json.loads((bundle / MANIFEST).read_text()) == m
    on_disk = {p.relative_to(bundle).as_posix(): p.stat().st_size for p in bundle.rglob("*") if p.is_file()}
    assert {k: f["bytes"] for k, f in m["files"].items()} == {
        k: v for k, v in on_disk.items() if k != MANIFEST
    }
    assert m["bytes"] == sum(on_disk.values()) - on_disk[MANIFEST]
    assert {"decoder/model.onnx", "decoder/tokenizer.json", "media/media.json"} <= set(m["files"])
    p = m["parity"]
    assert max(p["graphs"].values()) <= 1e-3 and len(p["graphs"]) == 9
    assert p["decoder"]["greedy_tokens_agreeing"] == p["decoder"]["greedy_tokens_compared"]
    assert p["media_prefill"]["max_abs_logits_diff"] <= 1e-3 and p["media_prefill"]["greedy_next_agrees"]
    vocab = od.media_vocab()
    assert m["vocab"]["markers"]["video"]["pad"] == vocab.marker("video", "pad")
    assert m["vocab"]["codes"]["audio"] == [vocab.code_range("audio").start, vocab.code_range("audio").stop]
    assert m["special"]["end"] == od.WORDS.index("<|end|>")
    # the layout numbers no checkpoint records must be the training data's
    lay, d = m["layout"], OmniLayout()
    assert (lay["image"]["codes"], lay["audio"]["codes"], lay["video"]["codes"]) == (
        od.IMAGE_CODES, od.AUDIO_CODES, od.KEYFRAMES * od.VIDEO_GRID)  # fmt: skip
    assert (d.prompt_seconds, d.word_seconds, d.word_frames, d.clip_frames, d.clip_size, d.input_frames,
            d.keyframes, d.key_every) == (od.SEQ_SECONDS, od.WORD_SECONDS, od.WORD_FRAMES, od.CLIP_FRAMES,
                                          od.CLIP_SIZE, od.INPUT_FRAMES, od.KEYFRAMES, od.KEY_EVERY)  # fmt: skip
    assert lay["audio"]["stage_codes"] == od.AUDIO_STAGE and lay["audio"]["n_q"] == od.N_Q


@pytest.mark.parametrize("task", ["image_to_text", "speech_to_text", "video_to_text"])
def test_greedy_answers_match_pytorch(task, exported, runtime):
    model = exported[2][0]
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (1, 28, 28), dtype=np.uint8)
    clip = rng.integers(0, 256, (1, 9, od.CLIP_SIZE, od.CLIP_SIZE), dtype=np.uint8)
    speech, word = _speech(2.2, 1), _speech(1.3, 2)
    data = od.WorldData(
        images=image, image_labels=np.array([7]), image_codes=None,
        seq_mels=_mel(speech, od.SEQ_SECONDS), seq_digits=[(1, 2)],
        word_mels=_mel(word, od.WORD_SECONDS), word_labels=np.array([5]), tts_codes=None,
        tts_labels=np.zeros(0, np.int64), clips=clip, clip_labels=np.array([3]), clip_directions=np.array([1]),
        clip_words=np.array([0]), clip_codes=None,
    )  # fmt: skip
    batch = od.make_batch(task, data, np.array([0]), model.vocab, rng, model.n_image_tokens, train=False)
    media = {"image_to_text": {"image": image[0]}, "speech_to_text": {"audio": speech},
             "video_to_text": {"video": (clip[0], word)}}[task]  # fmt: skip
    prompt = od.PROMPTS[task][0]
    ids, _ = runtime.prompt_ids(prompt, **media)
    assert ids == batch.ids[0, : batch.prompt_len].tolist()
    want = generate(model, batch, 60)[0]
    assert model.vocab.marker("image", "begin") in want  # the answer crosses a whole image span
    assert runtime.answer_ids(prompt, max_new_tokens=60, **media) == want
    assert runtime.answer(prompt, max_new_tokens=60, **media) == runtime.tokenizer.decode([i for i in want if i < len(od.WORDS)],
                                                                       skip_special_tokens=True)  # fmt: skip


def test_generated_media_decode_like_pytorch(exported, runtime):
    model, tok, codec, interp = exported[2]
    vocab = model.vocab
    images = runtime.generate_media("draw a seven", "image", n_candidates=2, seed=5)
    assert [(x.shape, x.dtype) for x in images] == [((28, 28), np.uint8)] * 2
    again = runtime.generate_media("draw a seven", "image", n_candidates=2, seed=5)
    assert all(np.array_equal(a, b) for a, b in zip(images, again, strict=True))  # the seed decides
    speech = runtime.generate_media("say one two", "audio", seed=1)[0]
    assert speech.dtype == np.float32 and 1 <= len(speech) <= 3 and speech.shape[1] == od.WORD_FRAMES * 320
    clips = runtime.generate_media("show a seven moving left", "video", seed=2, temperature=0.0)
    assert clips[0].shape == (9, od.CLIP_SIZE, od.CLIP_SIZE) and clips[0].dtype == np.uint8
    # the spans the sampler writes hold exactly their codes, and decode as the PyTorch tokenizers do
    logits = runtime._prefill(runtime.prompt_ids("draw a seven")[0], None)
    ids = runtime._decode(logits, 400, 1.0, np.random.default_rng(0), only="video")
    assert (
        ids[0] == vocab.marker("video", "begin")
        and ids[-1] == vocab.marker("video", "end")
        and len(ids) == od.KEYFRAMES * od.VIDEO_GRID + 2
    )
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 1000, (od.IMAGE_CODES,), generator=g)
    with torch.no_grad():
        want = tok.decode(codes.view(1, 7, 7))[0, 0].numpy()
    assert np.abs(runtime.decode_image(codes.numpy()).astype(int) - np.round(want * 255)).max() <= 1
    keys = torch.randint(0, 1000, (od.KEYFRAMES * od.VIDEO_GRID,), generator=g)
    tok40 = at_size(tok, od.CLIP_SIZE)
    want = decode_clips(tok40, fill_between(tok40, interp, keys.view(1, 3, 10, 10), od.KEY_EVERY))[0, :, 0]
    np.testing.assert_allclose(runtime.video_frames(keys.numpy()), want, atol=1e-3, rtol=0)
    words = torch.randint(0, 2000, (2, od.AUDIO_CODES), generator=g)
    want = od.audio_waves(codec, words).numpy()
    np.testing.assert_allclose(runtime.decode_speech(words.numpy()), want, atol=1e-3, rtol=0)


def test_guided_generation_matches_pytorch(exported, runtime):
    """Classifier-free guidance in the runtime (a twin engine on the unconditional prompt) picks the ids
    omni_eval.generate picks with the same scale; the bundle carries the scale and temperature it was
    trained for, and the condition words as ids."""
    model = exported[2][0]
    m = exported[1]
    assert m["sampling"]["condition_ids"] == [od.WORDS.index(w) for w in od.CONDITION_WORDS]
    assert runtime.sampling == {"temperature": 0.7, "guidance": {"image": 3.0, "audio": 2.0, "video": 1.5}}
    data = od.WorldData(
        images=np.zeros((1, 28, 28), np.uint8), image_labels=np.array([7]), image_codes=None,
        seq_mels=torch.zeros(1, 80, 300), seq_digits=[(1, 2)], word_mels=torch.zeros(1, 80, 100),
        word_labels=np.array([1]), tts_codes=None, tts_labels=np.zeros(0, np.int64),
        clips=np.zeros((1, 9, od.CLIP_SIZE, od.CLIP_SIZE), np.uint8), clip_labels=np.array([7]), clip_directions=np.array([0]),
        clip_words=np.array([0]), clip_codes=None,
    )  # fmt: skip
    rng = np.random.default_rng(0)
    batch = od.make_batch(
        "text_to_image", data, np.array([0]), model.vocab, rng, model.n_image_tokens, train=False
    )
    prompt = runtime.prompt_ids("draw a seven")[0]
    want = {}
    for g in (1.0, 3.0, 50.0):
        want[g] = generate(model, batch, 60, guidance=g)[0]
        for _ in range(2):  # the twin's cache is rolled back with the engine's: the same answer again
            logits, guide = runtime._prefill_guided(prompt, g)
            assert runtime._decode(logits, 60, guide=guide) == want[g]
    assert want[1.0] != want[50.0]  # the unconditional twin moved the picks
    image = runtime.generate_media(
        "draw a seven", "image", n_candidates=2, seed=1, rerank=False
    )  # the bundle's 3.0 for images, at 0.7
    assert [x.shape for x in image] == [(28, 28)] * 2
    logits, guide = runtime._prefill_guided(prompt, 3.0)  # the image's own scale, not the audio's or video's
    rng = np.random.default_rng(1)
    for got in image:
        ids = runtime._decode(logits, runtime.lengths["image"] + 3, 0.7, rng, "image", guide)
        assert np.array_equal(runtime.decode_image(runtime.spans(ids, "image")[0]), got)
    with pytest.raises(EngineError, match="guidance must be in"):
        runtime.generate_media("draw a seven", "image", guidance=0.0)


def test_the_verifier_scores_and_reranks_as_in_pytorch(exported, runtime):
    """The bundle's verifier graphs score candidates as omni_media.verifier does, against the digit words
    of the prompt, and generate_media returns its candidates best first."""
    from omni_media.image import digit_windows

    verifier = exported[4]
    rng = np.random.default_rng(0)
    images = list(rng.integers(0, 256, (3, 28, 28), dtype=np.uint8))
    want = verifier.image_logits(np.stack(images))[:, 7].numpy()
    np.testing.assert_allclose(runtime.verify("draw a seven", "image", images), want, atol=1e-4)
    clips = list(rng.integers(0, 256, (2, 9, od.CLIP_SIZE, od.CLIP_SIZE), dtype=np.uint8))
    want = [float(verifier.image_logits(digit_windows(c))[:, 3].mean()) for c in clips]
    np.testing.assert_allclose(runtime.verify("show a three moving up", "video", clips), want, atol=1e-4)
    n = od.WORD_FRAMES * 320
    speech = [0.1 * rng.standard_normal((2, n)).astype(np.float32), np.zeros((1, n), np.float32)]
    logits = verifier.audio_logits(list(speech[0])).numpy()
    got = runtime.verify("say one two", "audio", speech)
    assert (
        got[0] == pytest.approx(logits[0, 1] + logits[1, 2], abs=1e-3) and got[1] == -np.inf
    )  # one word of two
    assert runtime.verify("show me a picture", "image", images) is None  # no digit asked: nothing to score
    drawn = runtime.generate_media("draw a seven", "image", n_candidates=4, seed=5, rerank=False)
    ranked = runtime.generate_media("draw a seven", "image", n_candidates=4, seed=5)
    order = np.argsort(-runtime.verify("draw a seven", "image", drawn), kind="stable")
    assert all(np.array_equal(a, drawn[i]) for a, i in zip(ranked, order, strict=True))


def test_runtime_process_never_imports_torch(exported, tmp_path):
    bundle = exported[0] / "bundle"
    code = (
        "import sys\n"
        "sys.modules['torch'] = None  # any import of torch now fails\n"
        "import numpy as np\n"
        "from omni_runtime.omni import OmniRuntime, write_wav\n"
        f"rt = OmniRuntime({str(bundle)!r}, threads=1)\n"
        "a = rt.answer('what digit is this?', image=np.zeros((56, 40, 3), np.uint8))\n"
        "b = rt.answer('transcribe the audio', audio=np.zeros(8000, np.float32))\n"
        "c = rt.answer('what is said?', video=(np.zeros((9, 40, 40), np.uint8), None))\n"
        "w = rt.generate_media('say one', 'audio', temperature=0.5)[0]\n"
        f"write_wav({str(tmp_path / 'x.wav')!r}, w.reshape(-1))\n"
        "v = rt.generate_media('show a one moving up', 'video', n_candidates=2)[0]\n"  # reranked, torch-free
        "assert rt.verify('say one', 'audio', [w]) is not None\n"
        "print(type(a).__name__, type(b).__name__, type(c).__name__, v.shape)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["str", "str", "str", "(9,", "40,", "40)"]


def test_refuses_altered_bundles_and_bad_inputs(exported, runtime, tmp_path):
    copy = shutil.copytree(exported[0] / "bundle", tmp_path / "b")
    data = bytearray((copy / "media" / "audio_decoder.onnx").read_bytes())
    data[-10] ^= 0xFF
    (copy / "media" / "audio_decoder.onnx").write_bytes(bytes(data))
    with pytest.raises(EngineError, match=r"audio_decoder\.onnx: sha256 differs"):
        OmniRuntime(copy)
    m = json.loads((copy / MANIFEST).read_text())
    m["files"]["../outside.onnx"] = {"sha256": "0" * 64, "bytes": 1}
    (copy / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(EngineError, match="not a plain path inside the bundle"):
        OmniRuntime(copy)
    with pytest.raises(EngineError, match=r"no omni-bundle\.json"):
        OmniRuntime(tmp_path)
    m = json.loads((exported[0] / "bundle" / MANIFEST).read_text())
    for sampling, message in [
        ({"guidance": -1}, "guidance in"),
        ({"guidance": {"image": 2.0, "smell": 2.0}}, "one per modality"),
        ({"guidance": {"image": 0}}, "guidance in"),
        ({"condition_ids": [10**6]}, "word ids below"),
    ]:
        (copy / MANIFEST).write_text(json.dumps(m | {"sampling": m["sampling"] | sampling}))
        with pytest.raises(EngineError, match=message):
            OmniRuntime(copy)
    shutil.copy(exported[0] / "bundle" / "media" / "audio_decoder.onnx", copy / "media")  # whole again
    for verifier, message in [
        ({"word_ids": [10**6]}, "word_ids must be word ids below"),
        ({"word_ids": [5, 5]}, "repeat a word"),
        ({"image": "../x"}, "must name its image and audio graphs"),
        ({"audio": "nope"}, "are not in its media"),
    ]:
        (copy / MANIFEST).write_text(json.dumps(m | {"verifier": m["verifier"] | verifier}))
        with pytest.raises(EngineError, match=message):
            OmniRuntime(copy)
    bad = [
        (lambda: runtime.answer("paint a seven please"), "not in the model's vocabulary: paint, please"),
        (lambda: runtime.answer("what is said?", audio=np.zeros(4 * RATE, np.float32)), "at most 3 s"),
        (lambda: runtime.answer("what?", image=np.zeros((28, 28), np.float32)), "expected uint8"),
        (lambda: runtime.answer("what?", image=tmp_path / "none.png"), "not a readable image"),
        (lambda: runtime.answer("what?", audio=tmp_path / "none.wav"), "not a readable PCM WAV"),
        (lambda: runtime.answer("what?", video=tmp_path / "none.mp4"), "no such file"),
        (lambda: runtime.answer("<|end|> draw"), "may not hold"),
        (lambda: runtime.generate_media("draw a one", "smell"), "modality must be one of"),
        (lambda: runtime.generate_media("draw a one", "image", n_candidates=0), "n_candidates"),
    ]  # fmt: skip
    for call, message in bad:
        with pytest.raises(EngineError, match=message) as e:
            call()
        assert "\n" not in str(e.value)
    # an image of another size and colour is read as 28 x 28 grey
    assert isinstance(runtime.answer("what digit is this?", image=np.zeros((64, 48, 3), np.uint8)), str)


def test_export_refuses_bad_folders(exported, tmp_path):
    root = exported[0]
    with pytest.raises(ExportError, match=r"no omnicoder\.json"):
        export_omni(tmp_path, tmp_path / "out")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("not ours")
    with pytest.raises(ExportError, match="not an omni bundle"):
        export_omni(root / "model", tmp_path / "mine")
    assert (tmp_path / "mine" / "keep.txt").read_text() == "not ours"
    with pytest.raises(ExportError, match="weights 'int3'"):
        export_omni(root / "model", tmp_path / "out", weights="int3")
