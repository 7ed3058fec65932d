"""The multimodal token layout, sequence format, embedding splice, vocabulary growth and span constraint."""

from __future__ import annotations

import pytest
import torch

from omni_model.config import ModelConfig
from omni_model.decoder import Decoder
from omni_model.errors import ConfigError
from omni_model.multimodal import (
    MediaCodes,
    MediaConstraint,
    MediaInput,
    MediaSpanError,
    MediaVocab,
    build_sequence,
    extend_vocab,
    find_spans,
    media_outputs,
    splice,
)

V = 50
VOCAB = MediaVocab(V, (("image", 16), ("audio", 8)))


def _model(tie: bool) -> Decoder:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=V, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64,
                      tie_embeddings=tie)  # fmt: skip
    return Decoder(cfg).eval()


def test_layout_has_no_overlaps():
    ids = [VOCAB.marker(m, w) for m in ("image", "audio", "video") for w in ("begin", "end", "pad")]
    ids += list(VOCAB.code_range("image")) + list(VOCAB.code_range("audio"))
    assert sorted(ids) == list(range(V, VOCAB.size))
    assert VOCAB.size == V + 9 + 16 + 8
    codes = torch.tensor([0, 15, 3])
    assert torch.equal(VOCAB.ids_to_codes("image", VOCAB.codes_to_ids("image", codes)), codes)
    with pytest.raises(MediaSpanError, match="image codes must be in"):
        VOCAB.codes_to_ids("image", torch.tensor([16]))
    with pytest.raises(ConfigError, match="no video codebook"):
        VOCAB.code_range("video")
    with pytest.raises(ConfigError, match="listed twice"):
        MediaVocab(V, (("image", 4), ("image", 4)))


def test_sequence_roundtrip_and_spans():
    ids, spans = build_sequence(
        [[1, 2, 3], MediaInput("image", 4), [4], MediaCodes("audio", torch.tensor([7, 0, 1])), [5]], VOCAB
    )
    assert ids.shape == (3 + 6 + 1 + 5 + 1,)
    assert ids[3] == VOCAB.marker("image", "begin") and ids[8] == VOCAB.marker("image", "end")
    assert [(s.modality, s.start, s.end, s.kind) for s in spans] == [("image", 4, 8, "input"),
                                                                      ("audio", 11, 14, "codes")]  # fmt: skip
    assert find_spans(ids, VOCAB) == spans
    assert VOCAB.ids_to_codes("audio", ids[11:14]).tolist() == [7, 0, 1]
    decoded = media_outputs(ids, VOCAB, {"audio": lambda codes: codes.tolist()})
    assert decoded == [("audio", [7, 0, 1])]  # input spans are not outputs
    with pytest.raises(MediaSpanError, match="no audio decoder"):
        media_outputs(ids, VOCAB, {})
    with pytest.raises(MediaSpanError, match="never closed"):
        find_spans(ids[:12], VOCAB)
    with pytest.raises(MediaSpanError, match="text ids"):
        build_sequence([[V + 1]], VOCAB)


def test_splice_replaces_exactly_the_placeholders():
    model = _model(tie=False)
    extend_vocab(model, VOCAB)
    ids, spans = build_sequence([[1, 2], MediaInput("image", 3), [3], MediaInput("audio", 2)], VOCAB)
    feats = [torch.randn(3, 32), torch.randn(2, 32)]
    x = splice(model, ids, spans, feats)
    torch.testing.assert_close(x[3:6], feats[0])
    torch.testing.assert_close(x[9:11], feats[1])
    keep = torch.ones(len(ids), dtype=torch.bool)
    keep[3:6] = keep[9:11] = False
    torch.testing.assert_close(x[keep], model.embed_tokens(ids)[keep])
    # the features reach the model: logits differ from the placeholder-only run
    with torch.no_grad():
        a = model.logits(model.hidden_states(ids[None], embeds=x[None]))
        b = model(ids[None])
    assert (a[0, :3] - b[0, :3]).abs().max() < 1e-5  # causal: positions before the image are unchanged
    assert (a[0, 6:] - b[0, 6:]).abs().max() > 1e-3
    with pytest.raises(MediaSpanError, match="2 media inputs in the sequence, 1"):
        splice(model, ids, spans, feats[:1])
    with pytest.raises(MediaSpanError, match="its features are"):
        splice(model, ids, spans, [torch.randn(3, 32), torch.randn(3, 32)])


@pytest.mark.parametrize("tie", [False, True])
def test_extend_vocab_keeps_text_logits(tie):
    model = _model(tie)
    ids = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        before = model(ids)
        extend_vocab(model, VOCAB)
        after = model(ids)
    assert after.shape[-1] == VOCAB.size and model.config.vocab_size == VOCAB.size
    torch.testing.assert_close(after[..., :V], before, rtol=0, atol=1e-6)
    assert (model.lm_head.weight is model.embed_tokens.weight) == tie
    with torch.no_grad():  # media ids embed and run
        assert torch.isfinite(model(torch.tensor([[V, V + 10, V + 20]]))).all()
    with pytest.raises(ConfigError, match="must equal the model's vocab_size"):
        extend_vocab(model, VOCAB)


def test_constraint_writes_whole_spans():
    c = MediaConstraint(VOCAB, {"image": 4})
    free = c.allowed([1, 2])
    assert free[:V].all() and free[VOCAB.marker("image", "begin")]
    assert not free[VOCAB.marker("audio", "begin")] and not free[VOCAB.marker("image", "pad")]
    assert not free[list(VOCAB.code_range("image"))].any()
    seq = [1, VOCAB.marker("image", "begin")]
    for _ in range(4):
        m = c.allowed(seq)
        assert m.sum() == 16 and m[list(VOCAB.code_range("image"))].all()
        seq.append(VOCAB.code_range("image").start + 3)
    m = c.allowed(seq)
    assert m.sum() == 1 and m[VOCAB.marker("image", "end")]
    seq.append(VOCAB.marker("image", "end"))
    assert torch.equal(c.allowed(seq), free)
    logits = c(seq[:2], torch.zeros(VOCAB.size))
    assert torch.isinf(logits[:V]).all() and torch.isfinite(logits[list(VOCAB.code_range("image"))]).all()
    with pytest.raises(ConfigError, match="no video codebook"):
        MediaConstraint(VOCAB, {"video": 4})
