"""Judging the any-to-any model on held-out digit-world data, with judges that never saw its output.

Understanding (greedy answers): image -> text (digit), speech -> text (word accuracy over spoken
sequences, position by position), video -> text (digit and direction; the word in the sound track
is reported separately). Generation (sampled): text -> image read by an MNIST classifier, text ->
speech read word by word by a spoken-digit classifier, text -> video read frame by frame by
`omni_media.world.read_clip`. Generation is scored with one sample per request and with the best of
`n_candidates` by the cross-modal verifier when one is given.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from omni_model.multimodal import MediaConstraint
from omni_train.omni import OmniModel
from omni_train.omni_data import (
    AUDIO_CODES,
    CLIP_FRAMES,
    CLIP_SIZE,
    IMAGE_CODES,
    KEY_EVERY,
    KEYFRAMES,
    VIDEO_GRID,
    WORDS,
    Batch,
    WorldData,
    audio_waves,
    make_batch,
    unconditioned,
)  # fmt: skip


@dataclass
class Judges:
    image: torch.nn.Module  # omni_media.digits.DigitClassifier on MNIST
    speech: torch.nn.Module  # omni_media.speech.DigitClassifier on spoken words


@dataclass
class MediaDecoders:
    image_tokenizer: Any  # omni_media.image_tokenizer.ImageTokenizer (28 px)
    codec: Any  # omni_media.codec.AudioCodec
    interpolator: Any  # omni_media.interpolate.KeyframeInterpolator


@torch.no_grad()
def generate(model: OmniModel, batch: Batch, max_new: int, temperature: float = 0.0, top_k: int = 0,
             generator: torch.Generator | None = None, guidance: float = 1.0) -> list[list[int]]:  # fmt: skip
    """Continue each row's prompt (`batch.ids[:, :prompt_len]`, the same length in every row) until
    <|end|> or `max_new` ids, under a MediaConstraint (spans hold exactly their codes).

    `guidance` != 1 is classifier-free guidance (Ho & Salimans 2022, as autoregressive image models
    use it): each row also runs with its condition words dropped (`omni_data.unconditioned`) and the
    next-id logits are u + guidance * (c - u)."""
    vocab, end = model.vocab, WORDS.index("<|end|>")
    ids = batch.ids[:, : batch.prompt_len]
    lengths = {"image": IMAGE_CODES, "audio": AUDIO_CODES, "video": KEYFRAMES * VIDEO_GRID}
    constraint = MediaConstraint(vocab, lengths)
    outside = constraint.allowed([])  # what may follow outside a span
    keep = outside.clone()  # ... less the prompt's own markers, and everything a span may hold
    keep[[WORDS.index("<|pad|>"), WORDS.index("<|user|>"), WORDS.index("<|assistant|>")]] = False
    keep |= ~outside
    dec, guided = model.decoder, guidance != 1.0
    media = batch.media
    if guided:
        ids = torch.cat([ids, unconditioned(ids)])
        media = {m: torch.cat([x, x]) for m, x in media.items()}
    cache = dec.make_cache(batch_size=len(ids))

    def mix(logits: Tensor) -> Tensor:
        if not guided:
            return logits
        c, u = logits.chunk(2)
        return u + guidance * (c - u)

    logits = mix(
        dec.logits(dec.hidden_states(ids, cache, embeds=model.embed(ids, media)), last_only=True)[:, 0]
    )
    rows = [[] for _ in range(len(logits))]
    done = torch.zeros(len(rows), dtype=torch.bool)
    for _ in range(max_new):
        masks = torch.stack([constraint.allowed(r) & keep for r in rows])
        x = logits.masked_fill(~masks, float("-inf"))
        if temperature > 0:
            x = x / temperature
            if top_k:
                kth = x.topk(top_k, dim=-1).values[:, -1:]
                x = x.masked_fill(x < kth, float("-inf"))
            nxt = torch.multinomial(torch.softmax(x, dim=-1), 1, generator=generator)[:, 0]
        else:
            nxt = x.argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, end), nxt)
        for r, t, d in zip(rows, nxt.tolist(), done.tolist(), strict=True):
            if not d:
                r.append(t)
        done |= nxt == end
        if bool(done.all()):
            break
        step = nxt.repeat(2) if guided else nxt
        logits = mix(dec.logits(dec.hidden_states(step.view(-1, 1), cache), last_only=True)[:, 0])
    return [r[:-1] if r and r[-1] == end else r for r in rows]


def _text(ids: list[int]) -> str:
    return " ".join(WORDS[i] for i in ids if i < len(WORDS))


def _spans(model: OmniModel, ids: list[int], modality: str) -> list[Tensor]:
    """The code spans of `modality` in generated ids, as codebook indices."""
    vocab, out, cur = model.vocab, [], None
    begin, finish = vocab.marker(modality, "begin"), vocab.marker(modality, "end")
    for t in ids:
        if t == begin:
            cur = []
        elif t == finish and cur is not None:
            out.append(vocab.ids_to_codes(modality, torch.tensor(cur, dtype=torch.long)))
            cur = None
        elif cur is not None:
            cur.append(t)
    return out


def _batches(task: str, data: WorldData, model: OmniModel, n: int, batch_size: int, seed: int,
             key: Callable[[int], Any] | None = None) -> list[Batch]:  # fmt: skip
    """Evaluation batches over the first n examples, grouped so that prompts have one length."""
    rng = np.random.default_rng(seed)
    rows = np.arange(n)
    groups: dict[Any, list[int]] = {}
    for i in rows:
        groups.setdefault(key(int(i)) if key else 0, []).append(int(i))
    out = []
    for g in groups.values():
        for s in range(0, len(g), batch_size):
            out.append(make_batch(task, data, np.array(g[s : s + batch_size]), model.vocab, rng,
                                  model.n_image_tokens, train=False))  # fmt: skip
    return out


@torch.no_grad()
def understanding(
    model: OmniModel, data: WorldData, n: dict[str, int], batch_size: int = 64
) -> dict[str, float]:
    out: dict[str, float] = {}
    right = total = 0
    for b in _batches("image_to_text", data, model, n["image_to_text"], batch_size, 0):
        for got, want in zip(generate(model, b, 4), b.answers, strict=True):
            right += _text(got) == want
            total += 1
    out["image_to_text"] = right / total
    words_right = words_total = exact = total = 0
    for b in _batches("speech_to_text", data, model, n["speech_to_text"], batch_size, 0):
        for got, want in zip(generate(model, b, 8), b.answers, strict=True):
            g, w = _text(got).split(), want.split()
            words_right += sum(x == y for x, y in zip(g, w, strict=False))
            words_total += max(len(w), len(g))
            exact += g == w
            total += 1
    out["speech_to_text_words"] = words_right / words_total
    out["speech_to_text_exact"] = exact / total
    both = digit = direction = said = total = 0
    for b in _batches("video_to_text", data, model, n["video_to_text"], batch_size, 0):
        for got, want in zip(generate(model, b, 10), b.answers, strict=True):
            g, w = _text(got).split(), want.split()
            d_ok, dir_ok = g[:1] == w[:1], g[2:3] == w[2:3]
            digit += d_ok
            direction += dir_ok
            both += d_ok and dir_ok
            said += g[-1:] == w[-1:]
            total += 1
    out.update(
        video_to_text=both / total,
        video_to_text_digit=digit / total,
        video_to_text_direction=direction / total,
        video_to_text_spoken_word=said / total,
    )
    return out


def _best(scores: Tensor, k: int) -> Tensor:
    """(N * k,) scores of k candidates per request -> (N,) index of each request's best candidate."""
    return scores.view(-1, k).argmax(-1) + torch.arange(0, len(scores), k)


