"""Bad input to `omni_model.load`: one typed OmniError with a one-line message naming the file, never a crash.

Hand-made cases cover missing, empty, foreign, truncated and inconsistent checkpoints of every kind
(folder, sharded folder, GGUF, zoo name); test_fuzz_checkpoints.py corrupts valid ones at random. A
tiny GGUF written from a transformers Llama checks the GGUF path end to end: logits within 1e-4 of
transformers.
"""

from __future__ import annotations

import json
import pickle
import shutil
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import omni_model
from omni_model import (
    ZOO,
    CheckpointError,
    ConfigError,
    TokenizerError,
    UnsupportedArchitectureError,
)

from .loading import bad, load_within
from .tiny import VOCAB, save_tiny
from .tiny_gguf import gguf_from_hf, tiny_llama_gguf


@pytest.fixture
def folder(hf_folder, tmp_path) -> Path:
    """A private copy of the tiny HF folder, for a test to break."""
    return Path(shutil.copytree(hf_folder, tmp_path / "model"))


def edit_config(folder: Path, **changes) -> Path:
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    for k, v in changes.items():
        if v is _DELETE:
            del cfg[k]
        else:
            cfg[k] = v
    path.write_text(json.dumps(cfg))
    return path


_DELETE = object()


def test_valid_inputs_load(hf_folder, gguf_file):
    """The baselines the cases below break (and the fuzzers corrupt) do load."""
    for source in (hf_folder, gguf_file, str(gguf_file)):
        m = load_within(source)
        assert m.config.vocab_size == VOCAB
        assert torch.isfinite(m.model(torch.tensor([[1, 2, 3]]))).all()
    assert load_within(gguf_file).tokenizer.encode("the", add_special_tokens=False) == [281, 101]  # "th" "e"


def test_load_config_reads_the_architecture_alone(hf_folder, gguf_file, tmp_path):
    from omni_model.loader import load_config

    for source in (hf_folder, gguf_file):
        assert load_config(source) == load_within(source).config
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        load_config(tmp_path)


def test_gguf_from_transformers_matches_logits(tmp_path):
    """A float32 GGUF written from a transformers Llama (q/k permuted as llama.cpp does) loads to the same logits."""
    ref = save_tiny("llama", tmp_path / "hf", num_key_value_heads=1)
    path = gguf_from_hf(ref, tmp_path / "llama.gguf")
    ours = omni_model.load(path)
    assert ours.config.n_kv_heads == 1 and not ours.config.tie_embeddings
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        err = (ours.model(ids) - ref(ids).logits).abs().max().item()
    assert err <= 1e-4, f"max |logits difference| {err:.2e}"


# ---- paths, zoo names and foreign files ---------------------------------------------------------------


def test_missing_path(tmp_path):
    bad(CheckpointError, str(tmp_path / "nowhere"))
    bad(CheckpointError, tmp_path / "nowhere.gguf")
    bad(CheckpointError, "nowhere.gguf")


def test_unknown_zoo_name():
    msg = bad(CheckpointError, "no-such-model")
    assert all(name in msg for name in ZOO), msg


@pytest.mark.parametrize("name", ["empty.gguf", "empty.safetensors", "empty"])
def test_empty_file(tmp_path, name):
    (tmp_path / name).touch()
    bad(CheckpointError, tmp_path / name)


@pytest.mark.parametrize("name", ["notes.txt", "model.gguf", "weights.bin"])
def test_text_file(tmp_path, name):
    (tmp_path / name).write_text("GGU is not GGUF; this is a plain text file\n")
    bad(CheckpointError, tmp_path / name)


def test_bin_only_folder_is_never_unpickled(folder, tmp_path):
    """Pickled weights are refused before anything reads them: the pickle would create `marker`."""
    marker = tmp_path / "unpickled"

    class Evil:
        def __reduce__(self):
            return Path.touch, (marker,)

    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(Evil()))
    msg = bad(CheckpointError, folder)
    assert "pytorch_model.bin" in msg and "pickle" in msg and "never" in msg
    assert not marker.exists()


# ---- Hugging Face folders --------------------------------------------------------------------------------


def test_folder_without_config(folder):
    (folder / "config.json").unlink()
    bad(CheckpointError, folder, folder, "config.json")


