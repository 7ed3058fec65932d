"""Paged KV cache: resident memory under a byte budget, cold pages spilled to a memory-mapped file.

A page holds `page_tokens` tokens of one layer's keys and values. Each layer's page table maps a
logical page to a slot of a preallocated RAM pool (budget_bytes // page_bytes slots) or to its fixed
place in one spill file; when the pool is full the least recently used page leaves for the file,
written back only if it changed since it was loaded. The file is laid out in blocks of about 1 MiB
per layer, so one layer's pages sit together on disk: reads are sequential and the prefetch hint
(madvise WILLNEED on the next layer's spilled pages, issued after each layer) is a few calls.

`update` returns one layer's keys and values gathered into fresh contiguous tensors. That transient
(`transient_bytes`) is the memory used beyond the budget; it is freed once attention is done with it.
The page table is vLLM's (Kwon et al. 2023, PagedAttention); offloading to disk follows FlexGen.
The cache lives on the CPU: the pool is RAM, the file is mapped memory.
"""

from __future__ import annotations

import mmap
import os
import shutil
import sys
import tempfile
from collections import OrderedDict
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path

import torch
from torch import Tensor

from omni_kv.protocol import KVCacheError, SequenceCache, check_dims

_BLOCK_BYTES = 1 << 20  # file bytes per layer per block: one layer's pages lie together in it
_GATHER_PAGES = 32  # pool pages gathered per op: bounds the scratch an update holds besides its output
_WILLNEED = getattr(mmap, "MADV_WILLNEED", None)  # Linux and macOS; elsewhere there is no prefetch
_DONTNEED = getattr(mmap, "MADV_DONTNEED", None)


@dataclass(frozen=True)
class PagedStats:
    """Counters since the cache was made, and its sizes now."""

    resident_pages: int  # pages in the pool
    spilled_pages: int  # pages that live only in the spill file
    page_faults: int  # pages read from the file
    evictions: int  # pages moved out of the pool
    writebacks: int  # evictions that wrote the page (it had changed since it was loaded)
    prefetch_hints: int  # spilled pages hinted to the OS ahead of their layer
    resident_bytes: int  # pool bytes holding pages
    file_bytes: int  # size of the spill file


