"""`export_omni(model_folder, out)`: an any-to-any digit-world model (press-play train omni) as one ONNX bundle.

The bundle holds the decoder (`decoder/`, export_onnx with a `media_embeds` input for the three
placeholder ids), the media graphs (`media/`, export_media: the image, clip and speech encoders that
fill the placeholders, the image tokenizer's decoder at 28 px and at the 40 px video canvas, the codec's
decoder, the keyframe interpolator on the 10 x 10 grid, and the cross-modal verifier's image and
audio towers when the folder has one, for reranking candidates on device) and `omni-bundle.json`: the token layout,
the span lengths, every file's sha256, the parity of every graph against PyTorch and a multimodal
prefill (ONNX encoders feeding the ONNX decoder against the PyTorch model). omni_runtime.omni runs it
without torch. The layout numbers that no checkpoint file records (prompt seconds, frames per spoken
word, keyframe spacing) are `OmniLayout`'s, the digit world's (omni_train.omni_data).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from omni_export.errors import ExportError
from omni_export.export import ExportConfig, export_onnx
from omni_export.media import (
    MediaGraph,
    clip_input_graph,
    codec_graphs,
    export_media,
    image_input_graph,
    image_tokenizer_graphs,
    interpolator_graph,
    speech_input_graph,
    verifier_graphs,
)
from omni_model.files import file_sha256, read_json, writing_dir

FORMAT = "omnicoder-omni-bundle"
VERSION = 1
MANIFEST = "omni-bundle.json"
DECODER, MEDIA = "decoder", "media"
MODALITIES = ("image", "audio", "video")  # omni_model.multimodal.MODALITIES: the marker order
MARKERS = ("begin", "end", "pad")
SPECIALS = ("pad", "unk", "user", "assistant", "end")  # <|pad|> ... the word tokenizer's specials
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class OmniLayout:
    """How the digit world lays media into sequences (omni_train.omni_data), beyond what the checkpoint
    files say: a runtime has to cut, pad and split exactly as training did."""

    image_size: int = 28  # image inputs and outputs, grey
    prompt_seconds: int = 3  # speech inputs are padded or cut to this
    word_seconds: int = 1  # a clip's sound track: one spoken word
    word_frames: int = 32  # codec frames per spoken word in an audio output span
    max_words: int = 3  # the most spoken words (audio spans) in one training answer
    clip_frames: int = 9
    clip_size: int = 40
    input_frames: tuple[int, ...] = (0, 4, 8)  # the frames the clip encoder reads
    keyframes: int = 3  # a video output span: these frames' image-tokenizer grids
    key_every: int = 4  # frames from one keyframe to the next; the ones between are interpolated
    fps: float = 8.0  # what a written clip plays at (the 9 frames in about the second its word takes)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            ok = all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v) if f.name == "input_frames" \
                else isinstance(v, int | float) and not isinstance(v, bool) and v > 0  # fmt: skip
            if not ok:
                raise ExportError(f"OmniLayout.{f.name} must be positive, got {v!r}")
        if (self.keyframes - 1) * self.key_every + 1 != self.clip_frames or max(
            self.input_frames
        ) >= self.clip_frames:
            raise ExportError("OmniLayout: keyframes and input_frames must fit clip_frames")


def _recorded_layout(folder: Path) -> OmniLayout:
    """The layout the training run recorded in meta.omni.layout (checked like any other), else the
    digit world's defaults (folders written before it was recorded)."""
    recorded = read_json(folder / "omnicoder.json", ExportError).get("meta", {}).get("omni", {}).get("layout")
    if recorded is None:
        return OmniLayout()
    try:
        if "input_frames" in recorded:
            recorded = {**recorded, "input_frames": tuple(recorded["input_frames"])}
        return OmniLayout(**recorded)
    except TypeError as e:
        raise ExportError(f"{folder}/omnicoder.json: meta.omni.layout: {e}") from None


@dataclass
class _Model:
    decoder: Any  # omni_model LoadedModel
    encoders: dict[str, torch.nn.Module]  # image / video / audio, as omni_train.omni.OmniModel has them
    image_tokenizer: Any
    codec: Any
    interpolator: Any
    vocab: dict[str, Any]  # the manifest's vocab section
    sampling: dict[str, Any] | None = None  # the manifest's sampling section (meta.omni.sampling, as ids)
    verifier: Any | None = None  # omni_media.verifier.CrossModalVerifier, when the folder has one