@pytest.mark.parametrize(
    "content",
    [
        b'{"model_type": "llama", ',
        b"\xff\xfe{}",
        b"[" * 100_000,
        b'{"vocab_size": 1' + b"0" * 5000 + b"}",
        b"[]",
    ],
    ids=["cut", "not-utf8", "deep", "5000-digits", "list"],
)
def test_config_not_json(folder, content):
    (folder / "config.json").write_bytes(content)
    msg = bad(CheckpointError, folder, folder / "config.json")
    assert msg.count(str(folder)) == 1, msg


@pytest.mark.parametrize(
    "content", [b"[" * 100_000, b'{"a": 1' + b"0" * 5000 + b"}"], ids=["deep", "5000-digits"]
)
@pytest.mark.parametrize("name", ["tokenizer_config.json", "generation_config.json"])
def test_tokenizer_side_json_not_readable(folder, name, content):
    (folder / name).write_bytes(content)
    bad(TokenizerError, folder, folder / name)


@pytest.mark.parametrize("model_type", ["gpt_neox", None, ["llama"], 7])
def test_config_unknown_model_type(folder, model_type):
    path = edit_config(folder, model_type=model_type)
    msg = bad(UnsupportedArchitectureError, folder, path, "model_type")
    assert repr(model_type) in msg


@pytest.mark.parametrize(
    ("field", "value", "named"),
    [
        ("hidden_size", "64", None),
        ("hidden_size", -64, None),
        ("hidden_size", 64.0, None),
        ("num_hidden_layers", 0, None),
        ("num_attention_heads", True, None),
        ("num_key_value_heads", "2", None),
        ("intermediate_size", None, None),
        ("vocab_size", 2.5, None),
        ("max_position_embeddings", "long", None),
        ("head_dim", -16, None),
        ("rms_norm_eps", "small", None),
        ("rms_norm_eps", -1e-6, None),
        ("rope_parameters", {"rope_theta": "fast"}, "rope_theta"),
        ("rope_parameters", {"rope_theta": 10**400}, "rope_theta"),
        ("rope_parameters", "linear", None),
        ("rope_parameters", {"rope_type": "linear", "factor": "two"}, "factor"),
        ("rope_scaling", ["linear"], None),
        ("sliding_window", -1, None),
        ("hidden_size", _DELETE, None),
    ],
)
def test_config_field_wrong_type_or_range(folder, field, value, named):
    path = edit_config(folder, **{field: value})
    bad(ConfigError, folder, path, named or field)


def test_config_qwen_sliding_layers_bounded(tmp_path):
    """Qwen2's sliding layers (from max_window_layers, without layer_types) are not listed for a billion layers."""
    folder = tmp_path / "qwen2"
    save_tiny("qwen2", folder, use_sliding_window=True, sliding_window=6, max_window_layers=1)
    path = edit_config(folder, num_hidden_layers=10**9, layer_types=_DELETE)
    bad(ConfigError, folder, path, "num_hidden_layers")


def test_config_relations(folder):
    """Fields valid alone but not together name the ModelConfig fields involved."""
    path = edit_config(folder, num_attention_heads=3)
    bad(ConfigError, folder, path, "n_heads")


@pytest.mark.parametrize("n_layers", [3, 10**9, 2**62])
def test_config_more_layers_than_weights(folder, n_layers):
    """A layer count the weights lack fails fast (no billion-block model is ever built)."""
    edit_config(folder, num_hidden_layers=n_layers)
    bad(CheckpointError, folder, folder, "missing tensor", "layers.2.")


@pytest.mark.parametrize(
    "changes",
    [{"hidden_size": 128}, {"intermediate_size": 100}, {"vocab_size": 300}, {"hidden_size": 2**40},
     {"vocab_size": 2**62}, {"num_key_value_heads": 4}, {"hidden_size": 2**62, "head_dim": 16}],
)  # fmt: skip
def test_weights_do_not_match_config(folder, changes):
    edit_config(folder, **changes)
    bad(CheckpointError, folder, folder, "shape")


def _rewrite_weights(folder: Path, change) -> None:
    path = folder / "model.safetensors"
    state = load_file(path)
    change(state)
    save_file(state, path, metadata={"format": "pt"})


