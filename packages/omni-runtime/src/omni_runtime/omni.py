"""An omni bundle (omni_export.omni) in ONNX Runtime: image, speech and video in; text, images, speech and video out.

`OmniRuntime(bundle)` checks `omni-bundle.json` (untrusted: fields, file names, every file's sha256)
and opens the decoder with `OrtEngine` and the media graphs with `MediaRuntime`. Inputs are laid out as
omni_train.omni_data lays them (`<|user|> media... prompt <|assistant|>`), the encoders' features go in
through `media_embeds`, and decoding follows omni_train.omni_eval.generate, its span constraint in numpy:
an output span holds exactly its modality's codes and then ends. The outputs are decoded by the bundle's
graphs (image tokenizer, codec, keyframe interpolator with the FSQ grid in numpy). torch is never
imported; MP4 clips are read with PyAV, images with Pillow, WAV with omni_media.audio.
"""

from __future__ import annotations

import wave
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from omni_media.audio import MelConfig, log_mel_batch, read_wav
from omni_media.errors import MediaError
from omni_model.files import file_sha256, read_json, writing_file
from omni_runtime.engine import EngineError
from omni_runtime.media import MediaRuntime
from omni_runtime.ort_engine import OrtEngine

FORMAT = "omnicoder-omni-bundle"
MANIFEST = "omni-bundle.json"
MODALITIES = ("image", "audio", "video")  # omni_model.multimodal's order
MARKERS = ("begin", "end", "pad")
Modality = Literal["image", "audio", "video"]
ImageInput = str | Path | np.ndarray | Any  # a file, a uint8 array (H, W) or (H, W, C), or a PIL image
AudioInput = str | Path | np.ndarray  # a WAV file or 16 kHz mono float samples
VideoInput = str | Path | np.ndarray | tuple  # an MP4, uint8 frames (T, H, W[, 3]), or (frames, samples)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:200] or type(e).__name__


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def read_bundle_manifest(folder: Path) -> dict[str, Any]:
    """`omni-bundle.json`, checked for what the runtime reads; files named in it must be plain paths inside."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise EngineError(f"{folder}: no such folder")
    if not path.is_file():
        raise EngineError(
            f"{folder}: no {MANIFEST} (not an omni bundle; see press-play export --format omni)"
        )
    m = read_json(path, EngineError)
    if not isinstance(m, dict) or m.get("format") != FORMAT or m.get("version") != 1:
        raise EngineError(f"{path}: not an omni bundle manifest (format {FORMAT!r}, version 1)")
    try:
        for key in ("decoder", "media"):
            if not isinstance(m[key], str) or not m[key].isidentifier():
                raise EngineError(f"{path}: {key} must be a folder name, got {m[key]!r}")
        v = m["vocab"]
        ids = [v["text_vocab"], v["size"], *m["special"].values()]
        ids += [v["markers"][mod][w] for mod in MODALITIES for w in MARKERS]
        ids += [x for mod in MODALITIES for x in v["codes"][mod]]
        if not all(_int(x) and x <= v["size"] for x in ids):
            raise EngineError(f"{path}: vocab and special ids must be integers within the vocabulary")
        lay = m["layout"]
        sizes = [lay["image"][k] for k in ("size", "codes")] + [
            lay["video"][k] for k in ("frames", "size", "keyframes", "key_every", "codes")
        ]
        sizes += [lay["audio"][k] for k in ("sample_rate", "prompt_seconds", "word_seconds", "n_q", "stage_codes", "codes", "max_words")]  # fmt: skip
        sizes += [
            *lay["image"]["grid"],
            *lay["video"]["grid"],
            *(x + 1 for x in lay["video"]["input_frames"]),
        ]
        levels = lay["video"]["fsq_levels"]
        if not all(_int(x) and x > 0 for x in sizes) or not all(_int(x) and x >= 2 for x in levels):
            raise EngineError(f"{path}: layout sizes must be positive integers (FSQ levels at least 2)")
        _check_sampling(m.get("sampling"), v["text_vocab"], path)
        _check_verifier(m.get("verifier"), v["text_vocab"], path)
        files = m["files"]
        if not isinstance(files, dict) or not files:
            raise EngineError(f"{path}: files must be a non-empty object")
        for name, f in files.items():
            parts = name.split("/")
            if name.startswith("/") or "\\" in name or any(p in ("", ".", "..") for p in parts):
                raise EngineError(f"{path}: files.{name} is not a plain path inside the bundle")
            if not isinstance(f, dict) or not isinstance(f.get("sha256"), str):
                raise EngineError(f"{path}: files.{name} lacks its sha256")
    except (KeyError, TypeError, AttributeError) as e:
        raise EngineError(f"{path}: lacks the field {e}") from None
    return m


def _check_sampling(s: Any, text_vocab: int, path: Path) -> None:
    """The optional `sampling` section: the temperature and guidance the bundle's figures were measured
    at, and the word ids guidance drops from a prompt."""
    if s is None:
        return
    if not isinstance(s, dict):
        raise EngineError(f"{path}: sampling must be an object")
    t, g, cond = s.get("temperature", 1.0), s.get("guidance", 1.0), s.get("condition_ids", [])
    scales = list(g.values()) if isinstance(g, dict) and set(g) <= set(MODALITIES) else [g]
    if not (_number(t) and t >= 0) or not all(_number(x) and 0 < x <= 100 for x in scales):
        raise EngineError(f"{path}: sampling temperature must be >= 0 and guidance in (0, 100] "
                          f"(one number, or one per modality of {', '.join(MODALITIES)})")  # fmt: skip
    if not isinstance(cond, list) or not all(_int(x) and 0 <= x < text_vocab for x in cond):
        raise EngineError(f"{path}: sampling.condition_ids must be word ids below {text_vocab}")


def _check_verifier(v: Any, text_vocab: int, path: Path) -> None:
    """The optional `verifier` section: its two graphs and the word id of each of its rows."""
    if v is None:
        return
    if not isinstance(v, dict) or not all(
        isinstance(v.get(k), str) and v[k].isidentifier() for k in ("image", "audio")
    ):
        raise EngineError(f"{path}: verifier must name its image and audio graphs")
    ids = v.get("word_ids")
    if not isinstance(ids, list) or not ids or not all(_int(x) and x < text_vocab for x in ids):
        raise EngineError(f"{path}: verifier.word_ids must be word ids below {text_vocab}")
    if len(set(ids)) != len(ids):
        raise EngineError(f"{path}: verifier.word_ids repeat a word")


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and np.isfinite(v)


class OmniRuntime:
    """The any-to-any model of a bundle: `answer` (text out) and `generate_media` (image, speech, video out)."""

    def __init__(self, bundle: str | Path, threads: int = 2):
        from omni_model.tokenizer import Tokenizer

        self.folder = Path(bundle)
        self.manifest = m = read_bundle_manifest(self.folder)
        for name, f in m["files"].items():  # all of them before any is opened
            p = self.folder / name
            if not p.is_file():
                raise EngineError(f"{p}: no such file (named by {MANIFEST})")
            if file_sha256(p) != f["sha256"]:
                raise EngineError(f"{p}: sha256 differs from {MANIFEST}'s (altered or incomplete)")
        # Guidance alternates two sessions step by step: neither may keep its idle threads spinning.
        self.engine = OrtEngine(self.folder / m["decoder"], threads=threads, spin=False)
        self.threads, self._twin = threads, None  # the unconditional twin guidance runs beside the engine
        s = m.get("sampling") or {}
        g = s.get("guidance", 1.0)
        self.sampling = {  # guidance: a scale per output modality
            "temperature": float(s.get("temperature", 1.0)),
            "guidance": {k: float(g.get(k, 1.0) if isinstance(g, dict) else g) for k in MODALITIES},
        }
        self._condition = frozenset(s.get("condition_ids", []))
        self.media = MediaRuntime(self.folder / m["media"], threads=threads)
        self.verifier = m.get("verifier")  # None: candidates come back in the order they were drawn
        if self.verifier is not None:
            if missing := {self.verifier["image"], self.verifier["audio"]} - set(self.media.names):
                raise EngineError(
                    f"{self.folder}: the verifier's graphs {sorted(missing)} are not in its media"
                )
            self._verifier_rows = {w: row for row, w in enumerate(self.verifier["word_ids"])}
            n = self.media.meta(self.verifier["audio"]).get("clip_samples")
            if not (_int(n) and 0 < n <= 60 * m["layout"]["audio"]["sample_rate"]):
                raise EngineError(
                    f"{self.folder}: the verifier's clip_samples must be a positive count, got {n!r}"
                )
            self._verifier_samples = n
        self.tokenizer = Tokenizer.from_hf_folder(self.folder / m["decoder"])
        v, s, lay = m["vocab"], m["special"], m["layout"]
        self.text_vocab, self.markers, self.special, self.layout = v["text_vocab"], v["markers"], s, lay
        self.codes = {mod: range(*v["codes"][mod]) for mod in MODALITIES}
        self.lengths = {mod: lay[mod]["codes"] for mod in MODALITIES}
        if self.engine.vocab_size != v["size"]:
            raise EngineError(
                f"{self.folder}: the decoder has {self.engine.vocab_size} ids, the bundle {v['size']}"
            )
        # Outside a span: anything but placeholders, end markers, codes and the prompt's own markers
        # (omni_eval.generate's `keep`); inside: the modality's codes, then its end marker.
        free = np.zeros(v["size"], np.float32)
        free[v["text_vocab"] + len(MODALITIES) * len(MARKERS) :] = -np.inf
        for mod in MODALITIES:
            free[[self.markers[mod]["end"], self.markers[mod]["pad"]]] = -np.inf
        free[[s["pad"], s["user"], s["assistant"]]] = -np.inf
        self._outside = free
        self._inside, self._closing = {}, {}
        for mod in MODALITIES:
            inside = np.full(v["size"], -np.inf, np.float32)
            inside[self.codes[mod].start : self.codes[mod].stop] = 0
            closing = np.full(v["size"], -np.inf, np.float32)
            closing[self.markers[mod]["end"]] = 0
            self._inside[mod], self._closing[mod] = inside, closing
        levels = np.array(lay["video"]["fsq_levels"], np.int64)
        self._levels, self._half = levels, levels // 2
        self._radix = np.concatenate([[1], np.cumprod(levels[:-1])]).astype(np.int64)

    # ------------------------------------------------------------------------------------------------ inputs

    def encode_image(self, image: ImageInput) -> np.ndarray:
        """(n, D) features of one image, read as 28 x 28 grey (other sizes and colour are converted)."""
        size = self.layout["image"]["size"]
        x = _grey(image, size, "image")[None, None].astype(np.float32) / 255  # (1, 1, S, S)
        return self.media.run("image_input", x)[0][0]

    def encode_audio(self, audio: AudioInput, seconds: int | None = None, cut: bool = False) -> np.ndarray:
        """(n, D) features of 16 kHz speech padded to `seconds` (the prompt length by default); longer
        speech is refused, or cut with `cut` (a clip's sound track)."""
        a = self.layout["audio"]
        rate, seconds = a["sample_rate"], seconds or a["prompt_seconds"]
        w = _samples(audio, rate)
        if len(w) > seconds * rate and not cut:
            raise EngineError(
                f"audio is {len(w) / rate:.2f} s; this model hears at most {seconds} s of speech"
            )
        x = np.zeros(seconds * rate, np.float32)
        x[: min(len(w), len(x))] = w[: len(x)]
        # float16 and back: the features training read were stored so (omni_train.omni_data.WorldData)
        mel = log_mel_batch([x], MelConfig(chunk_seconds=None)).astype(np.float16).astype(np.float32)
        return self.media.run("audio_input", mel)[0][0]

    def encode_video(self, video: VideoInput) -> tuple[np.ndarray, np.ndarray]:
        """(n, D) features of a clip's frames and (m, D) of its sound track (its first word's second;
        silence when it has none). Frames are read as the layout's size (40 x 40), grey; the encoder sees
        frames 0, 4 and 8 of 9 (in general: the same fractions of the clip)."""
        lay = self.layout["video"]
        if isinstance(video, tuple):
            if len(video) != 2:
                raise EngineError("video: expected (frames, samples)")
            frames, audio = video
        elif isinstance(video, str | Path):
            frames, audio = read_clip(video, self.layout["audio"]["sample_rate"])
        else:
            frames, audio = video, None
        frames = np.asarray(frames)
        if frames.dtype != np.uint8 or frames.ndim not in (3, 4) or not len(frames):
            raise EngineError(
                f"video: frames must be uint8 (T, H, W) or (T, H, W, 3), got {frames.dtype} {frames.shape}"
            )
        t = len(frames)
        pick = [round(i * (t - 1) / (lay["frames"] - 1)) for i in lay["input_frames"]]
        x = (
            np.stack([_grey(frames[i], lay["size"], f"video frame {i}") for i in pick]).astype(np.float32)
            / 255
        )
        feats = self.media.run("video_input", x[None, :, None])[0][0]  # (1, T', 1, S, S) -> (n, D)
        word = self.layout["audio"]["word_seconds"]
        sound = np.zeros(1, np.float32) if audio is None or not len(audio) else audio
        return feats, self.encode_audio(sound, word, cut=True)

    def prompt_ids(self, prompt: str, image: ImageInput | None = None, audio: AudioInput | None = None,
                   video: VideoInput | None = None) -> tuple[list[int], np.ndarray | None]:  # fmt: skip
        """`<|user|> [image] [video, its sound] [speech] prompt <|assistant|>` as ids, and the (T, D) rows
        of `media_embeds` (None without media). The prompt is lower-cased; words outside the model's
        vocabulary are refused."""
        text = self._words(prompt)
        parts: list[tuple[str, np.ndarray]] = []
        if image is not None:
            parts.append(("image", self.encode_image(image)))
        if video is not None:
            frames, sound = self.encode_video(video)
            parts += [("video", frames), ("audio", sound)]
        if audio is not None:
            parts.append(("audio", self.encode_audio(audio)))
        ids, rows = [self.special["user"]], []
        for mod, f in parts:
            ids.append(self.markers[mod]["begin"])
            rows.append((len(ids), f))
            ids += [self.markers[mod]["pad"]] * len(f)
            ids.append(self.markers[mod]["end"])
        ids += [*text, self.special["assistant"]]
        if not rows:
            return ids, None
        media = np.zeros((len(ids), self.engine.dim), np.float32)
        for start, f in rows:
            media[start : start + len(f)] = f
        return ids, media

    def _words(self, prompt: str) -> list[int]:
        if not isinstance(prompt, str):
            raise EngineError(f"the prompt must be text, got {type(prompt).__name__}")
        prompt = prompt.lower()
        ids = self.tokenizer.encode(prompt, add_special_tokens=False)
        if any(i >= self.text_vocab for i in ids) or set(ids) & {
            self.special[k] for k in self.special if k != "unk"
        }:
            raise EngineError("the prompt may not hold <|...|> markers; media go in as image, audio or video")
        if self.special["unk"] in ids:
            unknown = [
                w
                for w in prompt.split()
                if self.special["unk"] in self.tokenizer.encode(w, add_special_tokens=False)
            ]
            raise EngineError(f"not in the model's vocabulary: {', '.join(unknown[:5])} (it knows "
                              f"{self.text_vocab - len(self.special)} words)")  # fmt: skip
        return ids

    # ------------------------------------------------------------------------------------------------ decoding

    def _prefill(self, ids: list[int], media: np.ndarray | None) -> np.ndarray:
        """Empty the cache, run the prompt; the last position's (V,) logits."""
        if len(ids) + 1 > self.engine.max_seq_len:
            raise EngineError(f"the prompt has {len(ids)} tokens; the model holds {self.engine.max_seq_len}")
        self.engine.reset()
        return self.engine.forward(ids, last_only=True, media_embeds=media)[0]

    def _prefill_guided(
        self, ids: list[int], guidance: float
    ) -> tuple[np.ndarray, tuple[np.ndarray, float] | None]:
        """`_prefill`, and with guidance != 1 the unconditional twin of the prompt (its condition words
        replaced by <|unk|>) in a second engine: the last logits and `_decode`'s `guide`."""
        logits = self._prefill(ids, None)
        if guidance == 1:
            return logits, None
        if self._twin is None:
            self._twin = OrtEngine(self.folder / self.manifest["decoder"], threads=self.threads, spin=False)
        self._twin.reset()
        unk = self.special["unk"]
        return logits, (
            self._twin.forward([unk if i in self._condition else i for i in ids], last_only=True)[0],
            guidance,
        )

    def _decode(self, logits: np.ndarray, max_new: int, temperature: float = 0.0,
                rng: np.random.Generator | None = None, only: str | None = None,
                guide: tuple[np.ndarray, float] | None = None) -> list[int]:  # fmt: skip
        """Continue the prompt in the cache (`logits`: its last position's) until <|end|> or `max_new`
        ids, under the span constraint, as omni_eval.generate does; `only`: the answer is spans of that
        modality (the first id its begin marker; up to max_words spans of speech, one of the others).
        `guide`: (the unconditional prompt's last logits, in the twin engine's cache; the guidance scale),
        for classifier-free guidance: u + scale * (c - u). Caches are rolled back to the prompts afterwards."""
        n_prompt, end = self.engine.seq_len, self.special["end"]
        twin, n_twin = (self._twin, self._twin.seq_len) if guide is not None else (None, 0)  # type: ignore[union-attr]
        uncond = guide[0] if guide is not None else None
        max_new = min(max_new, self.engine.max_seq_len - n_prompt)
        begins = {self.markers[m]["begin"]: m for m in MODALITIES}
        ends = {self.markers[m]["end"] for m in MODALITIES}
        spans_left = 0
        if only is not None:
            first = np.full_like(self._outside, -np.inf)
            first[self.markers[only]["begin"]] = 0
            between = first.copy()
            between[end] = 0
            spans_left = self.layout["audio"]["max_words"] if only == "audio" else 1
        out: list[int] = []
        span, count = None, 0
        for _ in range(max_new):
            if span is not None:
                mask = self._inside[span] if count < self.lengths[span] else self._closing[span]
            elif only is not None:
                mask = between if out else first
            else:
                mask = self._outside
            x = (logits if guide is None else uncond + guide[1] * (logits - uncond)) + mask
            if temperature > 0:
                p = np.exp((x - x.max()) / temperature)
                t = int(rng.choice(len(p), p=p / p.sum()))  # type: ignore[union-attr]
            else:
                t = int(np.argmax(x))
            out.append(t)
            if span is None and t == end:
                break
            if span is None and t in begins:
                span, count = begins[t], 0
            elif t in ends:
                span, spans_left = None, spans_left - 1
                if only is not None and not spans_left:
                    break
            else:
                count += span is not None
            if len(out) < max_new:
                logits = self.engine.forward([t], last_only=True)[0]
                if twin is not None:
                    uncond = twin.forward([t], last_only=True)[0]
        self.engine.rollback(self.engine.seq_len - n_prompt)
        if twin is not None:
            twin.rollback(twin.seq_len - n_twin)
        return out[:-1] if out and out[-1] == end else out

    def answer_ids(self, prompt: str, image: ImageInput | None = None, audio: AudioInput | None = None,
                   video: VideoInput | None = None, max_new_tokens: int = 32) -> list[int]:  # fmt: skip
        """The greedy continuation's ids, <|end|> left off (what omni_train.omni_eval.generate returns)."""
        ids, media = self.prompt_ids(prompt, image, audio, video)
        return self._decode(self._prefill(ids, media), max_new_tokens)

    def answer(self, prompt: str, image: ImageInput | None = None, audio: AudioInput | None = None,
               video: VideoInput | None = None, max_new_tokens: int = 32) -> str:  # fmt: skip
        """The greedy text answer (any media spans the model writes are left out)."""
        ids = self.answer_ids(prompt, image, audio, video, max_new_tokens)
        return self.tokenizer.decode([i for i in ids if i < self.text_vocab], skip_special_tokens=True)

    def generate_media(self, prompt: str, modality: Modality, n_candidates: int = 1, seed: int = 0,
                       temperature: float | None = None, guidance: float | None = None,
                       rerank: bool = True) -> list[np.ndarray]:  # fmt: skip
        """`n_candidates` samples (temperature 0: greedy) of the asked modality, decoded: image (28, 28)
        uint8; audio (words, samples) float32 at 16 kHz, one row per spoken word; video (9, 40, 40) uint8
        (the layout's frames and size). Temperature and classifier-free guidance (1: none) default to the
        bundle's `sampling` (its guidance: one scale per modality), the ones its figures were measured
        at; guidance runs the prompt a second time with its condition words
        (the digits, directions and articles) replaced by <|unk|>, as the model was trained to read.
        With `rerank` and a bundle that has the verifier, the candidates come back best first by
        `verify`; otherwise in the order they were drawn."""
        temperature = self.sampling["temperature"] if temperature is None else temperature
        if modality not in MODALITIES:
            raise EngineError(f"modality must be one of {', '.join(MODALITIES)}, got {modality!r}")
        guidance = self.sampling["guidance"][modality] if guidance is None else guidance
        if not (_number(guidance) and 0 < guidance <= 100):
            raise EngineError(f"guidance must be in (0, 100], got {guidance!r}")
        if guidance != 1 and not self._condition:
            raise EngineError(f"{self.folder}: the bundle names no condition words, so it cannot be guided "
                              "(re-export it, or ask for guidance 1)")  # fmt: skip
        if isinstance(n_candidates, bool) or not isinstance(n_candidates, int) or n_candidates < 1:
            raise EngineError(f"n_candidates must be a positive integer, got {n_candidates!r}")
        if not (isinstance(temperature, int | float) and 0 <= temperature < float("inf")):
            raise EngineError(f"temperature must be >= 0, got {temperature!r}")
        ids, _ = self.prompt_ids(prompt)
        n_spans = self.layout["audio"]["max_words"] if modality == "audio" else 1
        max_new = n_spans * (self.lengths[modality] + 2) + 1
        rng = np.random.default_rng(seed)
        logits, guide = self._prefill_guided(ids, guidance)  # once: each candidate starts from these caches
        out = []
        for _ in range(n_candidates):
            got = self._decode(logits, max_new, temperature, rng, only=modality, guide=guide)
            spans = self.spans(got, modality)
            if modality == "image":
                out.append(self.decode_image(spans[0]))
            elif modality == "video":
                out.append(self.decode_video(spans[0]))
            else:
                out.append(self.decode_speech(np.stack(spans)))
        scores = self.verify(prompt, modality, out) if rerank and n_candidates > 1 else None
        if scores is not None:
            out = [out[i] for i in np.argsort(-scores, kind="stable")]
        return out

    def verify(self, prompt: str, modality: Modality, candidates: Sequence[np.ndarray]) -> np.ndarray | None:
        """(len(candidates),) the verifier's score of each decoded candidate (as `generate_media` returns
        them) against the digit words the prompt asks for; higher is a better match. An image scores
        its scaled cosine with the first digit word; speech, the sum over its words of each against the
        prompt's word in the same place (-inf when it says a different number of words); a clip, the
        mean over frames of its digit window's score (omni_media.image.digit_windows). None when the
        bundle has no verifier or the prompt names no digit."""
        from omni_media.image import digit_windows

        if self.verifier is None:
            return None
        if modality not in MODALITIES:
            raise EngineError(f"modality must be one of {', '.join(MODALITIES)}, got {modality!r}")
        rows = [self._verifier_rows[i] for i in self.prompt_ids(prompt)[0] if i in self._verifier_rows]
        if not rows or not len(candidates):
            return None

        def image_scores(pixels: np.ndarray) -> np.ndarray:  # (B, 28, 28) uint8 -> (B,)
            x = (pixels[:, None] / 255).astype(np.float32)
            return self.media.run(self.verifier["image"], x)[0][:, rows[0]]

        if modality == "image":
            return image_scores(np.stack(candidates))
        if modality == "video":
            return np.array(
                [image_scores(digit_windows(np.asarray(c))).mean() for c in candidates], np.float32
            )
        n, out = self._verifier_samples, []
        for words in candidates:  # (W, samples)
            if len(words) != len(rows):
                out.append(-np.inf)
                continue
            clips = np.zeros((len(words), n), np.float32)
            for i, w in enumerate(words):
                clips[i, : min(n, len(w))] = w[:n]
            logits = self.media.encode_audio(list(clips), self.verifier["audio"])  # its meta's front end
            out.append(float(logits[np.arange(len(rows)), rows].sum()))
        return np.array(out, np.float32)

    def spans(self, ids: Sequence[int], modality: str) -> list[np.ndarray]:
        """The complete `modality` spans of generated ids, as codebook indices."""
        begin, end, n = self.markers[modality]["begin"], self.markers[modality]["end"], self.lengths[modality]
        out, cur = [], None
        for t in ids:
            if t == begin:
                cur = []
            elif t == end and cur is not None:
                if len(cur) == n:
                    out.append(np.array(cur, np.int64) - self.codes[modality].start)
                cur = None
            elif cur is not None:
                cur.append(t)
        return out

    # ------------------------------------------------------------------------------------------------ media out

    def decode_image(self, codes: np.ndarray) -> np.ndarray:
        """(49,) image codes -> (28, 28) uint8."""
        g = self.layout["image"]["grid"]
        x = self.media.run("image_decoder", np.asarray(codes, np.int64).reshape(1, *g))[0]
        return _to_uint8(x[0, 0])

    def decode_speech(self, codes: np.ndarray) -> np.ndarray:
        """(words, 64) audio codes (frame-major, stages offset by the stage size) -> (words, samples) float32."""
        a = self.layout["audio"]
        c = (
            np.asarray(codes, np.int64).reshape(len(codes), -1, a["n_q"]).transpose(0, 2, 1)
        )  # (W, n_q, frames)
        c = np.clip(c - (np.arange(a["n_q"]) * a["stage_codes"])[None, :, None], 0, a["stage_codes"] - 1)
        return self.media.run("audio_decoder", c)[0].astype(np.float32)

    def video_frames(self, codes: np.ndarray) -> np.ndarray:
        """(keyframes * grid cells,) codes, 300 by default -> (9, 40, 40) float frames in [0, 1], the in-betweens interpolated as
        omni_media.keyframes.fill_between makes them."""
        v = self.layout["video"]
        keys = np.asarray(codes, np.int64).reshape(v["keyframes"], *v["grid"])  # (K, h, w)
        z = self._fsq_codes(keys).transpose(0, 3, 1, 2)  # (K, d, h, w)
        every = v["key_every"]
        pairs = [(i, j) for i in range(len(keys) - 1) for j in range(1, every)]
        t = np.array([j / every for _, j in pairs], np.float32)
        mid = self.media.run("interpolator", z[[i for i, _ in pairs]], z[[i + 1 for i, _ in pairs]], t)[0]
        between = self._fsq_nearest(mid.transpose(0, 2, 3, 1))  # (pairs, h, w)
        frames, k = [keys[0]], 0
        for i in range(len(keys) - 1):
            for _ in range(1, every):
                frames.append(between[k])
                k += 1
            frames.append(keys[i + 1])
        return self.media.run("frame_decoder", np.stack(frames))[0][:, 0]

    def decode_video(self, codes: np.ndarray) -> np.ndarray:
        """(keyframes * grid cells,) codes -> (frames, size, size) uint8 frames."""
        return _to_uint8(self.video_frames(codes))

    def _fsq_codes(self, tokens: np.ndarray) -> np.ndarray:
        """(...) tokens -> (..., d) FSQ grid values in [-1, 1] (omni_media.quantize.FSQ.codes)."""
        digits = (np.clip(tokens, 0, self._levels.prod() - 1)[..., None] // self._radix) % self._levels
        return (digits - self._half).astype(np.float32) / self._half.astype(np.float32)

    def _fsq_nearest(self, values: np.ndarray) -> np.ndarray:
        """(..., d) values -> (...) tokens of the nearest grid point (FSQ.nearest; float32 like torch)."""
        digits = (
            np.round(values.astype(np.float32) * self._half.astype(np.float32)).astype(np.int64) + self._half
        )
        return (np.clip(digits, 0, self._levels - 1) * self._radix).sum(-1)


# ---------------------------------------------------------------------------------------------------- files


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.round(np.clip(x, 0, 1) * 255).astype(np.uint8)


def _grey(image: Any, size: int, what: str) -> np.ndarray:
    """(size, size) uint8 grey of a file, PIL image or uint8 array, converted and resized with Pillow."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, str | Path):
        try:
            with Image.open(image) as f:
                img = f.convert("L")
        except (OSError, UnidentifiedImageError, ValueError) as e:
            raise EngineError(f"{image}: not a readable image: {_one_line(e)}") from None
    elif isinstance(image, Image.Image):
        img = image.convert("L")
    else:
        a = np.asarray(image)
        if (
            a.dtype != np.uint8
            or not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (1, 3, 4)))
            or not a.size
        ):
            raise EngineError(
                f"{what}: expected uint8 (H, W) or (H, W, 1|3|4) pixels, got {a.dtype} {a.shape}"
            )
        img = Image.fromarray(a[..., 0] if a.ndim == 3 and a.shape[2] == 1 else a).convert("L")
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(img, np.uint8)


def _samples(audio: AudioInput, rate: int) -> np.ndarray:
    if isinstance(audio, str | Path):
        try:
            return read_wav(audio, rate)
        except MediaError as e:
            raise EngineError(str(e)) from None
    w = np.asarray(audio)
    if w.ndim != 1 or not w.size or w.dtype.kind != "f" or not np.isfinite(w).all():
        raise EngineError(f"audio: expected finite float (samples,) at {rate} Hz, got {w.dtype} {w.shape}")
    return w.astype(np.float32)


def read_clip(path: str | Path, rate: int = 16000) -> tuple[np.ndarray, np.ndarray | None]:
    """A video file's frames as grey uint8 (T, H, W) and its sound as mono float32 at `rate` (None
    without a sound track), with PyAV. (omni_media.video.read_video does this too, but imports torch.)"""
    import av

    path = Path(path)
    if not path.is_file():
        raise EngineError(f"{path}: {'not a file' if path.exists() else 'no such file'}")
    frames, chunks, start, resampler = [], [], None, None
    try:
        with av.open(str(path), "r") as c:
            if not c.streams.video:
                raise EngineError(f"{path}: no video stream")
            streams = [c.streams.video[0], *c.streams.audio[:1]]
            if len(streams) > 1:
                resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
            for packet in c.demux(*streams):
                for frame in packet.decode():
                    if isinstance(frame, av.VideoFrame):
                        frames.append(frame.to_ndarray(format="gray"))
                    elif resampler is not None:
                        start = (frame.time or 0.0) if start is None else start
                        chunks += [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
            if resampler is not None:
                chunks += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]
    except EngineError:
        raise
    except (av.FFmpegError, OSError, ValueError, LookupError, EOFError, RuntimeError) as e:
        raise EngineError(f"{path}: not a readable video: {_one_line(e)}") from None
    if not frames:
        raise EngineError(f"{path}: the video stream has no decodable frames")
    audio = None
    if resampler is not None:
        x = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)
        shift = round((start or 0.0) * rate)  # index 0 is time 0, as omni_media.video places it
        audio = np.concatenate([np.zeros(shift, np.float32), x]) if shift > 0 else x[-shift:]
    return np.stack(frames), audio


def write_wav(path: str | Path, samples: np.ndarray, rate: int = 16000) -> Path:
    """Mono float samples as a 16-bit PCM WAV file, written to a temporary name and renamed."""
    path = Path(path)
    x = np.asarray(samples, np.float32).reshape(-1)
    pcm = (np.clip(x, -1, 1) * 32767).round().astype("<i2")
    try:
        with writing_file(path) as tmp, wave.open(str(tmp), "wb") as f:
            f.setnchannels(1)
            f.setsampwidth(2)
            f.setframerate(rate)
            f.writeframes(pcm.tobytes())
    except OSError as e:
        raise EngineError(f"{path}: cannot write: {_one_line(e)}") from None
    return path
