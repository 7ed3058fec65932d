"""A minimal ONNX Runtime loop over the exported decoder graph, for the parity check at export.

It feeds the cache back as plain arrays (present -> past); omni_runtime's engine is the fast one
(preallocated buffers shared between past and present, I/O binding).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from omni_model.config import ModelConfig


class OnnxDecoder:
    def __init__(self, graph: Path, cfg: ModelConfig, threads: int = 2) -> None:
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(graph), so, providers=["CPUExecutionProvider"])
        self.cfg = cfg
        z = np.zeros((1, cfg.n_kv_heads, 0, cfg.head_size), np.float32)
        self.past = [(z, z) for _ in range(cfg.n_layers)]
        self.last_all: np.ndarray = np.zeros((0,))

    def step(self, ids: np.ndarray) -> np.ndarray:
        """Logits (1, T, V) of the new tokens `ids` (1, T); the cache advances."""
        total = ids.shape[1] + self.past[0][0].shape[2]
        feeds = {"input_ids": ids.astype(np.int64), "attention_mask": np.ones((1, total), np.int64),
                 "logits_to_keep": np.array(0, np.int64)}  # fmt: skip
        for i, (k, v) in enumerate(self.past):
            feeds[f"past_key_values.{i}.key"], feeds[f"past_key_values.{i}.value"] = k, v
        out = self.session.run(None, feeds)
        self.past = [(out[1 + 2 * i], out[2 + 2 * i]) for i in range(self.cfg.n_layers)]
        self.last_all = out[0][0]
        return out[0]