def test_missing_tensor(folder):
    _rewrite_weights(folder, lambda s: s.pop("model.layers.1.mlp.up_proj.weight"))
    bad(CheckpointError, folder, folder, "missing tensor 'layers.1.mlp.up_proj.weight'")


def test_extra_tensor(folder):
    _rewrite_weights(folder, lambda s: s.update({"model.layers.0.mlp.extra.weight": torch.zeros(2)}))
    bad(CheckpointError, folder, folder, "unexpected tensor 'layers.0.mlp.extra.weight'")


def test_integer_tensor(folder):
    _rewrite_weights(folder, lambda s: s.update({"model.norm.weight": torch.ones(64, dtype=torch.int32)}))
    bad(CheckpointError, folder, folder, "'norm.weight'", "dtype")


def test_missing_tokenizer(folder):
    (folder / "tokenizer.json").unlink()
    bad(TokenizerError, folder, folder / "tokenizer.json")


def test_broken_tokenizer(folder):
    (folder / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": 3}}')
    bad(TokenizerError, folder, folder / "tokenizer.json")


@pytest.mark.parametrize("where", ["length", "header", "data", "last-byte"])
def test_truncated_safetensors(folder, where):
    path = folder / "model.safetensors"
    data = path.read_bytes()
    header = struct.unpack("<Q", data[:8])[0]
    cut = {"length": 5, "header": 8 + header // 2, "data": 8 + header + 1000, "last-byte": len(data) - 1}[
        where
    ]
    path.write_bytes(data[:cut])
    bad(CheckpointError, folder, path)


@pytest.mark.parametrize(
    ("entry", "value"),
    [("shape", [2**40]), ("shape", [2**31, 2**31, 2**31]), ("shape", [-1, 64]), ("dtype", "Q4"),
     ("data_offsets", [0, 2**62]), ("data_offsets", [100, 0])],
)  # fmt: skip
def test_safetensors_header_lies(folder, entry, value):
    """Sizes in the header that disagree with the file are refused before anything is allocated."""
    path = folder / "model.safetensors"
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    header["model.norm.weight"][entry] = value
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])
    bad(CheckpointError, folder, path)


# ---- sharded folders -------------------------------------------------------------------------------------