def _vocab(text_vocab: int, codebooks: list[tuple[str, int]]) -> dict[str, Any]:
    """omni_model.multimodal.MediaVocab's layout as JSON: marker ids and each modality's code range."""
    markers = {
        m: {w: text_vocab + i * len(MARKERS) + j for j, w in enumerate(MARKERS)}
        for i, m in enumerate(MODALITIES)
    }
    start, codes = text_vocab + len(MODALITIES) * len(MARKERS), {}
    for m, n in codebooks:
        codes[m] = [start, start + n]
        start += n
    return {"text_vocab": text_vocab, "size": start, "markers": markers, "codes": codes}


def _load(folder: Path) -> _Model:
    from safetensors.torch import load_file

    import omni_model
    from omni_media.codec import load_codec
    from omni_media.encoders import ClipEncoder, ImageEncoder, SpeechEncoder
    from omni_media.errors import MediaError
    from omni_media.image_tokenizer import load_image_tokenizer
    from omni_media.interpolate import load_interpolator
    from omni_media.verifier import load_verifier

    manifest = read_json(folder / "omnicoder.json", ExportError)
    try:
        omni = manifest["meta"]["omni"]
        cfg, mv = omni["config"], omni["media_vocab"]
        dim, width, grid, speech = (
            int(cfg[k]) for k in ("dim", "encoder_width", "image_grid", "speech_width")
        )
        vocab = _vocab(int(mv["text_vocab"]), [(str(m), int(n)) for m, n in mv["codebooks"]])
    except (KeyError, TypeError, ValueError) as e:
        raise ExportError(
            f"{folder}: not an omni model folder (omnicoder.json meta.omni lacks {e})"
        ) from None
    if sorted(vocab["codes"]) != sorted(MODALITIES):
        raise ExportError(
            f"{folder}: the vocabulary needs image, audio and video codes, has {sorted(vocab['codes'])}"
        )
    encoders = {"image": ImageEncoder(dim, width, grid), "video": ClipEncoder(dim, width, grid),
                "audio": SpeechEncoder(dim, speech)}  # fmt: skip
    try:
        state = load_file(str(folder / "encoders.safetensors"))
        for m, enc in encoders.items():
            part = {k.removeprefix(f"{m}."): v for k, v in state.items() if k.startswith(f"{m}.")}
            enc.load_state_dict(part, strict=True)
            enc.eval()
        model = _Model(omni_model.load(folder, fuse=False), encoders,
                       load_image_tokenizer(folder / "image_tokenizer.safetensors"),
                       load_codec(folder / "codec.safetensors"),
                       load_interpolator(folder / "interpolator.safetensors"), vocab)  # fmt: skip
        if (folder / "verifier.safetensors").is_file():  # optional: without it, no reranking on device
            model.verifier = load_verifier(folder / "verifier.safetensors")
    except (OSError, RuntimeError, MediaError) as e:  # safetensors and load_state_dict raise these
        raise ExportError(
            f"{folder}: cannot load its media parts: {' '.join(str(e).split())[:300]}"
        ) from None
    if missing := [w for w in SPECIALS if model.decoder.tokenizer.token_to_id(f"<|{w}|>") is None]:
        raise ExportError(f"{folder}: the tokenizer lacks the special tokens {missing}")
    model.sampling = _sampling(omni.get("sampling"), model.decoder.tokenizer, folder)
    if model.decoder.config.vocab_size != vocab["size"]:
        raise ExportError(f"{folder}: the decoder has {model.decoder.config.vocab_size} ids, its media vocabulary "
                          f"{vocab['size']}")  # fmt: skip
    return model


def _sampling(s: Any, tokenizer: Any, folder: Path) -> dict[str, Any] | None:
    """meta.omni.sampling (what the model's figures were sampled with) for the runtime: its condition
    words, which classifier-free guidance drops from a prompt, as token ids. Guidance is one scale per
    output modality (a single number: the same for all)."""
    if s is None:
        return None
    try:
        t, g, words = float(s["temperature"]), s["guidance"], list(s["condition_words"])
        g = (
            {m: float(g[m]) for m in MODALITIES}
            if isinstance(g, dict)
            else dict.fromkeys(MODALITIES, float(g))
        )
        ids = [tokenizer.token_to_id(str(w)) for w in words]
    except (KeyError, TypeError, ValueError) as e:
        raise ExportError(f"{folder}/omnicoder.json: meta.omni.sampling: {e}") from None
    if None in ids:
        raise ExportError(f"{folder}: meta.omni.sampling names words the tokenizer lacks: "
                          f"{[w for w, i in zip(words, ids, strict=True) if i is None][:5]}")  # fmt: skip
    return {"temperature": t, "guidance": g, "condition_ids": ids}


