"""Interleaving text with images, audio and video: the token layout, the sequence format, the splice.

`MediaVocab` extends a text vocabulary V with three markers per modality (begin, end, and the
placeholder an encoder's features replace) and then the codes of each output tokenizer, in that order:

    [0, V) text | begin/end/pad of image, audio, video | image codes | audio codes | ...

A media span is `begin, x1 .. xn, end`. On input the x are placeholders whose embeddings `splice`
replaces with projected encoder features (LLaVA-style early fusion); on output they are codes the model
emits and the matching tokenizer decodes (Chameleon / AnyGPT-style discrete media tokens).
`extend_vocab` grows a decoder's embedding and head to the layout, keeping the text rows as they were
and starting new rows at the mean of the old ones (Hewitt 2021). `MediaConstraint` masks logits while
the model writes a span, so an image span holds exactly its grid of image codes and then ends.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from omni_model.decoder import Decoder
from omni_model.errors import ConfigError, OmniError
from omni_model.layers import Embedding, Linear

MODALITIES = ("image", "audio", "video")
Modality = Literal["image", "audio", "video"]
MARKERS = ("begin", "end", "pad")


class MediaSpanError(OmniError, ValueError):
    """A multimodal sequence whose media do not fit its spans (count, length or width)."""


@dataclass(frozen=True)
class MediaVocab:
    text_vocab: int  # ids below this belong to the text tokenizer
    codebooks: tuple[tuple[str, int], ...] = ()  # (modality, codebook size) of each output tokenizer

    def __post_init__(self) -> None:
        if isinstance(self.text_vocab, bool) or not isinstance(self.text_vocab, int) or self.text_vocab < 1:
            raise ConfigError(f"MediaVocab.text_vocab must be a positive integer, got {self.text_vocab!r}")
        seen = set()
        for m, n in self.codebooks:
            if m not in MODALITIES:
                raise ConfigError(f"MediaVocab.codebooks: unknown modality {m!r} (one of {MODALITIES})")
            if m in seen:
                raise ConfigError(f"MediaVocab.codebooks: {m} is listed twice")
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ConfigError(f"MediaVocab.codebooks: {m} needs a positive codebook size, got {n!r}")
            seen.add(m)

    @property
    def size(self) -> int:
        """The extended vocabulary's size."""
        return self.text_vocab + len(MODALITIES) * len(MARKERS) + sum(n for _, n in self.codebooks)

    def marker(self, modality: str, which: Literal["begin", "end", "pad"]) -> int:
        if modality not in MODALITIES:
            raise ConfigError(f"unknown modality {modality!r} (one of {MODALITIES})")
        return self.text_vocab + MODALITIES.index(modality) * len(MARKERS) + MARKERS.index(which)

    def code_range(self, modality: str) -> range:
        """The ids of `modality`'s codes; ConfigError if it has no output tokenizer."""
        start = self.text_vocab + len(MODALITIES) * len(MARKERS)
        for m, n in self.codebooks:
            if m == modality:
                return range(start, start + n)
            start += n
        raise ConfigError(
            f"no {modality} codebook in this vocabulary (it has {[m for m, _ in self.codebooks]})"
        )

    def codes_to_ids(self, modality: str, codes: Tensor) -> Tensor:
        r = self.code_range(modality)
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= len(r)):
            raise MediaSpanError(f"{modality} codes must be in [0, {len(r)}), got [{int(codes.min())}, "
                                 f"{int(codes.max())}]")  # fmt: skip
        return codes.long() + r.start

    def ids_to_codes(self, modality: str, ids: Tensor) -> Tensor:
        r = self.code_range(modality)
        if ids.numel() and (int(ids.min()) < r.start or int(ids.max()) >= r.stop):
            raise MediaSpanError(f"ids are not all {modality} codes (ids {r.start}..{r.stop - 1})")
        return ids.long() - r.start

    def names(self) -> dict[int, str]:
        """Printable names of the marker ids, e.g. {V: '<|image_begin|>'}: for tokenizers and logs."""
        return {self.marker(m, w): f"<|{m}_{w}|>" for m in MODALITIES for w in MARKERS}


