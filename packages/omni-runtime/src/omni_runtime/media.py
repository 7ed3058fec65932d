"""Media graphs in ONNX Runtime, with numpy and Pillow only: what a phone runs next to the decoder.

`MediaRuntime(folder)` opens an omni_export.media folder: `media.json` is untrusted input (every field
checked, files must be plain names inside the folder, each graph's sha256 verified before a session is
made). `encode_image` and `encode_audio` apply the preprocessing the manifest names (the image
processor and Whisper log-mel of omni_media, both numpy) and run the encoder; `run(name, ...)` runs any
graph (tokenizer halves, the codec, the interpolator) on numpy arrays. torch is never imported.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from omni_media.audio import MelConfig, log_mel_batch
from omni_media.image import ImageProcessor
from omni_model.files import file_sha256, read_json
from omni_runtime.engine import EngineError

FORMAT = "omnicoder-media"
MANIFEST = "media.json"
_DTYPES = {"float32": np.float32, "int64": np.int64, "int32": np.int32, "uint8": np.uint8}


def read_media_manifest(folder: Path) -> dict[str, Any]:
    """`media.json` of an exported media folder, checked field by field."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise EngineError(f"{folder}: no such folder")
    if not path.is_file():
        raise EngineError(f"{folder}: no {MANIFEST} (not an exported media folder)")
    m = read_json(path, EngineError)
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise EngineError(f"{path}: not an OmniCoder media manifest (format is not {FORMAT!r})")
    graphs = m.get("graphs")
    if not isinstance(graphs, dict) or not graphs:
        raise EngineError(f"{path}: graphs must be a non-empty object")
    for name, g in graphs.items():
        if not isinstance(g, dict):
            raise EngineError(f"{path}: graphs.{name} is not an object")
        f = g.get("file")
        if not isinstance(f, str) or "/" in f or "\\" in f or f.startswith(".") or not f.endswith(".onnx"):
            raise EngineError(
                f"{path}: graphs.{name}.file must be an .onnx file name inside the folder, got {f!r}"
            )
        if not isinstance(g.get("sha256"), str) or not isinstance(g.get("inputs"), dict):
            raise EngineError(f"{path}: graphs.{name} lacks sha256 or inputs")
        if not isinstance(g.get("outputs"), list) or not all(isinstance(o, str) for o in g["outputs"]):
            raise EngineError(f"{path}: graphs.{name}.outputs must be a list of names")
        for k, spec in g["inputs"].items():
            if not isinstance(spec, dict) or spec.get("dtype") not in _DTYPES:
                raise EngineError(f"{path}: graphs.{name}.inputs.{k} needs a dtype in {sorted(_DTYPES)}")
        if not isinstance(g.get("meta", {}), dict):
            raise EngineError(f"{path}: graphs.{name}.meta must be an object")
    return m


class MediaRuntime:
    def __init__(self, folder: str | Path, threads: int = 0):
        self.folder = Path(folder)
        self.manifest = read_media_manifest(self.folder)
        self._threads = threads
        self._sessions: dict[str, ort.InferenceSession] = {}

    @property
    def names(self) -> list[str]:
        return list(self.manifest["graphs"])

    def meta(self, name: str) -> dict[str, Any]:
        return self._entry(name).get("meta", {})

    def _entry(self, name: str) -> dict[str, Any]:
        g = self.manifest["graphs"].get(name)
        if g is None:
            raise EngineError(f"{self.folder}: no graph named {name!r} (has {', '.join(self.names)})")
        return g

    def session(self, name: str) -> ort.InferenceSession:
        """The graph's session, made on first use after its file's sha256 is checked."""
        if name not in self._sessions:
            g = self._entry(name)
            path = self.folder / g["file"]
            if not path.is_file():
                raise EngineError(f"{path}: no such file (named by {MANIFEST})")
            if file_sha256(path) != g["sha256"]:
                raise EngineError(f"{path}: sha256 differs from {MANIFEST}'s (altered or incomplete)")
            so = ort.SessionOptions()
            so.intra_op_num_threads = self._threads
            so.log_severity_level = 3
            try:
                self._sessions[name] = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
            except Exception as e:  # onnxruntime raises its own exception types for bad graphs
                raise EngineError(
                    f"{path}: ONNX Runtime cannot load it: {' '.join(str(e).split())[:200]}"
                ) from None
        return self._sessions[name]

    def run(self, name: str, *arrays: np.ndarray) -> list[np.ndarray]:
        """The graph's outputs for its inputs, given in the manifest's order, cast to their dtypes."""
        g = self._entry(name)
        specs = list(g["inputs"].items())
        if len(arrays) != len(specs):
            raise EngineError(
                f"{name}: takes {len(specs)} inputs ({', '.join(k for k, _ in specs)}), got {len(arrays)}"
            )
        feeds = {}
        for (k, spec), a in zip(specs, arrays, strict=True):
            a = np.asarray(a, dtype=_DTYPES[spec["dtype"]])
            fixed = [
                (ax, n)
                for ax, n in enumerate(spec.get("shape", []))
                if str(ax) not in spec.get("dynamic", {})
            ]
            if a.ndim != len(spec.get("shape", [])) or any(a.shape[ax] != n for ax, n in fixed):
                raise EngineError(f"{name}: input {k} has shape {a.shape}, the graph takes {spec['shape']} "
                                  f"(dynamic axes {sorted(spec.get('dynamic', {}))})")  # fmt: skip
            vocab = g.get("meta", {}).get("vocab_size")
            if (
                spec["dtype"] == "int64"
                and isinstance(vocab, int)
                and a.size
                and (a.min() < 0 or a.max() >= vocab)
            ):
                # the exported decoders clamp instead (a graph cannot raise), which would hide the mistake
                raise EngineError(f"{name}: input {k} holds token ids outside [0, {vocab})")
            feeds[k] = a
        return self.session(name).run(g["outputs"], feeds)

    def encode_image(self, images: Any, name: str = "vision") -> np.ndarray:
        """Images (PIL, uint8 arrays, or a list) -> (B, N, D) features, preprocessed as the manifest says."""
        proc = self.meta(name).get("processor")
        if not isinstance(proc, dict):
            raise EngineError(f"{self.folder}: graph {name!r} has no image processor in its meta")
        try:
            p = ImageProcessor(**{k: tuple(v) if isinstance(v, list) else v for k, v in proc.items()})
        except (TypeError, ValueError) as e:
            raise EngineError(f"{self.folder}: graph {name!r} has a bad image processor: {e}") from None
        return self.run(name, p.array(images))[0]

    def encode_audio(self, waveforms: Sequence[np.ndarray], name: str = "audio") -> np.ndarray:
        """16 kHz mono clips -> (B, T, D) features, through the manifest's log-mel front end."""
        mel = self.meta(name).get("mel")
        if not isinstance(mel, dict):
            raise EngineError(f"{self.folder}: graph {name!r} has no mel front end in its meta")
        try:
            config = MelConfig(**mel)
        except (TypeError, ValueError) as e:
            raise EngineError(f"{self.folder}: graph {name!r} has a bad mel front end: {e}") from None
        return self.run(name, log_mel_batch(list(waveforms), config))[0]