def _layout(m: _Model, layout: OmniLayout) -> dict[str, Any]:
    """The spans and sizes the runtime reproduces, checked against the tokenizers that decode them."""
    tok, codec = m.image_tokenizer, m.codec
    image_grid = tok.config.image_size // tok.config.downsample
    if tok.config.image_size != layout.image_size or tok.config.channels != 1:
        raise ExportError(f"the image tokenizer is for {tok.config.channels} x {tok.config.image_size} px, the "
                          f"layout {layout.image_size} px grey")  # fmt: skip
    if layout.clip_size % tok.config.downsample:
        raise ExportError(
            f"clip_size {layout.clip_size} is not a multiple of the tokenizer's {tok.config.downsample}"
        )
    vocab = m.vocab["codes"]
    sizes = {"image": tok.vocab_size, "video": tok.vocab_size, "audio": codec.vocab_size * codec.config.n_q}
    for mod, n in sizes.items():
        if vocab[mod][1] - vocab[mod][0] != n:
            raise ExportError(
                f"{mod}: {vocab[mod][1] - vocab[mod][0]} codes in the vocabulary, the tokenizer has {n}"
            )
    if m.interpolator.config.channels != tok.fsq.dim:
        raise ExportError(f"the interpolator works on {m.interpolator.config.channels} channels, the codes have "
                          f"{tok.fsq.dim}")  # fmt: skip
    frame_grid = layout.clip_size // tok.config.downsample
    rate = codec.config.sample_rate
    return {
        "image": {"size": layout.image_size, "input_tokens": m.encoders["image"].n_tokens,
                  "codes": image_grid**2, "grid": [image_grid, image_grid]},
        "audio": {"sample_rate": rate, "prompt_seconds": layout.prompt_seconds, "word_seconds": layout.word_seconds,
                  "n_q": codec.config.n_q, "stage_codes": codec.vocab_size, "frames_per_word": layout.word_frames,
                  "codes": layout.word_frames * codec.config.n_q, "samples_per_word": layout.word_frames * codec.config.stride,
                  "max_words": layout.max_words},
        "video": {"frames": layout.clip_frames, "size": layout.clip_size, "input_frames": list(layout.input_frames),
                  "keyframes": layout.keyframes, "key_every": layout.key_every, "grid": [frame_grid, frame_grid],
                  "codes": layout.keyframes * frame_grid**2, "fsq_levels": list(tok.fsq.levels), "fps": layout.fps},
    }  # fmt: skip


def _graphs(m: _Model, layout: OmniLayout) -> list[MediaGraph]:
    from omni_media.keyframes import at_size

    frame_tok = at_size(m.image_tokenizer, layout.clip_size)
    image_dec = image_tokenizer_graphs(m.image_tokenizer)[1]
    frame_dec = dataclasses.replace(image_tokenizer_graphs(frame_tok)[1], name="frame_decoder")
    grid = frame_tok.grid
    return [
        image_input_graph(m.encoders["image"], layout.image_size),
        clip_input_graph(m.encoders["video"], len(layout.input_frames), layout.clip_size),
        speech_input_graph(m.encoders["audio"], layout.prompt_seconds * 100),
        image_dec,
        frame_dec,
        codec_graphs(
            m.codec, seconds=layout.word_frames * m.codec.config.stride / m.codec.config.sample_rate
        )[1],
        interpolator_graph(m.interpolator, grid),
        *(verifier_graphs(m.verifier) if m.verifier is not None else []),
    ]


