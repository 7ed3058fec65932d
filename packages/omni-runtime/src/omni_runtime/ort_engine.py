"""The ONNX Runtime engine: runs an omni_export folder with onnxruntime, numpy and nothing else.

The KV cache is one preallocated (1, kv_heads, max_seq_len, head_dim) buffer per layer for keys
and one for values. Each call binds a layer's buffer both as its `past` input and as its `present`
output (I/O binding), so GroupQueryAttention writes the new tokens in place and decoding copies
no cache: a step moves the new token's ids in and one row of logits out. The attention mask's
width tells the graph how many cached tokens are valid; rolling back is moving that mark. An export
with an int8 cache (manifest kv.dtype "int8") takes uint8 codes with float16 scales and offsets: the
engine binds its buffers as the graph's past inputs and copies the new tokens' codes in after each
call (a few hundred bytes per token and layer). Latent-attention exports (manifest kv.layout "latent")
work the same way with float32 buffers: per layer, (1, 1, max_seq_len, latent_dim) latents as `key`
and (1, 1, max_seq_len, rope_dim) rotary keys as `value`. A graph with a `media_embeds` input takes
encoder features for its placeholder tokens through `forward(..., media_embeds=)`; zeros otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from omni_model.files import read_json
from omni_runtime.engine import EngineError

MANIFEST = "manifest.json"
FORMAT = "omnicoder-onnx"
KV_PARTS = {"float32": ("key", "value"),
            "int8": ("key", "key_scale", "key_offset", "value", "value_scale", "value_offset")}  # fmt: skip


def read_manifest(folder: Path) -> dict[str, Any]:
    """The folder's manifest.json, checked for the fields an engine needs."""
    path = Path(folder) / MANIFEST
    if not Path(folder).is_dir():
        raise EngineError(f"{folder}: no such folder")
    if not path.is_file():
        raise EngineError(f"{folder}: no {MANIFEST} (not an exported model folder; see press-play export)")
    m = read_json(path, EngineError)
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise EngineError(f"{path}: not an OmniCoder ONNX manifest (format is not {FORMAT!r})")
    try:
        kv, cfg = m["kv"], m["config"]
        layout = kv.get("layout", "heads")  # manifests before latent attention have no layout: heads
        if layout not in ("heads", "latent"):
            raise EngineError(f"{path}: kv.layout must be 'heads' or 'latent', got {layout!r}")
        sizes = ("n_kv_heads", "head_dim") if layout == "heads" else ("latent_dim", "rope_dim")
        for key in ("n_layers", *sizes):
            if not isinstance(kv[key], int) or isinstance(kv[key], bool) or kv[key] <= 0:
                raise EngineError(f"{path}: kv.{key} must be a positive integer, got {kv[key]!r}")
        if not isinstance(m["max_seq_len"], int) or m["max_seq_len"] <= 0:
            raise EngineError(f"{path}: max_seq_len must be a positive integer, got {m['max_seq_len']!r}")
        for key in ("vocab_size", "dim"):
            if not isinstance(cfg[key], int) or isinstance(cfg[key], bool) or cfg[key] <= 0:
                raise EngineError(f"{path}: config.{key} must be a positive integer")
        graph = m["graph"]
        if not isinstance(graph, str) or "/" in graph or "\\" in graph or graph.startswith("."):
            raise EngineError(f"{path}: graph must be a file name inside the folder, got {graph!r}")
    except (KeyError, TypeError) as e:
        raise EngineError(f"{path}: lacks the field {e}") from None
    if not (Path(folder) / graph).is_file():
        raise EngineError(f"{Path(folder) / graph}: no such file (named by {MANIFEST})")
    return m


ROW_BINDINGS = 17  # calls of up to this many rows keep their binding: a token and MAX_DRAFT_TOKENS drafts


