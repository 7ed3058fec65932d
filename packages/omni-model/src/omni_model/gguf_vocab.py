"""Tokenizer pipelines rebuilt from a GGUF vocabulary (`tokenizer.ggml.*`), on `tokenizers` (Rust).

`gpt2` vocabularies are byte-level BPE whose pre-tokenizer regex is chosen by `tokenizer.ggml.pre`,
as llama.cpp's `llama-vocab.cpp` does; `llama` vocabularies are SentencePiece-style BPE with byte
fallback and a `▁` prefix, their merges recovered from the token scores when the file has none (as
transformers' GGUF converter does). Control tokens become special added tokens, user-defined ones
plain added tokens, so "<|im_start|>" in text is one token, as in llama.cpp.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
from tokenizers import Tokenizer as Backend
from tokenizers.models import BPE

from omni_model.errors import TokenizerError

# GGUF token_type values (llama.cpp `llama_token_type`).
NORMAL, CONTROL, USER_DEFINED = 1, 3, 4


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table: byte-level vocabularies spell every token with it."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    extra = iter(range(256, 512))
    return {b: chr(b) if b in printable else chr(next(extra)) for b in range(256)}


_BYTE_CHAR = _bytes_to_unicode()
_BYTE_ALPHABET = frozenset(_BYTE_CHAR.values())

LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre -> how byte-level text is split before BPE. "gpt2" is ByteLevel's built-in GPT-2
# regex; "digits+gpt2" first splits every digit alone (llama.cpp's STARCODER/SMOLLM group, and SmolLM's
# own tokenizer.json: Digits(individual_digits) then ByteLevel).
PRE_TYPES = {
    **dict.fromkeys(["default", "gpt2"], "gpt2"),
    **dict.fromkeys(["smollm", "starcoder", "refact"], "digits+gpt2"),
    **dict.fromkeys(["llama-bpe", "llama3", "llama-v3", "smaug-bpe", "falcon3", "dbrx"], LLAMA3_SPLIT),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen"], _QWEN2_SPLIT),
}


def byte_level(
    tokens: list[str], types: list[int], merges: list[tuple[str, str]], pre: str, source: Path
) -> Backend:
    if pre not in PRE_TYPES:
        known = ", ".join(sorted(PRE_TYPES))
        raise TokenizerError(f"{source}: unsupported tokenizer.ggml.pre {pre!r} (supported: {known})")
    split = PRE_TYPES[pre]
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        # A normal token outside the byte alphabet is stored as plain text; BPE needs it byte-spelled.
        if types[i] == NORMAL and not set(t) <= _BYTE_ALPHABET:
            t = "".join(_BYTE_CHAR[b] for b in t.encode("utf-8"))
        vocab.setdefault(t, i)
    # Llama 3's tokenizer.json looks a whole pre-token up before merging (llama.cpp: ignore_merges).
    backend = Backend(BPE(vocab, merges, ignore_merges=split == LLAMA3_SPLIT))
    if split == "gpt2":
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif split == "digits+gpt2":
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    else:
        regex = pre_tokenizers.Split(Regex(split), behavior="isolated")
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [regex, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    backend.decoder = decoders.ByteLevel()
    _add_special(backend, tokens, types)
    return backend


def sentencepiece(
    tokens: list[str], types: list[int], metadata: Mapping[str, Any], source: Path, normalize_spaces: bool
) -> Backend:
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)  # a duplicated token keeps its first id, as llama.cpp's lookup does
    if "tokenizer.ggml.merges" in metadata:
        merges = gguf_merges(metadata, source)
    else:
        scores = metadata.get("tokenizer.ggml.scores")
        if not isinstance(scores, list) or len(scores) != len(tokens):
            raise TokenizerError(
                f"{source}: a 'llama' tokenizer needs tokenizer.ggml.scores (one per token) or merges"
            )
        merges = _merges_from_scores(tokens, types, scores, vocab)
    unk = token_id(metadata, "tokenizer.ggml.unknown_token_id", len(tokens), source)
    unk_token = None if unk is None else tokens[unk]
    backend = Backend(BPE(vocab, merges, unk_token=unk_token, fuse_unk=True, byte_fallback=True))
    prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
    if normalize_spaces:  # Phi-3: "▁" prepended to every text piece, even one that starts with a space
        steps = [normalizers.Prepend("▁")] if prefix else []
        backend.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "▁")])
    else:
        # As transformers' converter: "▁" only at the very start, not after a special token, and not when the
        # text already starts with a space (where sentencepiece and llama.cpp would add one more).
        scheme = "first" if prefix else "never"
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    backend.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    _add_special(backend, tokens, types)
    return backend


def _merges_from_scores(
    tokens: list[str], types: list[int], scores: list[float], vocab: Mapping[str, int]
) -> list[tuple[str, str]]:
    """BPE merges implied by SentencePiece scores: every split of a token into two known tokens, best score first."""
    found: list[tuple[float, int, int, int, int, str, str]] = []
    for i, t in enumerate(tokens):
        if types[i] != NORMAL:
            continue
        for k in range(1, len(t)):
            left, right = t[:k], t[k:]
            if left in vocab and right in vocab:
                # Ties go to the longer left piece, then the lower ids, as transformers' generate_merges.
                found.append(
                    (-float(scores[i]), -len(left), -len(right), vocab[left], vocab[right], left, right)
                )
    found.sort(key=lambda m: m[:3])  # stable: equal keys keep token order
    return [(m[5], m[6]) for m in found]


def _add_special(backend: Backend, tokens: list[str], types: list[int]) -> None:
    # Matched whole in text, like llama.cpp; control tokens are also dropped by skip_special_tokens.
    control = [
        AddedToken(tokens[i], special=True, normalized=False) for i, t in enumerate(types) if t == CONTROL
    ]
    user = [
        AddedToken(tokens[i], special=False, normalized=False)
        for i, t in enumerate(types)
        if t == USER_DEFINED
    ]
    backend.add_special_tokens(control)
    backend.add_tokens(user)


def gguf_merges(metadata: Mapping[str, Any], source: Path) -> list[tuple[str, str]]:
    raw = metadata.get("tokenizer.ggml.merges")
    if not isinstance(raw, list):
        raise TokenizerError(f"{source}: GGUF metadata has no tokenizer.ggml.merges list")
    merges = []
    for n, m in enumerate(raw):
        parts = m.split(" ") if isinstance(m, str) else []
        if len(parts) != 2:
            raise TokenizerError(
                f"{source}: tokenizer.ggml.merges[{n}] = {m!r} is not two tokens split by one space"
            )
        merges.append((parts[0], parts[1]))
    return merges


def token_id(metadata: Mapping[str, Any], key: str, n_tokens: int, source: Path) -> int | None:
    i = metadata.get(key)
    if i is None:
        return None
    if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < n_tokens:
        raise TokenizerError(f"{source}: {key} = {i!r} is not a token id below {n_tokens}")
    return i
