"""Tokenizers from a Hugging Face folder (`tokenizer.json`) or from GGUF metadata, on `tokenizers` (Rust).

A GGUF carries a vocabulary, not a `tokenizer.json`, so the pipeline is rebuilt from llama.cpp's keys
(`gguf_vocab`). Chat templates render in a sandbox (`chat_template`).
Generation ends on any of `eos_token_ids`: EOS plus llama.cpp's end-of-turn tokens (`<|im_end|>`, ...).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _Backend
from tokenizers import processors

from omni_model.chat_template import DEFAULT_CHAT_TEMPLATE, render_chat_template
from omni_model.errors import TokenizerError
from omni_model.gguf_vocab import (
    CONTROL,
    LLAMA3_SPLIT,
    NORMAL,
    PRE_TYPES,
    USER_DEFINED,
    byte_level,
    gguf_merges,
    sentencepiece,
    token_id,
)

_Special = tuple[str | None, int | None]  # a special token's text and id

# Special tokens that end a turn; llama.cpp treats these as end-of-generation when the vocabulary has them.
_END_OF_TURN = frozenset(
    {
        "<|im_end|>",
        "<|eot_id|>",
        "<|eom_id|>",
        "<|end|>",
        "<end_of_turn>",
        "<|endoftext|>",
        "<|end_of_text|>",
        "<EOT>",
    }
)


class Tokenizer:
    """Text <-> ids, and chat prompts. Build with `from_hf_folder` or `from_gguf_metadata`."""

    def __init__(
        self,
        backend: _Backend,
        *,
        source: str,
        bos: _Special,
        eos: _Special,
        eos_token_ids: frozenset[int],
        chat_template: str | None,
        special_tokens: Mapping[str, str | None] | None = None,
    ) -> None:
        self._backend = backend
        self.source = source
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        (bos_token, self.bos_token_id), (eos_token, self.eos_token_id) = bos, eos
        self.eos_token_ids: frozenset[int] = eos_token_ids | {self.eos_token_id} - {None}
        # ChatML when the checkpoint has no template.
        self.chat_template: str = chat_template or DEFAULT_CHAT_TEMPLATE
        self._special_tokens = {"bos_token": bos_token, "eos_token": eos_token, **(special_tokens or {})}

    @classmethod
    def from_hf_folder(cls, folder: Path) -> Tokenizer:
        """Read `tokenizer.json`, plus `tokenizer_config.json` and `chat_template.jinja/.json` when present."""
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise TokenizerError(f"{path}: no such file (the folder has no tokenizer.json)")
        try:
            backend = _Backend.from_file(str(path))
        except Exception as e:  # the Rust side raises plain Exception for any malformed file
            raise TokenizerError(f"{path}: cannot read tokenizer: {_one_line(e)}") from None
        config = {
            **_read_json(folder / "special_tokens_map.json"),
            **_read_json(folder / "tokenizer_config.json"),
        }
        bos, eos = _token_content(config.get("bos_token")), _token_content(config.get("eos_token"))
        # tokenizer.json's post-processor decides BOS/EOS, as in transformers 5; the config flags only fill a gap.
        if backend.post_processor is None:
            _set_post_processor(
                backend,
                bos if config.get("add_bos_token") else None,
                eos if config.get("add_eos_token") else None,
            )
        eos_ids = _end_of_turn_ids(
            backend, {i for i, t in backend.get_added_tokens_decoder().items() if t.special}
        )
        # generation_config.json may list more ids that end generation (Llama 3: <|eot_id|>).
        generation = _read_json(folder / "generation_config.json").get("eos_token_id")
        generation = [generation] if isinstance(generation, int) else generation
        eos_ids |= {i for i in generation if isinstance(i, int)} if isinstance(generation, list) else set()
        extra = {k: _token_content(config.get(k)) for k in ("unk_token", "pad_token")}
        return cls(
            backend,
            source=str(folder),
            bos=(bos, None if bos is None else backend.token_to_id(bos)),
            eos=(eos, None if eos is None else backend.token_to_id(eos)),
            eos_token_ids=frozenset(eos_ids),
            chat_template=_hf_chat_template(folder, config),
            special_tokens=extra,
        )

    @classmethod
    def from_gguf_metadata(cls, metadata: Mapping[str, Any], source: Path) -> Tokenizer:
        """Rebuild the tokenizer a GGUF describes (`tokenizer.ggml.*`); `source` only names it in errors."""
        tokens = metadata.get("tokenizer.ggml.tokens")
        if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
            raise TokenizerError(f"{source}: GGUF metadata has no usable tokenizer.ggml.tokens list")
        types = metadata.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
        if not isinstance(types, list) or len(types) != len(tokens):
            raise TokenizerError(f"{source}: tokenizer.ggml.token_type is not a list of one type per token")
        model, pre = metadata.get("tokenizer.ggml.model"), metadata.get("tokenizer.ggml.pre", "default")
        try:
            if model == "gpt2":
                backend = byte_level(tokens, types, gguf_merges(metadata, source), pre, source)
                # Files without the flag: llama.cpp adds BOS for Llama 3 vocabularies only.
                add_bos_default = PRE_TYPES[pre] == LLAMA3_SPLIT
            elif model == "llama":
                arch = metadata.get("general.architecture")
                if arch in ("gemma", "gemma2", "gemma3"):  # space tokens, merge order: a rebuild of their own
                    raise TokenizerError(
                        f"{source}: the SentencePiece vocabulary of {arch!r} GGUFs is not supported"
                    )
                backend = sentencepiece(tokens, types, metadata, source, normalize_spaces=arch == "phi3")
                add_bos_default = True  # llama.cpp's default for SentencePiece vocabularies without the flag
            else:
                raise TokenizerError(
                    f"{source}: unsupported tokenizer.ggml.model {model!r} (supported: 'gpt2', 'llama')"
                )
        except TokenizerError:
            raise
        except Exception as e:  # the Rust side raises plain Exception, e.g. for a merge of unknown tokens
            raise TokenizerError(f"{source}: cannot build the {model!r} tokenizer: {_one_line(e)}") from None
        ids = {
            k: token_id(metadata, f"tokenizer.ggml.{k}_token_id", len(tokens), source)
            for k in ("bos", "eos", "unknown", "padding", "eot", "eom")
        }
        name = {k: None if i is None else tokens[i] for k, i in ids.items()}
        add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", add_bos_default))
        add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False))
        _set_post_processor(backend, name["bos"] if add_bos else None, name["eos"] if add_eos else None)
        eos_ids = _end_of_turn_ids(backend, {i for i, t in enumerate(types) if t in (CONTROL, USER_DEFINED)})
        eos_ids |= {i for i in (ids["eot"], ids["eom"]) if i is not None}
        template = metadata.get("tokenizer.chat_template")
        return cls(
            backend,
            source=str(source),
            bos=(name["bos"], ids["bos"]),
            eos=(name["eos"], ids["eos"]),
            eos_token_ids=frozenset(eos_ids),
            chat_template=template if isinstance(template, str) else None,
            special_tokens={"unk_token": name["unknown"], "pad_token": name["padding"]},
        )

    def save(self, folder: Path) -> list[str]:
        """Write tokenizer.json, tokenizer_config.json (special tokens, chat template) and
        generation_config.json (end-of-turn ids) so that `from_hf_folder(folder)` gives this
        tokenizer back; returns the file names."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self._backend.save(str(folder / "tokenizer.json"))
        config = {k: v for k, v in self._special_tokens.items() if v is not None}
        config["chat_template"] = self.chat_template
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")
        generation = {"eos_token_id": sorted(self.eos_token_ids)}
        (folder / "generation_config.json").write_text(json.dumps(generation), encoding="utf-8")
        return ["tokenizer.json", "tokenizer_config.json", "generation_config.json"]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; BOS/EOS are added only where the model asks for them (add_bos_token)."""
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`; a byte sequence cut mid-character decodes to U+FFFD."""
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The prompt text for `messages`, rendered by the model's template (ChatML if it has none)."""
        return render_chat_template(
            self.chat_template,
            messages,
            add_generation_prompt=add_generation_prompt,
            special_tokens=self._special_tokens,
            source=self.source,
        )

    def token_to_id(self, s: str) -> int | None:
        return self._backend.token_to_id(s)

    def id_to_token(self, i: int) -> str | None:
        return self._backend.id_to_token(i) if 0 <= i < 2**32 else None