class OrtEngine:
    name = "onnx"

    def __init__(
        self,
        folder: str | Path,
        *,
        threads: int = 2,
        max_seq_len: int | None = None,
        prefill_chunk: int = 128,
        spin: bool = True,
        exact: bool = False,
    ) -> None:
        """`prefill_chunk`: a long prompt runs in chunks of this many tokens. Activations scale with
        the chunk and ONNX Runtime's arena keeps its peak. On the SmolLM2 int4 benchmark (512-token
        prompt, 2 threads) 128-token chunks peak at about 283 MB against 294 MB for 256 and more for
        one 512-token call, at a prefill rate within the run-to-run noise of 256's. `spin` False: the
        session's idle threads sleep at once instead of spinning for more work (ORT's default), which a
        session that alternates with another in one process, a draft model's, needs: spinning threads
        take the cores the other session's run needs.

        `exact`: every position's logits are the same bits whichever call computes it. Each operator of
        the graph computes a row the same way whatever the row count, except GroupQueryAttention,
        which takes another kernel for a single query row (up to ~1e-6 apart; int8 activation
        rounding in the 4-bit matmuls turns that into logits up to ~1 apart). A one-token call
        therefore runs as two rows, the token and a copy of it whose cache entry is never read (except
        at the last position of the context, where the copy has no room). Greedy speculative decoding
        then reproduces plain decoding token for token; a decode step costs a second row."""
        if prefill_chunk < 1:
            raise EngineError(f"prefill_chunk must be positive, got {prefill_chunk}")
        self.prefill_chunk, self.exact = prefill_chunk, exact
        self.folder = Path(folder)
        self.manifest = m = read_manifest(self.folder)
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        if not spin:  # a second session in the same process (a draft model): idle threads must not spin
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(
                str(self.folder / m["graph"]), so, providers=["CPUExecutionProvider"]
            )
        except Exception as e:  # ORT raises its own exception types for unreadable graphs
            raise EngineError(
                f"{self.folder / m['graph']}: ONNX Runtime cannot load it: {' '.join(str(e).split())[:200]}"
            ) from None
        kv = m["kv"]
        self.n_layers, self.vocab_size = kv["n_layers"], m["config"]["vocab_size"]
        self.max_seq_len = min(max_seq_len or m["max_seq_len"], m["max_seq_len"])
        self.kv_dtype = kv.get("dtype", "float32")
        self.kv_layout = kv.get("layout", "heads")
        if self.kv_dtype not in KV_PARTS or (self.kv_layout == "latent" and self.kv_dtype != "float32"):
            raise EngineError(
                f"{self.folder / MANIFEST}: kv.dtype must be float32 or int8 (float32 for a latent cache), "
                f"got {self.kv_dtype!r}"
            )
        self.dim = m["config"]["dim"]
        self._check_io()
        # float32 heads: one buffer per layer for keys and one for values, bound as past and present (the
        # graph writes in place). int8 and latent: the graph reads the buffers and returns only the new
        # tokens' entries, which are copied in after each call.
        self._append = self.kv_dtype == "int8" or self.kv_layout == "latent"
        if self.kv_layout == "latent":
            widths = {"key": (1, kv["latent_dim"]), "value": (1, kv["rope_dim"])}
        else:
            widths = {
                part: (kv["n_kv_heads"], 1 if "_" in part else kv["head_dim"])
                for part in KV_PARTS[self.kv_dtype]
            }
        self._buffers = [
            {part: np.zeros((1, h, self.max_seq_len, d),
                            {"float32": np.float32, "int8": np.float16 if "_" in part else np.uint8}[self.kv_dtype])
             for part, (h, d) in widths.items()}
            for _ in range(self.n_layers)
        ]  # fmt: skip
        self._kv = [
            {part: ort.OrtValue.ortvalue_from_numpy(a) for part, a in layer.items()}
            for layer in self._buffers
        ]
        self._present_names = [
            f"present.{i}.{part}" for i in range(self.n_layers) for part in KV_PARTS[self.kv_dtype]
        ]
        self._len = 0
        self._mask = np.ones((1, self.max_seq_len), np.int64)
        self._keep = {True: np.array(1, np.int64), False: np.array(0, np.int64)}
        # media_embeds rows for text-only calls (decode steps): zeros, never read at text positions
        self._no_media = np.zeros((1, max(prefill_chunk, 2) if self.has_media else 0, self.dim), np.float32)
        # Calls of up to ROW_BINDINGS rows keep one binding per row count, made once: cache buffers as
        # past and present, and the first rows of one preallocated logits (and hidden-state) buffer; a
        # call rebinds only the small inputs. Every decode step (the last position's logits: one row)
        # and every speculative verification (a token and its drafts) is such a call. float32 caches
        # only for several rows: int8 and latent caches bind fresh outputs each call anyway.
        self.hidden_size = m["config"].get("dim") if self.has_hidden else None
        self._rows_logits = np.zeros((1, ROW_BINDINGS, self.vocab_size), np.float32)
        self._rows_hidden = np.zeros((1, ROW_BINDINGS, self.hidden_size or 0), np.float32)
        self._row_bindings: dict[int, ort.SessionIOBinding] = {}
        self._row_binding(1)
        self._hidden = np.zeros(
            (0, self.hidden_size or 0), np.float32
        )  # the last call's, when the graph has them

    def _bind(self, rows: int | None) -> ort.SessionIOBinding:
        """Cache buffers bound as past and present; logits (and hidden states) into the first `rows`
        rows of the preallocated buffers, or, with None, into fresh outputs."""
        b = self.session.io_binding()
        if rows is None:
            b.bind_output("logits", "cpu")  # first, so that it is get_outputs()[0]
        else:
            b.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(self._rows_logits[:, :rows]))
        if self.has_hidden:  # an output left unbound would still be computed and allocated
            if rows is not None:
                hidden = ort.OrtValue.ortvalue_from_numpy(self._rows_hidden[:, :rows])
                b.bind_ortvalue_output("hidden_states", hidden)
            else:
                b.bind_output("hidden_states", "cpu")  # get_outputs()[1]
        for i, layer in enumerate(self._kv):
            for part, value in layer.items():
                b.bind_ortvalue_input(f"past_key_values.{i}.{part}", value)
                if not self._append:
                    b.bind_ortvalue_output(f"present.{i}.{part}", value)
                else:
                    b.bind_output(f"present.{i}.{part}", "cpu")  # the new tokens' entries, appended by _run
        return b

    def _check_io(self) -> None:
        inputs = {i.name for i in self.session.get_inputs()}
        outputs = {o.name for o in self.session.get_outputs()}
        parts = KV_PARTS[self.kv_dtype]
        want_in = {"input_ids", "attention_mask", "logits_to_keep"} | {
            f"past_key_values.{i}.{kv}" for i in range(self.n_layers) for kv in parts
        }
        want_out = {"logits"} | {f"present.{i}.{kv}" for i in range(self.n_layers) for kv in parts}
        self.has_hidden = "hidden_states" in outputs  # exports before speculative decoding lack it
        outputs.discard("hidden_states")
        self.has_media = "media_embeds" in inputs  # exports with media placeholders
        inputs.discard("media_embeds")
        if inputs != want_in or outputs != want_out:
            missing = sorted((want_in - inputs) | (want_out - outputs)) or sorted(
                (inputs - want_in) | (outputs - want_out)
            )
            raise EngineError(
                f"{self.folder / MANIFEST}: does not match the graph ({len(missing)} names differ, e.g. {missing[0]!r})"
            )

    @property
    def seq_len(self) -> int:
        return self._len

    def forward(
        self, ids: Sequence[int], last_only: bool = True, media_embeds: np.ndarray | None = None
    ) -> np.ndarray:
        """Append `ids`; return their logits. `media_embeds` (T, D) or (1, T, D): the rows that replace
        the embeddings of placeholder tokens (rows at other positions are not read); None: zeros."""
        x = np.asarray(ids, dtype=np.int64).reshape(1, -1)
        self._check(x)
        media = self._media(media_embeds, x.shape[1])
        n = x.shape[1]
        if n > self.prefill_chunk:
            c = self.prefill_chunk
            parts = [self._run(x[:, s : s + c], last_only, _rows(media, s, c)) for s in range(0, n, c)]
            return parts[-1] if last_only else np.concatenate(parts)
        return self._run(x, last_only, media)

    def forward_hidden(
        self, ids: Sequence[int], last_only: bool = False, media_embeds: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Append `ids`; return their logits (T, V) and final-normed hidden states (T, D), or the last
        position's (1, V) and (1, D) with `last_only`; `media_embeds` as in forward."""
        if not self.has_hidden:
            raise EngineError(
                f"{self.folder}: the graph has no hidden_states output (exported before speculative decoding; "
                "export it again)"
            )
        x = np.asarray(ids, dtype=np.int64).reshape(1, -1)
        self._check(x)
        media = self._media(media_embeds, x.shape[1])
        logits, hidden = [], []
        for s in range(0, x.shape[1], self.prefill_chunk):
            logits.append(
                self._run(x[:, s : s + self.prefill_chunk], last_only, _rows(media, s, self.prefill_chunk))
            )
            hidden.append(self._hidden)
        if last_only:
            return logits[-1], hidden[-1]
        return np.concatenate(logits), np.concatenate(hidden)

    def _check(self, x: np.ndarray) -> None:
        n = x.shape[1]
        if n == 0:
            raise EngineError("forward needs at least one token")
        if self._len + n > self.max_seq_len:
            raise EngineError(f"{self._len + n} tokens exceed the engine's max_seq_len of {self.max_seq_len}")
        if x.min() < 0 or x.max() >= self.vocab_size:
            raise EngineError(f"token ids must be in 0..{self.vocab_size - 1}")

    def _media(self, media: np.ndarray | None, n: int) -> np.ndarray | None:
        """`media` checked and shaped (1, n, D) float32, or None."""
        if media is None:
            return None
        if not self.has_media:
            raise EngineError(
                f"{self.folder}: the graph takes no media_embeds (exported without media placeholders)"
            )
        a = np.asarray(media)
        if a.ndim == 2:
            a = a[None]
        if a.shape != (1, n, self.dim) or not np.issubdtype(a.dtype, np.floating):
            raise EngineError(
                f"media_embeds must be float ({n}, {self.dim}) for {n} tokens, got {a.dtype} {tuple(np.shape(media))}"
            )
        return np.ascontiguousarray(a, dtype=np.float32)

    def _run(self, x: np.ndarray, last_only: bool, media: np.ndarray | None = None) -> np.ndarray:
        n = x.shape[1]
        if self.exact and n == 1 and self._len + 2 <= self.max_seq_len:  # two rows: see __init__
            x, last_only = np.concatenate([x, x], axis=1), False
            media = None if media is None else np.concatenate([media, np.zeros_like(media)], axis=1)
        m = x.shape[1]  # rows computed; the first n are kept
        rows = 1 if last_only else m if not self._append and m <= ROW_BINDINGS else 0
        b = (self._row_bindings.get(rows) or self._row_binding(rows)) if rows else self._bind(None)
        b.bind_cpu_input("input_ids", x)
        b.bind_cpu_input("attention_mask", self._mask[:, : self._len + m])
        b.bind_cpu_input("logits_to_keep", self._keep[last_only])
        if self.has_media:
            b.bind_cpu_input("media_embeds", self._no_media[:, :m] if media is None else media)
        if self._append:  # fresh outputs each call: the new tokens' count varies
            for name in self._present_names:
                b.bind_output(name, "cpu")
        self.session.run_with_iobinding(b)
        if self._append:  # outputs in binding order: logits, hidden states, each layer's parts
            new = iter(b.get_outputs()[1 + self.has_hidden :])
            for layer in self._buffers:
                for a in layer.values():
                    a[:, :, self._len : self._len + n] = next(new).numpy()[:, :, :n]
        self._len += n
        keep = 1 if last_only else n
        if rows:  # (rows, V) copies: the buffers are reused by the next call
            if self.has_hidden:
                self._hidden = self._rows_hidden[0, :keep].copy()
            return self._rows_logits[0, :keep].copy()
        outs = b.get_outputs()
        if self.has_hidden:
            self._hidden = outs[1].numpy()[0, :keep]
        return outs[0].numpy()[0, :keep]  # (T, V)

    def _row_binding(self, rows: int) -> ort.SessionIOBinding:
        self._row_bindings[rows] = b = self._bind(rows)
        return b

    def rollback(self, n: int) -> None:
        if not 0 <= n <= self._len:
            raise EngineError(f"cannot roll back {n} tokens; the cache holds {self._len}")
        self._len -= n

    def reset(self) -> None:
        self._len = 0


def _rows(media: np.ndarray | None, start: int, n: int) -> np.ndarray | None:
    return None if media is None else np.ascontiguousarray(media[:, start : start + n])
