"""Bounds-checked GGUF reading on top of the `gguf` package's reader.

GGUF files are untrusted input. `gguf.GGUFReader` memory-maps the file and trusts its counts: a read
past the end yields an empty array instead of an error, so a corrupted array length can spin for
billions of iterations. `_CheckedReader` makes every read past the end, every array longer than the
bytes left could hold, nested arrays (unbounded recursion) and every tensor larger than the file (in
exact integers, before any allocation) an error, so a corrupted file fails fast with `CheckpointError`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGUFReader, GGUFValueType, ReaderTensor
from gguf.quants import dequantize

from omni_model.errors import CheckpointError

GGUF_MAGIC = b"GGUF"


class _Truncated(ValueError):
    pass


# Bytes an array element takes at least: a string is its 8-byte length before any text.
_MIN_SIZE = {int(t): np.dtype(d).itemsize for t, d in GGUFReader.gguf_scalar_to_np.items()} | {
    int(GGUFValueType.STRING): 8
}


class _CheckedReader(GGUFReader):
    def _get(self, offset, dtype, count=1, override_order=None):
        count = int(count)
        itemsize = np.dtype(dtype).itemsize
        if count < 0 or offset < 0 or offset + itemsize * count > len(self.data):
            raise _Truncated(f"reading {count} x {np.dtype(dtype).name} at byte {offset} runs past the end")
        return super()._get(offset, dtype, count, override_order)

    def _get_field_parts(self, orig_offs, raw_type):
        if int(raw_type) == GGUFValueType.ARRAY:
            item_type = int(self._get(orig_offs, np.uint32)[0])
            n = int(self._get(orig_offs + 4, np.uint64)[0])
            if item_type == GGUFValueType.ARRAY:  # llama.cpp has none; unbounded nesting would recurse
                raise _Truncated(f"array at byte {orig_offs} holds arrays (nested arrays are not supported)")
            if n * _MIN_SIZE.get(item_type, 1) > len(self.data) - orig_offs - 12:
                raise _Truncated(f"array at byte {orig_offs} claims {n} elements")
        return super()._get_field_parts(orig_offs, raw_type)

    def _build_fields(self, offs, count):
        if int(count) > len(self.data):
            raise _Truncated(f"header claims {int(count)} metadata entries")
        return super()._build_fields(offs, count)

    def _build_tensor_info(self, offs, count):
        if int(count) > len(self.data):
            raise _Truncated(f"header claims {int(count)} tensors")
        return super()._build_tensor_info(offs, count)

    def _build_tensors(self, start_offs, fields):
        # Sizes in exact integers: the parent's np.prod of uint64 dims wraps around (2^32 x 2^32 -> 0).
        for field in fields:
            _, name, _, dims, raw_dtype, offset = field.parts
            sizes = GGML_QUANT_SIZES.get(int(raw_dtype[0]))  # unknown types fail in the parent
            n = math.prod(int(d) for d in dims)
            if sizes and start_offs + int(offset[0]) + n * sizes[1] // sizes[0] > len(self.data):
                name = bytes(name).decode("utf-8", "replace")
                raise _Truncated(f"tensor {name!r} of {n} elements runs past the end of the file")
        return super()._build_tensors(start_offs, fields)


@dataclass
class GGUFFile:
    """Metadata as plain Python values and the tensors (still in their stored encoding)."""

    path: Path
    metadata: dict[str, Any]
    tensors: dict[str, ReaderTensor]

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def tensor(self, name: str) -> torch.Tensor:
        """Dequantize one tensor to float32 in PyTorch (out_features, in_features) order."""
        t = self.tensors.get(name)
        if t is None:
            raise CheckpointError(f"{self.path}: tensor {name!r} is missing")
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # GGUF lists dims fastest-first
        try:
            with np.errstate(all="ignore"):  # NaN/inf scales are reported below, not warned about
                arr = dequantize(t.data, t.tensor_type)
                arr = np.asarray(arr, dtype=np.float32).reshape(shape)
        except (ValueError, NotImplementedError, TypeError) as e:
            raise CheckpointError(f"{self.path}: tensor {name!r} of type {t.tensor_type.name}: {e}") from None
        if not np.isfinite(arr).all():
            raise CheckpointError(f"{self.path}: tensor {name!r} holds NaN or infinite values")
        return torch.from_numpy(arr.copy())


def is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def read_gguf(path: str | Path) -> GGUFFile:
    """Open a GGUF file (memory-mapped); raises CheckpointError for anything malformed."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if not is_gguf(path):
        raise CheckpointError(f"{path}: not a GGUF file (the first bytes are not 'GGUF')")
    try:
        reader = _CheckedReader(path, "r")
        metadata = {k: _field_value(f) for k, f in reader.fields.items() if not k.startswith("GGUF.")}
        tensors = {t.name: t for t in reader.tensors}
    except _Truncated as e:
        raise CheckpointError(f"{path}: truncated or corrupt GGUF: {e}") from None
    except (ValueError, KeyError, IndexError, OverflowError, UnicodeDecodeError, TypeError, MemoryError) as e:
        # Names read from the file (keys, tensors) may hold newlines; the message stays one line.
        reason = " ".join(str(e).split())
        raise CheckpointError(f"{path}: corrupt GGUF: {type(e).__name__}: {reason}") from None
    for t in tensors.values():
        if t.data_offset + t.n_bytes > len(reader.data):
            raise CheckpointError(f"{path}: tensor {t.name!r} runs past the end of the file (truncated?)")
    return GGUFFile(path, metadata, tensors)


def _field_value(field) -> Any:
    value = field.contents()
    if isinstance(value, np.generic):
        value = value.item()
    return value
