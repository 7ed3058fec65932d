"""Sampling processors against transformers' LogitsProcessors; generation against no-cache decoding."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from transformers.generation import logits_process as hf

from omni_model.config import ModelConfig
from omni_model.decoder import Decoder
from omni_model.errors import ConfigError
from omni_model.generate import GenerationError, StopStringFilter, generate
from omni_model.sampling import (
    SamplingConfig,
    apply_repetition_penalty,
    apply_temperature,
    make_generator,
    min_p_filter,
    process_logits,
    sample,
    top_k_filter,
    top_p_filter,
)

V = 97


@pytest.fixture(scope="module")
def model() -> Decoder:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=V, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=64)
    m = Decoder(cfg).eval()
    # Larger logits than the default init gives, so greedy paths vary and sampling is not uniform.
    with torch.no_grad():
        m.lm_head.weight.mul_(20)
    return m


def _logits(shape=(4, V), seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * 3


# ---- SamplingConfig ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_new_tokens", 0), ("max_new_tokens", 2.5), ("temperature", -0.1), ("temperature", math.nan),
        ("top_k", -1), ("top_p", 0.0), ("top_p", 1.5), ("min_p", -0.1), ("min_p", 1.1),
        ("repetition_penalty", 0.0), ("seed", -1), ("seed", "7"), ("stop_token_ids", {1, 2}),
        ("stop_token_ids", frozenset({-3})), ("stop_strings", "END"), ("stop_strings", ("",)),
    ],
)  # fmt: skip
def test_config_rejects_bad_field_naming_it(field, value):
    with pytest.raises(ConfigError, match=field):
        SamplingConfig(**{field: value})


def test_config_defaults_are_greedy_and_valid():
    cfg = SamplingConfig()
    assert cfg.greedy and cfg.stop_token_ids is None and cfg.stop_strings == ()


# ---- processors against transformers ----------------------------------------------------------


def _hf(proc, logits, input_ids=None):
    ids = input_ids if input_ids is not None else torch.zeros(logits.shape[0], 1, dtype=torch.long)
    return proc(ids, logits.clone())


@pytest.mark.parametrize("t", [0.3, 1.0, 2.5])
def test_temperature_matches_transformers(t):
    x = _logits()
    torch.testing.assert_close(apply_temperature(x, t), _hf(hf.TemperatureLogitsWarper(t), x))


@pytest.mark.parametrize("k", [1, 5, 40, V])
def test_top_k_matches_transformers(k):
    x = _logits()
    got = top_k_filter(x, k)
    torch.testing.assert_close(got, _hf(hf.TopKLogitsWarper(k), x))
    assert (got[0] > -math.inf).sum() == k


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9, 0.99])
def test_top_p_matches_transformers(p):
    x = _logits(seed=1)
    got = top_p_filter(x, p)
    torch.testing.assert_close(got, _hf(hf.TopPLogitsWarper(p), x))
    assert (got > -math.inf).sum(-1).min() >= 1


@pytest.mark.parametrize("p", [0.01, 0.1, 0.5, 1.0])
def test_min_p_matches_transformers(p):
    x = _logits(seed=2)
    torch.testing.assert_close(min_p_filter(x, p), _hf(hf.MinPLogitsWarper(p), x))


@pytest.mark.parametrize("penalty", [0.7, 1.3, 2.0])
def test_repetition_penalty_matches_transformers(penalty):
    x = _logits(seed=3)
    ids = torch.randint(0, V, (x.shape[0], 12), generator=torch.Generator().manual_seed(4))
    got = apply_repetition_penalty(x, ids, penalty)
    torch.testing.assert_close(got, _hf(hf.RepetitionPenaltyLogitsProcessor(penalty), x, ids))
    assert not torch.equal(got, x)


def test_processors_accept_a_single_row():
    x = _logits(seed=5)
    ids = torch.tensor([3, 3, 9, 50])
    cfg = SamplingConfig(temperature=0.8, top_k=30, top_p=0.9, min_p=0.05, repetition_penalty=1.2)
    torch.testing.assert_close(process_logits(x[1], cfg, ids), process_logits(x[1:2], cfg, ids[None])[0])


def test_process_logits_chains_in_transformers_order():
    x = _logits(seed=6)
    ids = torch.randint(0, V, (x.shape[0], 8), generator=torch.Generator().manual_seed(7))
    cfg = SamplingConfig(temperature=0.7, top_k=20, top_p=0.8, min_p=0.1, repetition_penalty=1.5)
    ref = x.clone()
    for proc in [hf.RepetitionPenaltyLogitsProcessor(1.5), hf.TemperatureLogitsWarper(0.7),
                 hf.TopKLogitsWarper(20), hf.TopPLogitsWarper(0.8), hf.MinPLogitsWarper(0.1)]:  # fmt: skip
        ref = proc(ids, ref)
    torch.testing.assert_close(process_logits(x, cfg, ids), ref)


# ---- sampling ---------------------------------------------------------------------------------


def test_greedy_sample_is_argmax():
    x = _logits()
    assert torch.equal(sample(x, SamplingConfig()), x.argmax(-1))


def test_sampling_is_reproducible_by_seed_and_respects_filters():
    x = _logits(seed=8)
    cfg = SamplingConfig(temperature=1.0, top_k=3)
    assert torch.equal(sample(x, cfg, make_generator(11)), sample(x, cfg, make_generator(11)))
    gen = make_generator(12)
    drawn = torch.stack([sample(x[0], cfg, gen) for _ in range(200)])
    allowed = set(torch.topk(x[0], 3).indices.tolist())
    assert set(drawn.tolist()) <= allowed and len(set(drawn.tolist())) > 1


# ---- generate ---------------------------------------------------------------------------------


def _reference_greedy(model, prompt, n, penalty=1.0):
    """Argmax decoding that reruns the full forward each step (no cache), penalty by transformers."""
    ids = torch.tensor([prompt])
    proc = hf.RepetitionPenaltyLogitsProcessor(penalty)
    with torch.no_grad():
        for _ in range(n):
            logits = model(ids)[:, -1]
            nxt = proc(ids, logits).argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
    return ids[0, len(prompt) :].tolist()


def test_greedy_generate_equals_no_cache_argmax(model):
    prompt = [5, 17, 42, 8, 91, 3]
    res = generate(model, prompt, SamplingConfig(max_new_tokens=20))
    assert list(res.token_ids) == _reference_greedy(model, prompt, 20)
    assert res.finish_reason == "length" and res.n_generated == 20 and res.n_prompt == len(prompt)
    assert res.prefill_seconds > 0 and res.decode_seconds > 0 and res.decode_steps == 19


def test_greedy_generate_with_repetition_penalty_matches_transformers(model):
    prompt = [1, 2, 3, 1, 2, 3]
    res = generate(model, prompt, SamplingConfig(max_new_tokens=16, repetition_penalty=1.8))
    assert list(res.token_ids) == _reference_greedy(model, prompt, 16, penalty=1.8)


def test_seeded_sampling_gives_the_same_tokens(model):
    cfg = SamplingConfig(max_new_tokens=24, temperature=3.0, top_p=0.95, seed=123)
    a, b = generate(model, [4, 5, 6], cfg), generate(model, [4, 5, 6], cfg)
    c = generate(model, [4, 5, 6], SamplingConfig(max_new_tokens=24, temperature=3.0, top_p=0.95, seed=124))
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_stop_token_ends_generation_and_is_not_returned(model):
    prompt = [7, 8, 9]
    full = _reference_greedy(model, prompt, 12)
    stop = full[4]
    first = full.index(stop)
    seen: list[int] = []
    res = generate(model, prompt, SamplingConfig(max_new_tokens=12, stop_token_ids=frozenset({stop})),
                   on_token=seen.append)  # fmt: skip
    assert res.finish_reason == "stop_token"
    assert list(res.token_ids) == seen == full[:first]


def test_stop_check_ends_generation(model):
    res = generate(model, [1, 2], SamplingConfig(max_new_tokens=30), stop_check=lambda ids: len(ids) == 5)
    assert res.finish_reason == "stop_string" and res.n_generated == 5


def test_accepts_a_tensor_prompt(model):
    prompt = [10, 20, 30]
    cfg = SamplingConfig(max_new_tokens=5)
    assert generate(model, torch.tensor([prompt]), cfg).token_ids == generate(model, prompt, cfg).token_ids


def test_generation_stops_at_max_seq_len(model):
    prompt = list(range(60))  # max_seq_len is 64
    res = generate(model, prompt, SamplingConfig(max_new_tokens=50))
    assert res.n_generated == 4 and res.finish_reason == "length"


@pytest.mark.parametrize("n", [64, 80])
def test_prompt_too_long_names_max_seq_len(model, n):
    with pytest.raises(GenerationError, match="max_seq_len"):
        generate(model, list(range(n)), SamplingConfig())


def test_empty_prompt_is_an_error(model):
    with pytest.raises(GenerationError, match="empty"):
        generate(model, [], SamplingConfig())


# ---- stop strings -----------------------------------------------------------------------------


def _stream(chunks, stops):
    f = StopStringFilter(stops)
    shown = []
    for c in chunks:
        piece = f.push(c)
        shown.append(piece)
        if f.stopped:
            break
    shown.append(f.flush())
    return f, shown


def test_stop_string_split_across_chunks_is_never_shown():
    f, shown = _stream(["Hello <", "|e", "nd|> after"], ["<|end|>"])
    assert f.stopped and f.text == "Hello " and "".join(shown) == "Hello "
    assert shown[:2] == ["Hello ", ""]


def test_held_back_text_is_released_when_it_is_not_a_stop_string():
    f, shown = _stream(["a <", "|x"], ["<|end|>"])
    assert not f.stopped and shown == ["a ", "<|x", ""]


def test_earliest_of_several_stop_strings_wins():
    f, _ = _stream(["one two three"], ["three", "two"])
    assert f.text == "one "


@given(
    text=st.text(alphabet="ab<>", max_size=40),
    stops=st.lists(st.text(alphabet="ab<>", min_size=1, max_size=4), min_size=1, max_size=3),
    cuts=st.lists(st.integers(0, 40), max_size=10),
)
def test_stream_equals_text_up_to_the_first_stop_string(text, stops, cuts):
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    chunks = [text[a:b] for a, b in itertools.pairwise(bounds)]
    f, shown = _stream(chunks, stops)
    # Generation stops at the chunk that completes a stop string; the text is cut at its start.
    hits = [i for s in stops if (i := text.find(s)) >= 0]
    assert "".join(shown) == f.text
    assert f.stopped == bool(hits)
    assert f.text == text[: min(hits, default=len(text))]


# ---- generate_text ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lm(model):
    """The tiny model with a byte-level BPE tokenizer trained to fit its vocabulary."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from omni_model.loader import LoadedModel
    from omni_model.tokenizer import Tokenizer

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    # A reduced byte alphabet keeps the vocabulary under V while still byte-level.
    text = ["to be or not to be, that is the question", "whether tis nobler in the mind to suffer"] * 20
    trainer = trainers.BpeTrainer(vocab_size=V - 1, special_tokens=["<|end|>"],
                                  initial_alphabet=sorted(set("".join(text).replace(" ", "Ġ"))))  # fmt: skip
    backend.train_from_iterator(text, trainer)
    assert backend.get_vocab_size() <= V
    end = backend.token_to_id("<|end|>")
    tok = Tokenizer(backend, source="test", bos=(None, None), eos=("<|end|>", end), eos_token_ids=frozenset(),
                    chat_template=None)  # fmt: skip
    return LoadedModel(model.config, model, tok, "test")