class PagedKVCache(SequenceCache):
    def __init__(
        self,
        n_layers: int,
        n_kv_heads: int,
        head_dim: int,
        *,
        batch_size: int = 1,
        dtype: torch.dtype = torch.float32,
        v_head_dim: int | None = None,
        page_tokens: int = 64,
        budget_bytes: int,
        spill_dir: str | Path | None = None,
        prefetch: bool = True,
    ) -> None:
        check_dims(n_layers=n_layers, n_kv_heads=n_kv_heads, head_dim=head_dim, batch_size=batch_size)
        if page_tokens <= 0:
            raise KVCacheError(f"page_tokens must be positive, got {page_tokens}")
        dv = v_head_dim or head_dim
        self._token_bytes = batch_size * n_kv_heads * (head_dim + dv) * dtype.itemsize  # one layer
        self.page_bytes = page_tokens * self._token_bytes
        if budget_bytes < n_layers * self._token_bytes:
            raise KVCacheError(
                f"budget_bytes={budget_bytes} is below one token's cache over all layers "
                f"({n_layers * self._token_bytes} bytes)"
            )
        if budget_bytes < 2 * self.page_bytes:
            raise KVCacheError(
                f"budget_bytes={budget_bytes} is below the 2 pages a pool needs "
                f"({2 * self.page_bytes} bytes at page_tokens={page_tokens})"
            )
        self.n_layers, self.page_tokens, self.dtype, self.prefetch = n_layers, page_tokens, dtype, prefetch
        self._bhd = (batch_size, n_kv_heads, head_dim, dv)
        self.n_slots = budget_bytes // self.page_bytes
        # The pool: slot s holds one page of keys and one of values, (B, Hkv, page_tokens, Dh) each.
        # torch.empty leaves untouched slots uncommitted, so a generous budget costs nothing until used.
        self._kpool = torch.empty(self.n_slots, batch_size, n_kv_heads, page_tokens, head_dim, dtype=dtype)
        self._vpool = torch.empty(self.n_slots, batch_size, n_kv_heads, page_tokens, dv, dtype=dtype)
        self._table: list[list[int]] = [[] for _ in range(n_layers)]  # page -> pool slot, or -1: in the file
        self._lru: OrderedDict[tuple[int, int], int] = OrderedDict()  # resident (layer, page) -> slot
        self._free = list(range(self.n_slots - 1, -1, -1))
        self._dirty = [False] * self.n_slots  # changed since loaded: the file copy is stale
        self._faults = self._evictions = self._writebacks = self._hints = 0
        # The spill file: `block` pages per layer per block, blocks appended as pages are spilled.
        self._block = max(1, _BLOCK_BYTES // self.page_bytes)
        self._tmpdir = tempfile.mkdtemp(prefix="omni-kv-") if spill_dir is None else None
        fd, path = tempfile.mkstemp(prefix="omni-kv-", suffix=".spill", dir=self._tmpdir or spill_dir)
        self._fd: int | None = fd
        self.spill_path = Path(path)
        self._mm: mmap.mmap | None = None
        self._blocks = 0
        self._fk = self._fv = torch.empty(0)  # (blocks, n_layers, block, B, Hkv, page_tokens, Dh) views
        self._touched: list[tuple[int, int]] = []  # file byte ranges this update mapped in
        self._len = 0

    def _room(self) -> int:
        return sys.maxsize  # the spill file grows as needed

    def nbytes(self) -> int:
        """Bytes of the pool (allocated, whether or not its slots hold pages); the file is not counted."""
        return self.n_slots * self.page_bytes

    def bytes_per_token(self) -> int:
        """Bytes one cached token takes over all layers (keys and values, the whole batch)."""
        return self.n_layers * self._token_bytes

    def transient_bytes(self, seq_len: int) -> int:
        """Bytes an update allocates beyond the budget at `seq_len` tokens: one layer's keys and values,
        plus the scratch of one gather from the pool (up to `_GATHER_PAGES` pages of keys or values)."""
        b, h, dk, dv = self._bhd
        scratch = min(_GATHER_PAGES, seq_len // self.page_tokens) * self.page_tokens * b * h * max(dk, dv)
        return seq_len * self._token_bytes + scratch * self.dtype.itemsize

    @property
    def stats(self) -> PagedStats:
        pages = sum(len(t) for t in self._table)
        resident = len(self._lru)
        return PagedStats(
            resident_pages=resident,
            spilled_pages=pages - resident,
            page_faults=self._faults,
            evictions=self._evictions,
            writebacks=self._writebacks,
            prefetch_hints=self._hints,
            resident_bytes=resident * self.page_bytes,
            file_bytes=len(self._mm) if self._mm is not None else 0,
        )

    # --- the spill file ---

    def _record(self, layer: int, page: int) -> int:
        """Index of (layer, page)'s record in the file, in page_bytes units; it never moves."""
        return ((page // self._block) * self.n_layers + layer) * self._block + page % self._block

    def _grow_file(self, blocks: int) -> None:
        blocks = max(blocks, 2 * self._blocks)  # doubling: O(log n) remaps over a generation
        self._fk = self._fv = torch.empty(0)  # the views point into the old mapping: drop them first
        if self._mm is not None:
            self._mm.close()
        size = blocks * self.n_layers * self._block * self.page_bytes
        os.ftruncate(self._fd, size)  # sparse: disk is only used where pages are written
        self._mm = mmap.mmap(self._fd, size)
        b, h, dk, dv = self._bhd
        rec = torch.frombuffer(self._mm, dtype=self.dtype).view(blocks, self.n_layers, self._block, -1)
        ke = b * h * self.page_tokens * dk  # a record is the page's keys, then its values
        self._fk = rec[..., :ke].unflatten(-1, (b, h, self.page_tokens, dk))
        self._fv = rec[..., ke:].unflatten(-1, (b, h, self.page_tokens, dv))
        self._blocks = blocks

    def _file_page(self, layer: int, page: int) -> tuple[Tensor, Tensor]:
        blk, i = divmod(page, self._block)
        self._touch(layer, page, 1)
        return self._fk[blk, layer, i], self._fv[blk, layer, i]  # (B, Hkv, page_tokens, Dh) views

    def _touch(self, layer: int, page: int, n: int) -> None:
        """Note that n records from (layer, page) on (one block) were read or written through the map."""
        start = self._record(layer, page) * self.page_bytes
        self._touched.append((start, start + n * self.page_bytes))

    def _unmap_touched(self) -> None:
        """Drop the file pages this update touched from the process's page tables. Touched pages of a
        shared mapping count as the process's resident memory until unmapped; the kernel keeps their
        contents (written ones included) in the page cache and on disk, so nothing is lost, and the
        budget bounds what the cache holds resident."""
        if _DONTNEED is None or self._mm is None:
            self._touched.clear()
            return
        size = len(self._mm)
        for start, end in sorted(self._touched):
            start -= start % mmap.PAGESIZE
            end = min(size, -(-end // mmap.PAGESIZE) * mmap.PAGESIZE)
            if end > start:
                self._mm.madvise(_DONTNEED, start, end - start)
        self._touched.clear()

    def _hint(self, layer: int, seq_len: int) -> None:
        """Ask the OS to read `layer`'s spilled pages ahead (asynchronously), merging adjacent records."""
        if _WILLNEED is None or self._mm is None:
            return
        tab = self._table[layer]
        spans: list[list[int]] = []
        for page in range(min(len(tab), -(-seq_len // self.page_tokens))):
            if tab[page] < 0:
                start = self._record(layer, page) * self.page_bytes
                if spans and spans[-1][1] == start:
                    spans[-1][1] += self.page_bytes
                else:
                    spans.append([start, start + self.page_bytes])
                self._hints += 1
        for start, end in spans:
            start -= start % mmap.PAGESIZE  # madvise wants a page-aligned start
            self._mm.madvise(_WILLNEED, start, end - start)

    # --- the pool ---

    def _take_slot(self) -> int:
        """A free slot, evicting the least recently used page (written back if dirty) when none is."""
        if self._free:
            return self._free.pop()
        (layer, page), slot = self._lru.popitem(last=False)
        if self._dirty[slot]:
            if page // self._block >= self._blocks:
                self._grow_file(page // self._block + 1)
            fk, fv = self._file_page(layer, page)
            fk.copy_(self._kpool[slot])
            fv.copy_(self._vpool[slot])
            self._writebacks += 1
        self._table[layer][page] = -1
        self._evictions += 1
        return slot

    def _place(self, layer: int, page: int, slot: int) -> None:
        self._table[layer][page] = slot
        self._lru[(layer, page)] = slot
        self._dirty[slot] = False

    def _resident(self, layer: int, page: int, load: bool) -> int:
        """The slot holding (layer, page), bringing the page in (read from the file if `load`) if out."""
        tab = self._table[layer]
        if page < len(tab) and tab[page] >= 0:
            self._lru.move_to_end((layer, page))
            return tab[page]
        slot = self._take_slot()
        if page == len(tab):
            tab.append(slot)  # a new page: nothing to read
        elif load:
            fk, fv = self._file_page(layer, page)
            self._kpool[slot].copy_(fk)
            self._vpool[slot].copy_(fv)
            self._faults += 1
        self._place(layer, page, slot)
        return slot

    # --- the protocol ---

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k, v (B, Hkv, T, Dh) for `layer` after seq_len; return all keys/values (B, Hkv, S, Dh).

        The returned tensors are a fresh contiguous copy (see `transient_bytes`), not views of the cache."""
        if self._fd is None:
            raise KVCacheError("the paged cache is closed")
        b, h, dk, dv = self._bhd
        if not 0 <= layer < self.n_layers:
            raise KVCacheError(f"layer {layer} is out of range for a cache of {self.n_layers} layers")
        t = k.shape[2] if k.dim() == 4 else -1
        if k.shape != (b, h, t, dk) or v.shape != (b, h, t, dv):
            raise KVCacheError(
                f"layer {layer}: keys {tuple(k.shape)} / values {tuple(v.shape)} do not fit a cache of "
                f"(batch, heads, dim, v_dim) = {self._bhd}"
            )
        if self._len > len(self._table[layer]) * self.page_tokens:
            raise KVCacheError(f"layer {layer} was not written up to position {self._len}")
        p = self.page_tokens
        pos, end = self._len, self._len + k.shape[2]
        while pos < end:  # page by page: a write can cross page boundaries
            page, off = divmod(pos, p)
            n = min(p - off, end - pos)
            slot = self._resident(layer, page, load=off > 0)  # from the page start, no old token is kept
            i = pos - self._len
            self._kpool[slot, :, :, off : off + n] = k[:, :, i : i + n]
            self._vpool[slot, :, :, off : off + n] = v[:, :, i : i + n]
            self._dirty[slot] = True
            pos += n
        out = self._gather(layer, end)
        self._unmap_touched()
        if self.prefetch:
            self._hint((layer + 1) % self.n_layers, end)
        return out

    def _gather(self, layer: int, s: int) -> tuple[Tensor, Tensor]:
        """Copy `layer`'s first s tokens out of the pool and the file, then keep its last pages resident."""
        b, h, dk, dv = self._bhd
        p, tab = self.page_tokens, self._table[layer]
        q, r = divmod(s, p)  # q full pages, then r tokens of a last one
        k = torch.empty(b, h, s, dk, dtype=self.dtype)
        v = torch.empty(b, h, s, dv, dtype=self.dtype)
        k5 = k[:, :, : q * p].unflatten(2, (q, p))  # (B, Hkv, q, P, Dh): a view of the full pages
        v5 = v[:, :, : q * p].unflatten(2, (q, p))
        # Runs of consecutive pages that sit together: in the pool (key -1), or in one block of the file.
        for blk, run in groupby(range(q), key=lambda i: -1 if tab[i] >= 0 else i // self._block):
            pages = list(run)
            if blk >= 0:  # the records lie side by side: one strided copy straight from the mapping
                a, z = pages[0] % self._block, pages[-1] % self._block + 1
                kf, vf = self._fk[blk, layer, a:z], self._fv[blk, layer, a:z]  # (n, B, Hkv, P, Dh)
                self._touch(layer, pages[0], len(pages))
                k5[:, :, pages[0] : pages[-1] + 1] = kf.permute(1, 2, 0, 3, 4)  # -> (B, Hkv, n, P, Dh)
                v5[:, :, pages[0] : pages[-1] + 1] = vf.permute(1, 2, 0, 3, 4)
                self._faults += len(pages)
                continue
            for c in range(0, len(pages), _GATHER_PAGES):  # slots are scattered: gather them, in chunks
                chunk = pages[c : c + _GATHER_PAGES]
                src = torch.tensor([tab[i] for i in chunk])
                k5[:, :, chunk[0] : chunk[-1] + 1] = self._kpool.index_select(0, src).permute(1, 2, 0, 3, 4)
                v5[:, :, chunk[0] : chunk[-1] + 1] = self._vpool.index_select(0, src).permute(1, 2, 0, 3, 4)
        if r:
            if tab[q] >= 0:
                kt, vt = self._kpool[tab[q]], self._vpool[tab[q]]
            else:
                kt, vt = self._file_page(layer, q)
                self._faults += 1
            k[:, :, q * p :] = kt[:, :, :r]
            v[:, :, q * p :] = vt[:, :, :r]

        # End as a page-order scan through an LRU pool would: this layer's pages most recent, its last
        # n_slots resident. Touching its resident pages in order first makes its older pages (already
        # copied out) the victims after other layers', never the pages being kept.
        n = q + (r > 0)
        for i in range(n):
            if tab[i] >= 0:
                self._lru.move_to_end((layer, i))
        for i in range(max(0, n - self.n_slots), n):
            if tab[i] < 0:  # read from the file above: copy it in from the output, no second read
                slot = self._take_slot()
                t0, t1 = i * p, min(i * p + p, s)
                self._kpool[slot, :, :, : t1 - t0] = k[:, :, t0:t1]
                self._vpool[slot, :, :, : t1 - t0] = v[:, :, t0:t1]
                self._place(layer, i, slot)
        return k, v

    # --- lifetime ---

    def close(self) -> None:
        """Unmap and delete the spill file (and its directory when the cache made one); idempotent."""
        if getattr(self, "_fd", None) is None:
            return
        self._fk = self._fv = torch.empty(0)  # no tensor may point into the mapping once it is gone
        if self._mm is not None:
            self._mm.close()
            self._mm = None
        os.close(self._fd)
        self._fd = None
        self.spill_path.unlink(missing_ok=True)
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)

    def __enter__(self) -> PagedKVCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()