def _shard(folder: Path) -> tuple[Path, list[Path]]:
    """Split model.safetensors into two shards with a model.safetensors.index.json, as save_pretrained does."""
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    names = sorted(state)
    shards = [folder / "model-00001-of-00002.safetensors", folder / "model-00002-of-00002.safetensors"]
    halves = [names[: len(names) // 2], names[len(names) // 2 :]]
    weight_map = {}
    for shard, part in zip(shards, halves, strict=True):
        save_file({k: state[k] for k in part}, shard, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part, shard.name)
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return index, shards


def _point_index(index: Path, shard_name: str) -> None:
    data = json.loads(index.read_text())
    first = next(iter(data["weight_map"]))
    data["weight_map"][first] = shard_name
    index.write_text(json.dumps(data))


def test_sharded_folder_loads(folder):
    whole = load_within(folder).model.state_dict()
    _shard(folder)
    sharded = load_within(folder).model.state_dict()
    assert all(torch.equal(whole[k], sharded[k]) for k in whole)


def test_sharded_missing_shard(folder):
    _, shards = _shard(folder)
    shards[1].unlink()
    bad(CheckpointError, folder, shards[1].name, "no such file")


@pytest.mark.parametrize("target", ["../x.safetensors", "sub/../../x.safetensors", "/tmp/x.safetensors"])
def test_sharded_index_points_outside(folder, target):
    (folder.parent / "x.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    index, _ = _shard(folder)
    _point_index(index, target)
    bad(CheckpointError, folder, index, target, "outside")


@pytest.mark.parametrize(
    "weight_map",
    [None, {}, [], "model.safetensors", {"lm_head.weight": ["x"]}, {"lm_head.weight": "x\0.safetensors"}],
)
def test_sharded_index_without_weight_map(folder, weight_map):
    index, _ = _shard(folder)
    index.write_text(json.dumps({"weight_map": weight_map}))
    bad(CheckpointError, folder, index, "weight_map")


def test_sharded_index_not_json(folder):
    index, _ = _shard(folder)
    index.write_text("[1, 2")
    bad(CheckpointError, folder, index)


# ---- GGUF files ------------------------------------------------------------------------------------------


def _gguf_layout(path: Path) -> dict[str, int]:
    r = gguf.GGUFReader(path)
    fields = [f for name, f in r.fields.items() if not name.startswith("GGUF.")]
    tokens = r.fields["tokenizer.ggml.tokens"]
    last = r.tensors[-1]
    return {
        "magic": 3,
        "version": 6,
        "counts": 20,
        "first-key": fields[0].offset + 10,
        "tokens": tokens.offset + 200,
        "last-key": fields[-1].offset + 12,
        "tensor-info": r.tensors[0].field.offset + 9,
        "data-start": r.data_offset + 1,
        "last-tensor": last.data_offset + last.n_bytes // 2,
        "last-byte": len(r.data) - 1,
    }


@pytest.mark.parametrize("where", ["magic", "version", "counts", "first-key", "tokens", "last-key",
                                   "tensor-info", "data-start", "last-tensor", "last-byte"])  # fmt: skip
def test_truncated_gguf(gguf_file, tmp_path, where):
    cut = _gguf_layout(gguf_file)[where]
    path = tmp_path / "cut.gguf"
    path.write_bytes(gguf_file.read_bytes()[:cut])
    bad(CheckpointError, path)


def test_gguf_unknown_architecture(tmp_path):
    path = tiny_llama_gguf(tmp_path / "gpt9.gguf", arch="gpt9")
    msg = bad(UnsupportedArchitectureError, path, "'gpt9'")
    assert "llama" in msg  # lists what is supported


def _rewrite_gguf(src: Path, dst: Path, change) -> Path:
    """Copy a GGUF through GGUFReader -> GGUFWriter, letting `change(metadata, tensors)` edit it on the way."""
    r = gguf.GGUFReader(src)
    metadata = {
        k: (f.contents(), f.types[0], f.types[-1]) for k, f in r.fields.items()
        if not k.startswith("GGUF.") and k != "general.architecture"
    }  # fmt: skip
    tensors = {t.name: (np.array(t.data), t.tensor_type, None) for t in r.tensors}  # None: the data's shape
    change(metadata, tensors)
    w = gguf.GGUFWriter(dst, str(r.fields["general.architecture"].contents()))
    for k, (v, vtype, sub) in metadata.items():
        w.add_key_value(k, v, vtype, sub_type=sub if vtype == V.ARRAY else None)
    for name, (data, qtype, shape) in tensors.items():
        w.add_tensor(name, data, raw_shape=shape, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


V = gguf.GGUFValueType
F32, I32 = gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.I32


@pytest.mark.parametrize(
    ("key", "value", "vtype", "error", "named"),
    [
        ("llama.block_count", 2**32 - 1, V.UINT32, CheckpointError, "missing tensor"),
        ("llama.block_count", 0, V.UINT32, ConfigError, "n_layers"),
        ("llama.embedding_length", float("inf"), V.FLOAT32, CheckpointError, "embedding_length"),
        ("llama.embedding_length", float("nan"), V.FLOAT32, CheckpointError, "embedding_length"),
        ("llama.embedding_length", "32", V.STRING, CheckpointError, "embedding_length"),
        ("llama.embedding_length", 64, V.UINT32, CheckpointError, "shape"),
        ("llama.attention.head_count", 3, V.UINT32, CheckpointError, "3 heads"),
        ("llama.attention.head_count_kv", 3, V.UINT32, ConfigError, "n_kv_heads"),
        (
            "llama.attention.layer_norm_rms_epsilon",
            "tiny",
            V.STRING,
            CheckpointError,
            "layer_norm_rms_epsilon",
        ),
        ("llama.context_length", float("inf"), V.FLOAT32, CheckpointError, "context_length"),
        ("llama.rope.freq_base", float("inf"), V.FLOAT32, CheckpointError, "rope.freq_base"),
        ("tokenizer.ggml.tokens", 320, V.UINT32, TokenizerError, "tokenizer.ggml.tokens"),
        ("tokenizer.ggml.model", "rwkv", V.STRING, TokenizerError, "'rwkv'"),
        ("tokenizer.ggml.bos_token_id", 10**6, V.UINT32, ConfigError, "bos_token_id"),
    ],
)
def test_gguf_bad_metadata(gguf_file, tmp_path, key, value, vtype, error, named):
    def change(metadata, tensors):
        metadata[key] = (value, vtype, vtype)

    path = _rewrite_gguf(gguf_file, tmp_path / "bad.gguf", change)
    bad(error, path, path, *([named] if named else []))


def test_gguf_missing_metadata(gguf_file, tmp_path):
    path = _rewrite_gguf(gguf_file, tmp_path / "bad.gguf", lambda m, t: m.pop("llama.feed_forward_length"))
    bad(CheckpointError, path, path, "llama.feed_forward_length")


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (lambda t: t.pop("blk.0.ffn_up.weight"), "'layers.0.mlp.up_proj.weight'"),
        (lambda t: t.update({"blk.0.attn_gate.weight": t["blk.0.attn_v.weight"]}), "'blk.0.attn_gate.weight'"),
        (lambda t: t.update({"blk.1.attn_v.weight": t["blk.0.attn_v.weight"]}), "'layers.1.self_attn.v_proj.weight'"),
        (lambda t: t.update({"output_norm.weight": (np.ones(16, np.float32), F32, None)}), "'norm.weight'"),
        (lambda t: t.update({"blk.0.attn_q.weight": (np.ones((30, 32), np.float32), F32, None)}),
         "'blk.0.attn_q.weight'"),
        (lambda t: t.update({"output.weight": (np.ones((VOCAB, 32), np.int32), I32, None)}), "'output.weight'"),
        (lambda t: t.update({"output_norm.weight": (np.full(32, np.inf, np.float32), F32, None)}), "infinite"),
    ],
)  # fmt: skip
def test_gguf_bad_tensors(gguf_file, tmp_path, change, named):
    path = _rewrite_gguf(gguf_file, tmp_path / "bad.gguf", lambda m, t: change(t))
    bad(CheckpointError, path, path, named)


def test_gguf_tensor_claims_2_to_the_40_elements(gguf_file, tmp_path):
    """A tensor whose dims claim far more bytes than the file holds fails its bounds check, allocating nothing."""

    def change(metadata, tensors):
        data, qtype, _ = tensors["output_norm.weight"]
        tensors["output_norm.weight"] = (data, qtype, [2**20, 2**20])  # 2^40 F32 elements, 128 bytes of data

    path = _rewrite_gguf(gguf_file, tmp_path / "huge.gguf", change)
    bad(CheckpointError, path, path, "output_norm.weight")


def _patched(src: Path, dst: Path, old: bytes, new: bytes) -> Path:
    data = src.read_bytes()
    assert data.count(old) == 1
    dst.write_bytes(data.replace(old, new))
    return dst


def test_gguf_nested_arrays(tmp_path):
    """An array nested thousands deep (12 bytes a level) is refused, not a RecursionError."""
    path = tiny_llama_gguf(tmp_path / "ok.gguf")
    depth = 5000
    nested = (
        b"".join(struct.pack("<IQ", V.ARRAY, 1) for _ in range(depth))
        + struct.pack("<IQ", V.UINT8, 1)
        + b"\0"
    )
    key = b"general.nested"
    kv = struct.pack("<Q", len(key)) + key + struct.pack("<I", V.ARRAY) + nested
    data = bytearray(path.read_bytes())
    n_kv = struct.unpack_from("<Q", data, 16)[0]
    struct.pack_into("<Q", data, 16, n_kv + 1)
    path.write_bytes(bytes(data[:24]) + kv + bytes(data[24:]))  # the first key/value sits at byte 24
    bad(CheckpointError, path, path)


def test_gguf_duplicate_tensor_with_newline(gguf_file, tmp_path):
    """Names read from the file (a tensor's, with a newline) still make a one-line message."""

    def change(metadata, tensors):
        tensors["x\ny.weight"] = tensors["x\nz.weight"] = tensors["output_norm.weight"]

    src = _rewrite_gguf(gguf_file, tmp_path / "ok.gguf", change)
    path = _patched(src, tmp_path / "dup.gguf", b"x\nz.weight", b"x\ny.weight")
    bad(CheckpointError, path, path, "duplicate")