@dataclass(frozen=True)
class MediaInput:
    """An encoder's output to read: `length` placeholder positions that `splice` fills."""

    modality: str
    length: int


@dataclass(frozen=True)
class MediaCodes:
    """Discrete media tokens (an image tokenizer's grid, flattened; an audio codec's frames)."""

    modality: str
    codes: Tensor  # (n,) int


@dataclass(frozen=True)
class Span:
    modality: str
    start: int  # first position inside the markers
    end: int  # one past the last
    kind: Literal["input", "codes"]


Part = Sequence[int] | Tensor | MediaInput | MediaCodes


def build_sequence(parts: Sequence[Part], vocab: MediaVocab) -> tuple[Tensor, list[Span]]:
    """Text ids and media, in order -> (T,) ids with each media part inside its markers, and the spans."""
    ids: list[int] = []
    spans: list[Span] = []
    for part in parts:
        if isinstance(part, MediaInput | MediaCodes):
            body = (
                [vocab.marker(part.modality, "pad")] * part.length
                if isinstance(part, MediaInput)
                else vocab.codes_to_ids(part.modality, part.codes.reshape(-1)).tolist()
            )
            if not body:
                raise MediaSpanError(f"an empty {part.modality} span")
            ids.append(vocab.marker(part.modality, "begin"))
            spans.append(Span(part.modality, len(ids), len(ids) + len(body),
                              "input" if isinstance(part, MediaInput) else "codes"))  # fmt: skip
            ids += body
            ids.append(vocab.marker(part.modality, "end"))
        else:
            text = [int(t) for t in (part.tolist() if isinstance(part, Tensor) else part)]
            if any(not 0 <= t < vocab.text_vocab for t in text):
                raise MediaSpanError(f"text ids must be in [0, {vocab.text_vocab})")
            ids += text
    return torch.tensor(ids, dtype=torch.long), spans


def find_spans(ids: Tensor, vocab: MediaVocab) -> list[Span]:
    """The media spans of a (T,) sequence, as `build_sequence` made them (e.g. after generation)."""
    spans, open_at, open_m = [], -1, ""
    for i, t in enumerate(ids.tolist()):
        for m in MODALITIES:
            if t == vocab.marker(m, "begin"):
                if open_at >= 0:
                    raise MediaSpanError(f"position {i}: a {m} span opens inside an open {open_m} span")
                open_at, open_m = i + 1, m
            elif t == vocab.marker(m, "end"):
                if m != open_m:
                    raise MediaSpanError(f"position {i}: {m} end without its begin")
                body = ids[open_at:i]
                kind = "input" if bool((body == vocab.marker(m, "pad")).all()) else "codes"
                spans.append(Span(m, open_at, i, kind))
                open_at, open_m = -1, ""
    if open_at >= 0:
        raise MediaSpanError(f"a {open_m} span opened at position {open_at - 1} is never closed")
    return spans


def media_outputs(
    ids: Tensor, vocab: MediaVocab, decoders: dict[str, Callable[[Tensor], Any]]
) -> list[tuple[str, Any]]:
    """Each output span of a (T,) sequence (e.g. a generated one) as (modality, decoders[modality](codes)):
    the codes of the span, in order, handed to the matching tokenizer's decoder (pixels, samples)."""
    out = []
    for s in find_spans(ids, vocab):
        if s.kind != "codes":
            continue
        if s.modality not in decoders:
            raise MediaSpanError(f"a {s.modality} span at {s.start}, and no {s.modality} decoder given")
        out.append((s.modality, decoders[s.modality](vocab.ids_to_codes(s.modality, ids[s.start : s.end]))))
    return out


def splice(model: Decoder, ids: Tensor, spans: Sequence[Span], features: Sequence[Tensor]) -> Tensor:
    """(T,) ids -> (T, D) input embeddings with each input span's placeholders replaced by its features."""
    x = model.embed_tokens(ids)
    inputs = [s for s in spans if s.kind == "input"]
    if len(inputs) != len(features):
        raise MediaSpanError(
            f"{len(inputs)} media inputs in the sequence, {len(features)} feature tensors given"
        )
    d = x.shape[-1]
    rows = []
    for s, f in zip(inputs, features, strict=True):
        if f.shape != (s.end - s.start, d):
            raise MediaSpanError(
                f"{s.modality} span at {s.start} has {s.end - s.start} positions of width {d}, "
                f"its features are {tuple(f.shape)}"
            )
        rows.append((s.start, s.end, f.to(x.dtype)))
    out = x.clone()
    for start, end, f in rows:
        out[start:end] = f
    return out