def test_generate_text_streams_the_decoded_tokens(lm):
    from omni_model.generate import generate_text

    pieces: list[str] = []
    cfg = SamplingConfig(max_new_tokens=24, stop_token_ids=frozenset())
    res = generate_text(lm, "to be or", cfg, on_text=pieces.append)
    ref = generate(lm.model, lm.tokenizer.encode("to be or"), cfg)
    assert res.token_ids == ref.token_ids
    assert res.text == "".join(pieces) == lm.tokenizer.decode(list(ref.token_ids), skip_special_tokens=True)


def test_generate_text_stops_before_a_stop_string(lm):
    from omni_model.generate import generate_text

    cfg = SamplingConfig(max_new_tokens=24, stop_token_ids=frozenset())
    full = generate_text(lm, "to be or", cfg).text
    assert full and len(full) > 6
    stop = full[3:6]
    pieces: list[str] = []
    res = generate_text(lm, "to be or", SamplingConfig(max_new_tokens=24, stop_token_ids=frozenset(),
                                                       stop_strings=(stop,)), on_text=pieces.append)  # fmt: skip
    assert res.finish_reason == "stop_string"
    assert res.text == "".join(pieces) == full[: full.index(stop)]
    assert res.n_generated < 24


def test_generate_text_stops_at_the_tokenizers_eos_by_default(lm):
    from omni_model.generate import generate_text

    ref = generate(lm.model, lm.tokenizer.encode("to be or"), SamplingConfig(max_new_tokens=24))
    eos, saved = ref.token_ids[2], lm.tokenizer.eos_token_ids
    lm.tokenizer.eos_token_ids = frozenset({eos})
    try:
        res = generate_text(lm, "to be or", SamplingConfig(max_new_tokens=24))
    finally:
        lm.tokenizer.eos_token_ids = saved
    assert res.finish_reason == "stop_token" and res.token_ids == ref.token_ids[: ref.token_ids.index(eos)]