@torch.no_grad()
def generation(model: OmniModel, data: WorldData, decoders: MediaDecoders, judges: Judges, n: dict[str, int],
               verifier: Any | None = None, n_candidates: int = 4, temperature: float = 1.0, top_k: int = 0,
               guidance: float | dict[str, float] = 1.0, batch_size: int = 32,
               seed: int = 0) -> dict[str, float]:  # fmt: skip
    """Generation figures (sampled at `temperature`, `top_k`, classifier-free `guidance`: one scale, or
    one per output modality); with a verifier, also the best of n_candidates samples per request."""
    from omni_media.keyframes import at_size

    g = torch.Generator().manual_seed(seed)
    k = n_candidates if verifier is not None else 1
    out: dict[str, float] = {}

    def sample(task: str, count: int, max_new: int, key=None) -> list[tuple[Any, list[list[int]]]]:
        res = []
        for b in _batches(task, data, model, count, max(1, batch_size // k), seed, key):
            rep = Batch(b.task, b.ids.repeat_interleave(k, 0), b.targets, b.media, b.prompt_len)
            scale = guidance[task.removeprefix("text_to_").replace("speech", "audio")] if isinstance(
                guidance, dict) else guidance  # fmt: skip
            gen = generate(model, rep, max_new, temperature, top_k, g, scale)
            res += [(a, gen[i * k : (i + 1) * k]) for i, a in enumerate(b.answers)]
        return res

    # text -> image
    asked, images = [], []
    for d, cands in sample("text_to_image", n["text_to_image"], IMAGE_CODES + 3):
        for c in cands:
            s = _spans(model, c, "image")
            codes = s[0] if s and len(s[0]) == IMAGE_CODES else torch.zeros(IMAGE_CODES, dtype=torch.long)
            images.append(decoders.image_tokenizer.decode(codes.view(1, 7, 7))[0])
        asked.append(d)
    x = torch.stack(images)  # (N * k, 1, 28, 28)
    read = judges.image(x).argmax(-1)
    want = torch.tensor(asked).repeat_interleave(k)
    out["text_to_image"] = float((read[::k] == want[::k]).float().mean())
    if verifier is not None:
        pick = _best(verifier.image_scores(x, want), k)
        out["text_to_image_reranked"] = float((read[pick] == want[::k]).float().mean())
    # text -> speech: one span per word; each span judged as a word
    right = right_best = total = 0
    for ds, cands in sample("text_to_speech", n["text_to_speech"], 3 * (AUDIO_CODES + 2) + 1,
                            key=lambda i: len(data.seq_digits[i])):  # fmt: skip
        waves = [_speech(model, decoders.codec, c, len(ds)) for c in cands]
        scores = [_words_right(judges.speech, w, ds) for w in waves]
        right += scores[0]
        total += len(ds)
        if verifier is not None:
            fits = [float(verifier.audio_scores(list(w), torch.tensor(ds)).sum()) if len(w) == len(ds) else -1e9
                    for w in waves]  # fmt: skip
            right_best += scores[int(np.argmax(fits))]
    out["text_to_speech"] = right / total
    if verifier is not None:
        out["text_to_speech_reranked"] = right_best / total
    # text -> video: keyframes, interpolated, judged frame by frame; the verifier scores the digit in
    # each frame (it cannot see motion)
    frame_tok = at_size(decoders.image_tokenizer, CLIP_SIZE)
    frames = CLIP_FRAMES
    right = {"one": [0, 0], "best": [0, 0]}  # frames right, clips right in every frame
    for (d, direction), cands in sample("text_to_video", n["text_to_video"], KEYFRAMES * VIDEO_GRID + 3):
        clips = [_clip(model, frame_tok, decoders.interpolator, c) for c in cands]
        judged = [_judge_clip(judges.image, c, d, direction, frames) for c in clips]
        picks = {"one": 0}
        if verifier is not None:
            fits = [-1e9 if c is None else float(verifier.image_scores(_crops(c), torch.full((frames,), d)).mean())
                    for c in clips]  # fmt: skip
            picks["best"] = int(np.argmax(fits))
        for name, i in picks.items():
            right[name][0] += int(judged[i].sum())
            right[name][1] += bool(judged[i].all())
    out["text_to_video"] = right["one"][0] / (frames * n["text_to_video"])
    out["text_to_video_clips"] = right["one"][1] / n["text_to_video"]
    if verifier is not None:
        out["text_to_video_reranked"] = right["best"][0] / (frames * n["text_to_video"])
    return out


def _clip(model: OmniModel, tokenizer: Any, interpolator: Any, ids: list[int]) -> np.ndarray | None:
    """(T, S, S) float frames of the first whole video span of generated ids; None without one."""
    from omni_media.keyframes import decode_clips, fill_between

    s = [x for x in _spans(model, ids, "video") if len(x) == KEYFRAMES * VIDEO_GRID]
    if not s:
        return None
    grid = int(VIDEO_GRID**0.5)
    keys = s[0].view(1, KEYFRAMES, grid, grid)
    return decode_clips(tokenizer, fill_between(tokenizer, interpolator, keys, KEY_EVERY))[0, :, 0]


def _judge_clip(
    judge: torch.nn.Module, clip: np.ndarray | None, digit: int, direction: int, frames: int
) -> np.ndarray:
    """(frames,) bool: the frame shows the digit asked, in a clip moving the way asked."""
    from omni_media.world import read_clip

    if clip is None:
        return np.zeros(frames, bool)
    digits, moved = read_clip(judge, clip)
    return (digits == digit) & (moved == direction)


def _crops(clip: np.ndarray) -> Tensor:
    """(T, 1, 28, 28) the digit window of each frame, as the judge and the verifier read digits."""
    from omni_media.world import locate

    u8 = np.clip(np.rint(clip * 255), 0, 255).astype(np.uint8)
    corners = locate(u8)
    return (
        torch.from_numpy(np.stack([clip[t, y : y + 28, x : x + 28] for t, (y, x) in enumerate(corners)]))
        .float()
        .unsqueeze(1)
    )


def _speech(model: OmniModel, codec: Any, ids: list[int], n_words: int) -> np.ndarray:
    """(words, samples) waveforms of the first `n_words` complete audio spans of generated ids."""
    spans = [s for s in _spans(model, ids, "audio") if len(s) == AUDIO_CODES][:n_words]
    return audio_waves(codec, torch.stack(spans)).numpy() if spans else np.zeros((0, 1), np.float32)


def _words_right(judge: torch.nn.Module, waves: np.ndarray, digits: tuple[int, ...]) -> int:
    from omni_media.speech import predict_digits

    got = predict_digits(judge, list(waves)) if len(waves) else []
    return sum(int(a == b) for a, b in zip(got, digits, strict=False))
