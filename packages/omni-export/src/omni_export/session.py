"""A minimal ONNX Runtime loop over the exported decoder graph, for the parity check at export.

It feeds the cache back as plain arrays (present -> past); omni_runtime's engine is the fast one
(preallocated buffers shared between past and present, I/O binding).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from omni_model.config import ModelConfig

KV_PARTS = {"float32": ("key", "value"),
            "int8": ("key", "key_scale", "key_offset", "value", "value_scale", "value_offset")}  # fmt: skip


class OnnxDecoder:
    def __init__(self, graph: Path, cfg: ModelConfig, threads: int = 2, kv: str = "float32") -> None:
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(graph), so, providers=["CPUExecutionProvider"])
        self.cfg, self.parts = cfg, KV_PARTS[kv]
        h, d = cfg.n_kv_heads, cfg.head_size

        def empty(part: str) -> np.ndarray:
            if kv == "float32":
                return np.zeros((1, h, 0, d), np.float32)
            return np.zeros((1, h, 0, 1), np.float16) if "_" in part else np.zeros((1, h, 0, d), np.uint8)

        self.past = [{p: empty(p) for p in self.parts} for _ in range(cfg.n_layers)]
        self.kv = kv
        self.last_all: np.ndarray = np.zeros((0,))

    def step(self, ids: np.ndarray) -> np.ndarray:
        """Logits (1, T, V) of the new tokens `ids` (1, T); the cache advances."""
        total = ids.shape[1] + self.past[0]["key"].shape[2]
        feeds = {"input_ids": ids.astype(np.int64), "attention_mask": np.ones((1, total), np.int64),
                 "logits_to_keep": np.array(0, np.int64)}  # fmt: skip
        for i, layer in enumerate(self.past):
            for part, a in layer.items():
                feeds[f"past_key_values.{i}.{part}"] = a
        names = [o.name for o in self.session.get_outputs()]
        out = dict(zip(names, self.session.run(None, feeds), strict=True))
        for i, layer in enumerate(self.past):
            for part in layer:  # float32: present holds everything; int8: only the new tokens
                new = out[f"present.{i}.{part}"]
                layer[part] = new if self.kv == "float32" else np.concatenate([layer[part], new], axis=2)
        self.last_all = out["logits"][0]
        return out["logits"]
