"""Bad input to `omni_model.load`: one typed OmniError with a one-line message naming the file, never a crash.

Hand-made cases cover missing, empty, foreign, truncated and inconsistent checkpoints of every kind
(folder, sharded folder, GGUF, zoo name). Hypothesis then corrupts a tiny valid GGUF and a tiny
safetensors folder: every example must load or raise an OmniError, within a timeout, so a hang fails
the test instead of blocking CI. A tiny GGUF written from a transformers Llama checks the GGUF path
end to end: logits within 1e-4 of transformers.
"""

from __future__ import annotations

import itertools
import json
import pickle
import shutil
import struct
import threading
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import omni_model
from omni_model import (
    ZOO,
    CheckpointError,
    ConfigError,
    OmniError,
    TokenizerError,
    UnsupportedArchitectureError,
)

from .tiny import VOCAB, save_tiny
from .tiny_gguf import gguf_from_hf, tiny_llama_gguf

TIMEOUT_S = 10.0


def load_within(source: str | Path, seconds: float = TIMEOUT_S) -> omni_model.LoadedModel:
    """omni_model.load on a daemon thread: a hang fails the test and cannot keep the process alive."""
    out: dict[str, object] = {}

    def run() -> None:
        try:
            out["model"] = omni_model.load(source)
        except BaseException as e:  # handed to the test thread, which judges it
            out["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        pytest.fail(f"load({source}) still running after {seconds:.0f} s")
    if "error" in out:
        raise out["error"]  # type: ignore[misc]
    return out["model"]  # type: ignore[return-value]


def bad(exc_type: type[OmniError], source: str | Path, *names: object) -> str:
    """Check that load(source) raises exactly `exc_type` with a one-line message naming each of `names`."""
    with pytest.raises(OmniError) as info:
        load_within(source)
    err = info.value
    assert type(err) is exc_type, f"{type(err).__name__}: {err}"
    msg = str(err)
    assert msg and "\n" not in msg and "\r" not in msg, repr(msg)
    for name in names or (source,):
        assert str(name) in msg, f"{name} not in {msg!r}"
    return msg


# ---- fixtures: a tiny HF folder and a tiny GGUF, built once -------------------------------------------


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hf") / "tiny"
    save_tiny("llama", folder)
    return folder


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory) -> Path:
    return tiny_llama_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


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


# ---- fuzzing ---------------------------------------------------------------------------------------------

_example = itertools.count()
_sometimes = st.sampled_from([True, False, False, False])


def _offset(start: int, end: int) -> st.SearchStrategy[int]:
    """A position in [start, end), uniform (st.integers favours the ends: here, truncation to nothing)."""
    return st.sampled_from(range(start, end))


_INTERESTING = [0, 1, 2, 3, 7, 0x7F, 0x80, 0xFF, 0x100, 0xFFFF, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40,
                2**62, 2**63, 2**64 - 1]  # fmt: skip


def _gguf_landmarks(path: Path) -> list[tuple[int, int]]:
    """(offset, size) of every count, length, type and offset field of the GGUF (the uint32/uint64 parts)."""
    r = gguf.GGUFReader(path)
    base = r.data.__array_interface__["data"][0]
    out = set()
    for f in [*r.fields.values(), *(t.field for t in r.tensors)]:
        for part in f.parts:
            if part.dtype.kind == "u" and part.dtype.itemsize in (4, 8):
                start = part.__array_interface__["data"][0] - base
                out.update((start + i * part.dtype.itemsize, part.dtype.itemsize) for i in range(part.size))
    return sorted(out)


def _check_fuzzed(source: Path) -> None:
    try:
        load_within(source)
    except OmniError as e:
        msg = str(e)
        assert msg and "\n" not in msg, repr(msg)
        assert str(source) in msg, msg


@pytest.fixture(scope="module")
def fuzz_gguf(gguf_file) -> tuple[bytes, list[tuple[int, int]], int]:
    load_within(gguf_file)  # the baseline loads (and first-use costs are paid outside the fuzzing)
    data = gguf_file.read_bytes()
    return data, _gguf_landmarks(gguf_file), gguf.GGUFReader(gguf_file).data_offset