def _verifier(m: _Model) -> dict[str, Any] | None:
    """The manifest's verifier section: its graphs, and the word id of each of its rows (the digit
    words), so the runtime can score a candidate against the words its prompt asks for."""
    from omni_media.speech import DIGITS

    if m.verifier is None:
        return None
    n = m.verifier.config.n_words
    ids = [m.decoder.tokenizer.token_to_id(w) for w in DIGITS[:n]]
    if n > len(DIGITS) or None in ids:
        raise ExportError(
            f"the verifier scores {n} words; the tokenizer must hold the digit words zero..nine"
        )
    return {"image": "verifier_image", "audio": "verifier_audio", "word_ids": ids}


def _parity_text(tokenizer: Any) -> str:
    """Every word of the model's vocabulary, three times over: the decoder's text parity prompt."""
    words = [
        w for i in range(tokenizer.vocab_size) if (w := tokenizer.id_to_token(i)) and not w.startswith("<|")
    ]
    return " ".join(words * 3)


@torch.inference_mode()
def _media_prefill(m: _Model, layout: dict[str, Any], bundle: Path, threads: int) -> dict[str, Any]:
    """One prompt with every kind of input (an image, a clip and its sound track, a spoken prompt): the
    ONNX encoders feed the ONNX decoder, against the PyTorch encoders and decoder. Logits of every
    position; the greedy next token."""
    import onnxruntime as ort

    from omni_media.audio import MelConfig, log_mel_batch

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3

    def session(path: Path) -> ort.InferenceSession:
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])

    rng = np.random.default_rng(0)
    rate = layout["audio"]["sample_rate"]
    t = np.arange(rate * layout["audio"]["prompt_seconds"]) / rate
    speech = (0.3 * np.sin(2 * np.pi * 300 * t) + 0.05 * rng.standard_normal(len(t))).astype(np.float32)
    word = speech[: rate * layout["audio"]["word_seconds"]]
    front = MelConfig(chunk_seconds=None)
    size, clip = layout["image"]["size"], layout["video"]["size"]
    inputs = {  # modality -> [(graph, example input)] in sequence order
        "image": [("image_input", rng.random((1, 1, size, size), dtype=np.float32))],
        "video": [("video_input", rng.random((1, len(layout["video"]["input_frames"]), 1, clip, clip), dtype=np.float32))],
        "audio": [("audio_input", log_mel_batch([word], front)), ("audio_input", log_mel_batch([speech], front))],
    }  # fmt: skip
    markers = m.vocab["markers"]
    tok = m.decoder.tokenizer
    ids = [tok.token_to_id("<|user|>")]
    rows, ort_feats, torch_feats, encoder_err = [], [], [], 0.0
    for mod in ("image", "video", "audio"):
        for graph, x in inputs[mod]:
            enc = session(bundle / MEDIA / f"{graph}.onnx")
            got = enc.run(None, {enc.get_inputs()[0].name: x})[0][0]  # (n, D)
            want = m.encoders[mod](torch.from_numpy(x))[0].numpy()
            encoder_err = max(encoder_err, float(np.abs(got - want).max()))
            ids.append(markers[mod]["begin"])
            rows += list(range(len(ids), len(ids) + len(got)))
            ids += [markers[mod]["pad"]] * len(got)
            ids.append(markers[mod]["end"])
            ort_feats.append(got)
            torch_feats.append(want)
    ids += [*tok.encode("what is said ?"), tok.token_to_id("<|assistant|>")]
    ids_np = np.array([ids], np.int64)
    dim = m.decoder.config.dim
    media = np.zeros((1, len(ids), dim), np.float32)
    media[0, rows] = np.concatenate(ort_feats)
    dec = session(bundle / DECODER / "model.onnx")
    names = {i.name: i for i in dec.get_inputs()}
    feeds = {"input_ids": ids_np, "attention_mask": np.ones_like(ids_np), "logits_to_keep": np.array(0, np.int64),
             "media_embeds": media}  # fmt: skip
    for name, i in names.items():
        if name.startswith("past_key_values."):
            feeds[name] = np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32)
    got = dec.run(["logits"], feeds)[0][0]
    ids_t = torch.from_numpy(ids_np)
    x = m.decoder.model.embed_tokens(ids_t).clone()
    x[0, rows] = torch.from_numpy(np.concatenate(torch_feats))
    want = m.decoder.model.logits(m.decoder.model.hidden_states(ids_t, embeds=x))[0].numpy()
    return {"prompt_tokens": len(ids), "media_positions": len(rows),
            "max_abs_features_diff": encoder_err, "max_abs_logits_diff": float(np.abs(got - want).max()),
            "greedy_next_agrees": bool(got[-1].argmax() == want[-1].argmax()),
            "reference": "omni_media encoders + omni_model decoder, PyTorch float32"}  # fmt: skip


