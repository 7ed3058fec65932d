"""Medusa-style heads for drafting, one per engine: `TorchHeads` (omni_model.medusa on the PyTorch
decoder's own output head) and `OrtHeads` (the heads graph omni_export.heads writes beside an ONNX
export; onnxruntime and numpy only). Both map one hidden state (D,) to each head's best token ids."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from omni_runtime.engine import EngineError

HEADS_MANIFEST, HEADS_FORMAT = "heads-manifest.json", "omnicoder-onnx-heads"


class TorchHeads:
    def __init__(self, lm: Any, folder: str | Path, *, base_sha256: str | None = None, top: int = 4) -> None:
        """Heads saved by omni_train for the loaded model `lm` (omni_model.LoadedModel); a folder made
        for another base is refused."""
        from omni_model.medusa import load_heads

        self.model = lm.model
        self.heads = load_heads(folder, lm.model, base_sha256=base_sha256).eval()
        self.n_heads, self.top = self.heads.config.n_heads, top

    def top_ids(self, hidden: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            h = torch.from_numpy(np.ascontiguousarray(hidden, np.float32))[None]  # (1, D)
            z = self.heads(h.to(self.model.embed_tokens.weight.dtype))[:, 0]  # (n, D)
            return self.model.logits(z).topk(self.top, -1).indices.numpy()


class OrtHeads:
    def __init__(self, folder: str | Path, engine: Any, *, threads: int = 1) -> None:
        """The heads graph in `folder`, checked to belong to the ONNX engine's export (`engine.folder`).
        One thread that sleeps when idle: the heads' graph is small next to the decoder's, and a spinning
        pool would take the cores the decoder's next run needs (2.4x slower steps on 2 cores)."""
        import hashlib

        import onnxruntime as ort

        folder = Path(folder)
        path = folder / HEADS_MANIFEST
        try:
            m = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
            raise EngineError(
                f"{path}: not a readable heads manifest ({' '.join(str(e).split())[:120]})"
            ) from None
        if not isinstance(m, dict) or m.get("format") != HEADS_FORMAT:
            raise EngineError(f"{path}: not an OmniCoder heads manifest (format is not {HEADS_FORMAT!r})")
        want = hashlib.sha256((Path(engine.folder) / "manifest.json").read_bytes()).hexdigest()
        if m.get("model_manifest_sha256") != want:
            raise EngineError(f"{folder}: heads exported for another model export than {engine.folder}")
        n = m.get("n_heads")
        if not (isinstance(n, int) and 1 <= n <= 32) or m.get("graph") != "heads.onnx":
            raise EngineError(f"{path}: n_heads must be 1..32 and graph 'heads.onnx'")
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(
                str(folder / "heads.onnx"), so, providers=["CPUExecutionProvider"]
            )
        except Exception as e:  # ORT's own exception types
            raise EngineError(
                f"{folder / 'heads.onnx'}: ONNX Runtime cannot load it: {' '.join(str(e).split())[:160]}"
            ) from None
        self.n_heads, self.top = n, m.get("top")

    def top_ids(self, hidden: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(hidden, np.float32).reshape(1, -1)
        return self.session.run(["top_ids"], {"hidden": x})[0][:, 0]  # (n, top)