@settings(
    max_examples=1000,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(st.data())
def test_fuzz_gguf(fuzz_gguf, tmp_path, data):
    """Corrupted GGUF (counts, lengths and types above all, any byte, truncation): loads or raises an OmniError."""
    original, landmarks, data_offset = fuzz_gguf
    buf = bytearray(original)
    for _ in range(data.draw(st.integers(1, 4), label="edits")):
        kind = data.draw(st.sampled_from(["landmark", "metadata-byte", "any-byte"]), label="kind")
        if kind == "landmark":
            offset, size = data.draw(st.sampled_from(landmarks), label="field")
            (old,) = struct.unpack_from("<Q" if size == 8 else "<I", buf, offset)
            value = data.draw(st.sampled_from(_INTERESTING) | st.integers(old - 2, old + 2), label="value")
            buf[offset : offset + size] = (value % 2 ** (8 * size)).to_bytes(size, "little")
        else:
            end = data_offset if kind == "metadata-byte" else len(buf)
            offset = data.draw(_offset(8, end), label="offset")  # the magic and version stay, mostly
            buf[offset] = data.draw(st.integers(0, 255), label="byte")
    if data.draw(_sometimes, label="truncate"):
        del buf[data.draw(_offset(0, len(buf)), label="length") :]
    path = tmp_path / f"fuzz{next(_example)}.gguf"
    path.write_bytes(bytes(buf))
    _check_fuzzed(path)
    path.unlink()


@pytest.fixture(scope="module")
def fuzz_folder(tmp_path_factory) -> dict[str, bytes]:
    """The files of a small HF folder (one layer, dim 32), to corrupt."""
    folder = tmp_path_factory.mktemp("fuzz-hf") / "model"
    save_tiny("llama", folder, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
              num_attention_heads=2, num_key_value_heads=1, vocab_size=260)  # fmt: skip
    load_within(folder)
    return {p.name: p.read_bytes() for p in folder.iterdir()}


_DTYPES = ["F32", "F16", "BF16", "F64", "I64", "I32", "I16", "I8", "U8", "U16", "U32", "U64", "BOOL",
           "F8_E4M3", "F8_E5M2", "F8_E8M0", "F4", "F6_E2M3", "C64", "XX", ""]  # fmt: skip
_JSON_VALUES = st.one_of(
    st.none(), st.booleans(), st.sampled_from(_INTERESTING), st.integers(-(2**70), 2**70), st.text(max_size=8),
    st.lists(st.sampled_from([*_INTERESTING, -1]), max_size=4), st.floats(allow_nan=False),
    st.sampled_from(["default", "linear", "dynamic", "yarn", "llama3", "sliding_attention", "llama", "qwen2"]),
)  # fmt: skip


_ROPE_KEYS = ["rope_type", "type", "rope_theta", "factor", "original_max_position_embeddings", "low_freq_factor",
              "high_freq_factor", "beta_fast", "beta_slow", "attention_factor", "partial_rotary_factor"]  # fmt: skip


def _edit_safetensors_header(raw: bytes, data) -> bytes:
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    name = data.draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")), label="tensor")
    entry = data.draw(st.sampled_from(["dtype", "shape", "data_offsets"]), label="entry")
    if entry == "dtype":
        header[name][entry] = data.draw(st.sampled_from(_DTYPES) | _JSON_VALUES, label="dtype")
    else:
        header[name][entry] = data.draw(_JSON_VALUES, label=entry)
    new = json.dumps(header).encode()
    return struct.pack("<Q", len(new)) + new + raw[8 + n :]


@settings(
    max_examples=600,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(st.data())
def test_fuzz_hf_folder(fuzz_folder, tmp_path, data):
    """Corrupted safetensors (header above all), config.json or tokenizer.json: loads or raises an OmniError."""
    files = dict(fuzz_folder)
    kinds = [
        "header-entry",
        "header-byte",
        "header-byte",
        "any-byte",
        "config-entry",
        "config.json",
        "tokenizer.json",
    ]
    kind = data.draw(st.sampled_from(kinds), label="kind")
    name = (
        kind if kind.endswith(".json") else "config.json" if kind == "config-entry" else "model.safetensors"
    )
    buf = bytearray(files[name])
    if kind == "header-entry":
        buf = bytearray(_edit_safetensors_header(bytes(buf), data))
    elif kind == "config-entry":
        cfg = json.loads(buf)
        key = data.draw(
            st.sampled_from([*sorted(cfg), "rope_scaling", "layer_types", "sliding_window"]), label="key"
        )
        cfg[key] = data.draw(
            _JSON_VALUES | st.dictionaries(st.sampled_from(_ROPE_KEYS), _JSON_VALUES), label="value"
        )
        buf = bytearray(json.dumps(cfg).encode())
    else:
        end = 8 + struct.unpack("<Q", buf[:8])[0] if kind == "header-byte" else len(buf)
        for _ in range(data.draw(st.integers(1, 4), label="edits")):
            buf[data.draw(_offset(0, end), label="offset")] = data.draw(st.integers(0, 255), label="byte")
    if data.draw(_sometimes, label="truncate"):
        del buf[data.draw(_offset(0, len(buf)), label="length") :]
    files[name] = bytes(buf)
    folder = tmp_path / f"fuzz{next(_example)}"
    folder.mkdir()
    for fname, content in files.items():
        (folder / fname).write_bytes(content)
    _check_fuzzed(folder)
    shutil.rmtree(folder)