def extend_vocab(model: Decoder, vocab: MediaVocab, seed: int = 0) -> Decoder:
    """Grow the embedding and head of `model` (in place) to `vocab.size`; text rows are kept bit for bit."""
    cfg = model.config
    if vocab.text_vocab != cfg.vocab_size:
        raise ConfigError(f"MediaVocab.text_vocab ({vocab.text_vocab}) must equal the model's vocab_size "
                          f"({cfg.vocab_size})")  # fmt: skip
    new = vocab.size - cfg.vocab_size
    g = torch.Generator().manual_seed(seed)

    def grown(w: Tensor) -> Tensor:
        # Mean of the old rows plus noise of their spread / 100: a new token's logit starts near the
        # average one, so text sampling barely moves until the new rows are trained (Hewitt 2021).
        mean, std = w.float().mean(0), w.float().std(0)
        extra = mean + 0.01 * std * torch.randn(new, w.shape[1], generator=g)
        return torch.cat([w.detach(), extra.to(w.dtype)])

    emb = Embedding(
        vocab.size, cfg.dim, device=model.embed_tokens.weight.device, dtype=model.embed_tokens.weight.dtype
    )
    emb.weight = torch.nn.Parameter(grown(model.embed_tokens.weight))
    model.embed_tokens = emb
    head = Linear(cfg.dim, vocab.size, bias=False, device=emb.weight.device, dtype=emb.weight.dtype)
    head.weight = emb.weight if cfg.tie_embeddings else torch.nn.Parameter(grown(model.lm_head.weight))
    model.lm_head = head
    model.config = dataclasses.replace(cfg, vocab_size=vocab.size)
    return model


class MediaConstraint:
    """Which ids may come next: inside an output span of modality m, only m's codes until `lengths[m]`
    of them are written, then m's end marker; outside spans, anything but placeholders and codes."""

    def __init__(self, vocab: MediaVocab, lengths: dict[str, int]):
        for m, n in lengths.items():
            vocab.code_range(m)  # ConfigError for a modality without codes
            if n < 1:
                raise ConfigError(f"MediaConstraint: {m} spans need a positive length, got {n}")
        self.vocab, self.lengths = vocab, dict(lengths)
        self._free = torch.ones(vocab.size, dtype=torch.bool)
        for m in MODALITIES:
            self._free[vocab.marker(m, "pad")] = False
            self._free[vocab.marker(m, "end")] = False
            if m not in lengths:
                self._free[vocab.marker(m, "begin")] = False
        self._free[vocab.text_vocab + len(MODALITIES) * len(MARKERS) :] = False

    def allowed(self, ids: Sequence[int]) -> Tensor:
        """(V,) bool mask of the ids allowed after `ids` (the sequence so far)."""
        begins = {self.vocab.marker(m, "begin"): m for m in self.lengths}
        ends = {self.vocab.marker(m, "end") for m in MODALITIES}
        horizon = max(self.lengths.values(), default=0) + 1  # a span is never longer: look no further
        for back, t in enumerate(reversed(ids[-horizon:] if horizon else [])):
            if t in ends:
                break
            if t in begins:
                m = begins[t]
                mask = torch.zeros(self.vocab.size, dtype=torch.bool)
                if back < self.lengths[m]:
                    r = self.vocab.code_range(m)
                    mask[r.start : r.stop] = True
                else:
                    mask[self.vocab.marker(m, "end")] = True
                return mask
        return self._free

    def __call__(self, ids: Sequence[int], logits: Tensor) -> Tensor:
        """`logits` (..., V) with the disallowed ids at -inf."""
        return logits.masked_fill(~self.allowed(ids), float("-inf"))