def export_omni(model_folder: str | Path, out_folder: str | Path, weights: str = "float32",
                on_progress: Progress | None = None, layout: OmniLayout | None = None,
                tol: float = 1e-3, threads: int = 2) -> dict[str, Any]:  # fmt: skip
    """Export a `press-play train omni` folder to the bundle folder `out_folder` (replaced atomically when
    it is a bundle) and return its manifest. Every graph must match PyTorch within `tol`."""
    folder, out = Path(model_folder), Path(out_folder)
    if not (folder / "omnicoder.json").is_file():
        raise ExportError(f"{folder}: not a model folder (no omnicoder.json)")
    layout = layout or _recorded_layout(folder)
    report = on_progress or (lambda what, done, total: None)
    if weights not in ("float32", "float16", "int8", "int4"):
        raise ExportError(f"weights {weights!r}: the decoder exports as float32, float16, int8 or int4")
    if out.exists() and not (out / MANIFEST).is_file():  # say so before the export, not after
        raise ExportError(f"{out}: exists and is not an omni bundle (no {MANIFEST}); not overwriting it")
    total = 4 + 7 + 2 * (folder / "verifier.safetensors").is_file()  # stages, as _graphs counts them
    report("loading the model", 0, total)
    m = _load(folder)
    spans = _layout(m, layout)
    graphs = _graphs(m, layout)
    verifier = _verifier(m)
    t0 = time.perf_counter()
    with writing_dir(out, marker=MANIFEST, what="an omni bundle", error=ExportError) as tmp:
        report(f"exporting the decoder ({weights} weights)", 1, total)
        placeholders = tuple(m.vocab["markers"][mod]["pad"] for mod in MODALITIES)
        config = ExportConfig(weights=weights, media_placeholders=placeholders,  # type: ignore[arg-type]
                              max_seq_len=m.decoder.config.max_seq_len)  # fmt: skip
        decoder = export_onnx(folder, tmp / DECODER, config, parity_text=_parity_text(m.decoder.tokenizer))
        done = [1]

        def step(what: str) -> None:
            done[0] += 1
            report(what, done[0], total)

        media = export_media(graphs, tmp / MEDIA, tol=tol, on_progress=step)
        step("measuring a multimodal prefill against PyTorch")
        prefill = _media_prefill(m, spans, tmp, threads)
        # Quantized decoder weights differ from PyTorch's float ones by design: recorded, not gated.
        if weights == "float32" and not (
            prefill["max_abs_logits_diff"] <= tol and prefill["greedy_next_agrees"]
        ):
            raise ExportError(f"the multimodal prefill differs from PyTorch by {prefill['max_abs_logits_diff']:.3g} "
                              f"(> {tol:g}) or picks another next token")  # fmt: skip
        step("writing the manifest")
        files = {
            p.relative_to(tmp).as_posix(): {"sha256": file_sha256(p), "bytes": p.stat().st_size}
            for p in sorted(tmp.rglob("*"))
            if p.is_file()
        }
        manifest = {
            "format": FORMAT, "version": VERSION, "source": str(folder),
            "decoder": DECODER, "media": MEDIA, "weights": weights,
            "vocab": m.vocab,
            "special": {w: m.decoder.tokenizer.token_to_id(f"<|{w}|>") for w in SPECIALS},
            "layout": spans,
            **({"sampling": m.sampling} if m.sampling is not None else {}),
            **({"verifier": verifier} if verifier is not None else {}),
            "graphs": {g: {"file": f"{MEDIA}/{e['file']}", "parameters": e["parameters"],
                           "parity_max_abs": e["parity_max_abs"]} for g, e in media["graphs"].items()},
            "parity": {"decoder": decoder["parity"], "media_prefill": prefill,
                       "graphs": {g: e["parity_max_abs"] for g, e in media["graphs"].items()}},
            "files": files,
            "bytes": sum(f["bytes"] for f in files.values()),
            "export_seconds": round(time.perf_counter() - t0, 1),
        }  # fmt: skip
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    report("done", total, total)
    return manifest