class StreamDecoder:
    """Incremental detokenization: push ids one at a time, get the newly final text.

    Decodes a short window of recent ids and emits what it adds over the window's older part, so
    decoders that look at neighbours (SentencePiece's leading-space strip) stay right; text ending in
    U+FFFD is held back until the rest of the UTF-8 character arrives.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # window start: ids before it are fully emitted
        self._read = 0  # ids before this are emitted; [prefix, read) is context for the next diff

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        seen = self._tok.decode(self._ids[self._prefix : self._read], self._skip)
        text = self._tok.decode(self._ids[self._prefix :], self._skip)
        if len(text) <= len(seen) or text.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(seen) :]

    def flush(self) -> str:
        """Whatever is still held back (a trailing incomplete character comes out as U+FFFD)."""
        seen = self._tok.decode(self._ids[self._prefix : self._read], self._skip)
        text = self._tok.decode(self._ids[self._prefix :], self._skip)
        self._prefix = self._read = len(self._ids)
        return text[len(seen) :]


def _set_post_processor(backend: _Backend, bos: str | None, eos: str | None) -> None:
    """Put `bos` before and `eos` after every encoding (None: nothing)."""
    ids = {t: i for t in (bos, eos) if t is not None and (i := backend.token_to_id(t)) is not None}
    single = [f"{bos}:0"] * (bos in ids) + ["$A:0"] + [f"{eos}:0"] * (eos in ids)
    backend.post_processor = processors.TemplateProcessing(single=single, special_tokens=list(ids.items()))


def _end_of_turn_ids(backend: _Backend, special_ids: set[int]) -> set[int]:
    return {i for t in _END_OF_TURN if (i := backend.token_to_id(t)) is not None and i in special_ids}


def _hf_chat_template(folder: Path, config: Mapping[str, Any]) -> str | None:
    # transformers saves the template in chat_template.jinja (newest), chat_template.json or the config.
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        try:
            return jinja.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise TokenizerError(f"{jinja}: cannot read: {_one_line(e)}") from None
    template = _read_json(folder / "chat_template.json").get("chat_template", config.get("chat_template"))
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # ValueError covers JSONDecodeError and huge ints
        raise TokenizerError(f"{path}: cannot read JSON: {_one_line(e)}") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _token_content(value: Any) -> str | None:
    # tokenizer_config.json stores a special token as a string or as a serialized AddedToken dict.
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _one_line(e: object) -> str:
    return " ".join(str(e).split())
