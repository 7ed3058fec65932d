"""Hypothesis corrupts a tiny valid GGUF and a tiny safetensors folder at random: every example must
load or raise an OmniError with a one-line message naming the file, within a timeout, so a hang fails
the test instead of blocking CI.
"""

from __future__ import annotations

import itertools
import json
import shutil
import struct
from pathlib import Path

import gguf
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from omni_model import OmniError

from .loading import load_within
from .tiny import save_tiny

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
