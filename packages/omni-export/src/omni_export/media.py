"""Media encoders and decoders to ONNX: one graph per component, a manifest, parity checked on export.

Unlike the decoder (built node by node in onnx_decoder.py, for the KV cache's contrib ops), these
are plain feed-forward graphs, so torch's own exporter (`torch.onnx.export(dynamo=True)`, torch.export
underneath) writes them. A `MediaGraph` names a module, example inputs and the axes left dynamic;
`export_media` writes each as `NAME.onnx` into a folder with `media.json` (file sha256s, inputs and
outputs, the preprocessing the runtime must apply), runs every graph in ONNX Runtime on its example
inputs and refuses to finish unless the outputs match the module's within `tol`.
omni_runtime.media reads the folder without torch.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from omni_export.errors import ExportError
from omni_media.audio import MelConfig
from omni_media.codec import AudioCodec
from omni_media.encoders import ClipEncoder, ImageEncoder, SpeechEncoder
from omni_media.image import ImageProcessor
from omni_media.image_tokenizer import ImageTokenizer
from omni_media.interpolate import KeyframeInterpolator
from omni_media.projector import Projector
from omni_media.verifier import CrossModalVerifier
from omni_media.video import VideoEncoder
from omni_media.vision import VisionEncoder
from omni_media.whisper import WhisperEncoder
from omni_model.files import file_sha256, write_text_atomic, writing_dir

FORMAT = "omnicoder-media"
MANIFEST = "media.json"
OPSET = 18


@dataclass
class MediaGraph:
    """One exportable component: `module(*inputs.values())` returns the outputs named in `outputs`."""

    name: str  # the file is NAME.onnx; also the key the runtime looks it up by
    module: nn.Module
    inputs: dict[str, Tensor]  # example inputs, in the module's argument order
    outputs: tuple[str, ...]
    dynamic: dict[str, dict[int, str]] = field(default_factory=dict)  # input -> {axis: name}
    meta: dict[str, Any] = field(default_factory=dict)  # for the runtime: preprocessing, vocab, rates

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise ExportError(f"graph name must be an identifier (it becomes a file name), got {self.name!r}")
        for k in self.dynamic:
            if k not in self.inputs:
                raise ExportError(f"{self.name}: dynamic axes given for {k!r}, which is not an input")


class _Outputs(nn.Module):
    """Turns a vision encoder's dataclass output into the tuple an exporter takes, with an optional
    projector on the patch features."""

    def __init__(self, encoder: VisionEncoder, projector: Projector | None):
        super().__init__()
        self.encoder, self.projector = encoder, projector

    def forward(self, pixel_values: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        out = self.encoder(pixel_values)
        feats = out.last_hidden_state if self.projector is None else self.projector(out.last_hidden_state)
        return feats if out.pooled is None else (feats, out.pooled)


def vision_graph(encoder: VisionEncoder, projector: Projector | None = None, batch: int = 2) -> MediaGraph:
    """SigLIP/CLIP encoder (and projector) on processed pixels; the image processor travels in `meta`."""
    c = encoder.cfg
    px = torch.randn(
        batch, c.num_channels, c.image_size, c.image_size, generator=torch.Generator().manual_seed(0)
    )
    has_pool = c.kind == "clip" or c.use_head
    outputs = ("features", "pooled") if has_pool else ("features",)
    proc = asdict(ImageProcessor.for_config(c.kind, c.image_size))
    return MediaGraph("vision", _Outputs(encoder, projector).eval(), {"pixel_values": px}, outputs,
                      {"pixel_values": {0: "batch"}}, {"kind": "image_encoder", "processor": proc})  # fmt: skip


def whisper_graph(encoder: WhisperEncoder, seconds: int = 30, batch: int = 1) -> MediaGraph:
    """Whisper encoder on log-mel features of `seconds`-long windows (30 s: what Whisper was trained on)."""
    c = encoder.config
    mel = MelConfig(n_mels=c.num_mel_bins, chunk_seconds=seconds)
    if mel.n_frames > 2 * c.max_source_positions:
        raise ExportError(
            f"whisper: {seconds} s is longer than the encoder's {c.max_source_positions // 50} s"
        )
    x = torch.randn(batch, c.num_mel_bins, mel.n_frames, generator=torch.Generator().manual_seed(0))
    return MediaGraph("audio", encoder.eval(), {"input_features": x}, ("features",),
                      {"input_features": {0: "batch"}}, {"kind": "audio_encoder", "mel": asdict(mel)})  # fmt: skip


def video_graph(encoder: VideoEncoder, frames: int = 8, batch: int = 1) -> MediaGraph:
    """A clip of `frames` processed frames (B, T, C, H, W) -> (B, T', N, D), positions by frame index."""
    c = encoder.vision.cfg
    if encoder.config.position_by != "index":
        raise ExportError("video: only position_by='index' exports (timestamps would be a second input)")
    px = torch.randn(batch, frames, c.num_channels, c.image_size, c.image_size,
                     generator=torch.Generator().manual_seed(0))  # fmt: skip
    proc = asdict(ImageProcessor.for_config(c.kind, c.image_size))
    meta = {"kind": "video_encoder", "processor": proc, "frames": frames, "pool": encoder.config.pool}
    return MediaGraph("video", encoder.eval(), {"pixel_values": px}, ("features",),
                      {"pixel_values": {0: "batch"}}, meta)  # fmt: skip


def interpolator_graph(model: KeyframeInterpolator, grid: tuple[int, int], batch: int = 2) -> MediaGraph:
    """Two keyframe latents (B, C, h, w) and t (B,) -> the in-between latent."""
    g = torch.Generator().manual_seed(0)
    z0, z1 = (torch.randn(batch, model.config.channels, *grid, generator=g) for _ in range(2))
    t = torch.rand(batch, generator=g)
    dyn = {k: {0: "batch"} for k in ("z0", "z1", "t")}
    return MediaGraph("interpolator", model.eval(), {"z0": z0, "z1": z1, "t": t}, ("latent",), dyn,
                      {"kind": "keyframe_interpolator"})  # fmt: skip


def image_tokenizer_graphs(tokenizer: ImageTokenizer, batch: int = 2) -> list[MediaGraph]:
    """The tokenizer's halves: images (B, C, H, W) in [0, 1] -> tokens (B, h, w), and tokens -> images."""
    c = tokenizer.config
    images = torch.rand(
        batch, c.channels, c.image_size, c.image_size, generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        tokens = tokenizer.encode(images)
    meta = {"kind": "image_tokenizer", "vocab_size": tokenizer.vocab_size, "grid": list(tokenizer.grid),
            "image_size": c.image_size, "channels": c.channels}  # fmt: skip
    return [
        MediaGraph("image_encoder", tokenizer.encoder_module().eval(), {"images": images}, ("tokens",),
                   {"images": {0: "batch"}}, meta),
        MediaGraph("image_decoder", tokenizer.decoder_module().eval(), {"tokens": tokens}, ("images",),
                   {"tokens": {0: "batch"}}, meta),
    ]  # fmt: skip


def codec_graphs(codec: AudioCodec, seconds: float = 1.0, batch: int = 2) -> list[MediaGraph]:
    """The codec's halves: 16 kHz waveforms (B, T) -> tokens (B, n_q, frames), and tokens -> waveforms.
    Both keep batch and length dynamic."""
    c = codec.config
    g = torch.Generator().manual_seed(0)
    t = torch.arange(int(seconds * c.sample_rate)) / c.sample_rate
    # A tone in noise: a pure tone drives the residual stage's latents onto its rounding boundaries
    # (exact zeros), where the two runtimes' last-bit differences pick different tokens.
    tone = 0.3 * torch.sin(2 * torch.pi * 220 * t * (1 + torch.rand(batch, 1, generator=g)))
    wave = tone + 0.05 * torch.randn(batch, len(t), generator=g)  # (B, T)
    with torch.no_grad():
        tokens = codec.encode(wave)
    meta = {"kind": "audio_codec", "vocab_size": c.vocab_size, "n_q": c.n_q, "sample_rate": c.sample_rate,
            "frame_rate": codec.frame_rate}  # fmt: skip
    return [
        MediaGraph("audio_encoder", codec.encoder_module().eval(), {"waveform": wave}, ("tokens",),
                   {"waveform": {0: "batch", 1: "samples"}}, meta),
        MediaGraph("audio_decoder", codec.decoder_module().eval(), {"tokens": tokens}, ("waveform",),
                   {"tokens": {0: "batch", 2: "frames"}}, meta),
    ]  # fmt: skip


def image_input_graph(encoder: ImageEncoder, image_size: int = 28, batch: int = 2) -> MediaGraph:
    """A jointly trained image encoder (omni_media.encoders): (B, 1, S, S) grey pixels in [0, 1] -> the
    (B, g*g, D) embeddings that fill an image's placeholders."""
    images = torch.rand(batch, 1, image_size, image_size, generator=torch.Generator().manual_seed(0))
    meta = {"kind": "image_input", "image_size": image_size, "tokens": encoder.n_tokens, "dim": encoder.dim}
    return MediaGraph("image_input", encoder.eval(), {"images": images}, ("features",),
                      {"images": {0: "batch"}}, meta)  # fmt: skip


def clip_input_graph(
    encoder: ClipEncoder, frames: int = 3, image_size: int = 40, batch: int = 2
) -> MediaGraph:
    """A clip encoder (omni_media.encoders): (B, T, 1, S, S) frames in [0, 1] -> (B, T*g*g, D)."""
    clips = torch.rand(batch, frames, 1, image_size, image_size, generator=torch.Generator().manual_seed(0))
    meta = {"kind": "video_input", "frames": frames, "image_size": image_size,
            "tokens": encoder.n_tokens(frames), "dim": encoder.frames.dim}  # fmt: skip
    return MediaGraph("video_input", encoder.eval(), {"frames": clips}, ("features",),
                      {"frames": {0: "batch"}}, meta)  # fmt: skip


def speech_input_graph(encoder: SpeechEncoder, frames: int = 300, batch: int = 2) -> MediaGraph:
    """A speech encoder (omni_media.encoders) on Whisper log-mel (B, 80, frames), frames dynamic ->
    (B, ceil(frames / 8), D). The log-mel front end (chunk_seconds None: each clip its own length) is in meta."""
    mel = torch.randn(batch, encoder.n_mels, frames, generator=torch.Generator().manual_seed(0))
    front = asdict(MelConfig(n_mels=encoder.n_mels, chunk_seconds=None))
    return MediaGraph("audio_input", encoder.eval(), {"mel": mel}, ("features",),
                      {"mel": {0: "batch", 2: "frames"}}, {"kind": "audio_input", "mel": front})  # fmt: skip


class _VerifierLogits(nn.Module):
    """One tower of a CrossModalVerifier with the word table folded in: media -> (B, n_words) scaled
    cosines with every word (image_logits / audio_logits as a plain graph)."""

    def __init__(self, verifier: CrossModalVerifier, tower: str):
        super().__init__()
        self.tower = getattr(verifier, tower)
        words = torch.nn.functional.normalize(verifier.text.weight.detach(), dim=-1)
        self.register_buffer("words", (verifier.scale().detach() * words).T.contiguous())  # (dim, n_words)

    def forward(self, x: Tensor) -> Tensor:
        return torch.nn.functional.normalize(self.tower(x), dim=-1) @ self.words


def verifier_graphs(verifier: CrossModalVerifier, batch: int = 2) -> list[MediaGraph]:
    """The cross-modal verifier (omni_media.verifier) as two graphs that score generated media against
    every word: `verifier_image` on (B, 1, 28, 28) grey pixels in [0, 1], `verifier_audio` on the
    (B, 80, 100) log-mel of one-second clips (omni_media.speech.digit_features: each clip cut or
    padded to 16000 samples, the front end in meta)."""
    from omni_media.speech import CLIP_SAMPLES
    from omni_media.verifier import IMAGE_SHAPE, N_MELS

    verifier = verifier.eval()
    g = torch.Generator().manual_seed(0)
    n = verifier.config.n_words
    images = torch.rand(batch, *IMAGE_SHAPE, generator=g)
    front = MelConfig(n_mels=N_MELS, chunk_seconds=None)
    mel = torch.randn(batch, N_MELS, CLIP_SAMPLES // front.hop_length, generator=g)
    return [
        MediaGraph("verifier_image", _VerifierLogits(verifier, "image").eval(), {"images": images}, ("logits",),
                   {"images": {0: "batch"}}, {"kind": "verifier_image", "image_size": IMAGE_SHAPE[-1], "words": n}),
        MediaGraph("verifier_audio", _VerifierLogits(verifier, "audio").eval(), {"mel": mel}, ("logits",),
                   {"mel": {0: "batch"}}, {"kind": "verifier_audio", "mel": asdict(front), "clip_samples": CLIP_SAMPLES,
                                           "words": n}),
    ]  # fmt: skip


@contextmanager
def _quiet_exporter():
    """The exporter and its optimizer log progress at INFO/WARNING and warn about axis names it merges;
    a library keeps that to itself."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "onnxscript", "onnx_ir", "torch.export")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*axis name.*will not be used.*")
            yield
    finally:
        for lg, lv in zip(loggers, levels, strict=True):
            lg.setLevel(lv)


def export_graph(graph: MediaGraph, path: Path) -> None:
    """Write `graph` to `path` (one self-contained .onnx file)."""
    dims: dict[str, torch.export.Dim] = {}
    dynamic = {k: {ax: dims.setdefault(n, torch.export.Dim(n)) for ax, n in axes.items()}
               for k, axes in graph.dynamic.items()}  # fmt: skip
    shapes = tuple(dynamic.get(k) for k in graph.inputs) if dynamic else None
    try:
        with _quiet_exporter(), torch.no_grad():
            program = torch.onnx.export(graph.module, tuple(graph.inputs.values()), None, dynamo=True,
                                        input_names=list(graph.inputs), output_names=list(graph.outputs),
                                        dynamic_shapes=shapes, opset_version=OPSET, optimize=True,
                                        verbose=False, report=False)  # fmt: skip
            program.save(str(path), external_data=False)
    except Exception as e:  # the exporter raises many types; the cause goes on one line
        raise ExportError(f"{graph.name}: ONNX export failed: {' '.join(str(e).split())[:300]}") from None


def parity(graph: MediaGraph, path: Path) -> tuple[float, float]:
    """(largest |difference| of the float outputs, fraction of differing integer outputs) between the
    module and ONNX Runtime on the graph's example inputs. Tokens are compared by agreement, not size:
    a latent within float rounding of a quantiser's decision boundary may round either way in the two
    runtimes, and one such flip changes a token index by a whole radix digit."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {k: v.numpy() for k, v in graph.inputs.items()}
    got = session.run(list(graph.outputs), feeds)
    with torch.no_grad():
        want = graph.module(*graph.inputs.values())
    want = (want,) if isinstance(want, Tensor) else tuple(want)
    if len(want) != len(got):
        raise ExportError(f"{graph.name}: the module returns {len(want)} outputs, the graph {len(got)}")
    err, mismatch = 0.0, 0.0
    for name, a, b in zip(graph.outputs, got, want, strict=True):
        if a.shape != tuple(b.shape):
            raise ExportError(
                f"{graph.name}: output {name} has shape {a.shape}, the module's {tuple(b.shape)}"
            )
        if a.dtype.kind in "iub":
            mismatch = max(
                mismatch, float((a.astype(np.int64) != b.numpy().astype(np.int64)).mean()) if a.size else 0.0
            )
        else:
            err = max(err, float(np.abs(a.astype(np.float64) - b.double().numpy()).max(initial=0.0)))
    return err, mismatch


def export_media(
    graphs: Sequence[MediaGraph],
    out: str | Path,
    tol: float = 1e-3,
    token_tol: float = 0.0,
    on_progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Export every graph into the folder `out` (replaced atomically) and return its manifest. Float
    outputs must match PyTorch within `tol`; at most a `token_tol` fraction of integer outputs may differ."""
    out = Path(out)
    names = [g.name for g in graphs]
    if not graphs or len(set(names)) != len(names):
        raise ExportError(f"export_media needs graphs with distinct names, got {names}")
    if out.exists() and not (out / MANIFEST).is_file():  # say so before minutes of export, not after
        raise ExportError(
            f"{out}: exists and is not an exported media folder (no {MANIFEST}); not overwriting it"
        )
    entries = {}
    with writing_dir(out, marker=MANIFEST, what="an exported media folder", error=ExportError) as tmp:
        for g in graphs:
            if on_progress:
                on_progress(f"exporting {g.name}")
            path = tmp / f"{g.name}.onnx"
            t0 = time.perf_counter()
            export_graph(g, path)
            err, mismatch = parity(g, path)
            if not err <= tol:
                raise ExportError(f"{g.name}: ONNX Runtime differs from PyTorch by {err:.3g} (> {tol:g})")
            if mismatch > token_tol:
                raise ExportError(
                    f"{g.name}: {mismatch:.1%} of the tokens differ from PyTorch's (> {token_tol:.1%})"
                )
            entries[g.name] = {
                "file": path.name,
                "sha256": file_sha256(path),
                "bytes": path.stat().st_size,
                "parameters": sum(p.numel() for p in g.module.parameters()),
                "inputs": {
                    k: {
                        "shape": list(v.shape),
                        "dtype": str(v.dtype).removeprefix("torch."),
                        "dynamic": {str(a): n for a, n in g.dynamic.get(k, {}).items()},
                    }
                    for k, v in g.inputs.items()
                },
                "outputs": list(g.outputs),
                "parity_max_abs": err,
                "token_mismatch": mismatch,
                "export_seconds": round(time.perf_counter() - t0, 2),
                "meta": g.meta,
            }
        manifest = {"format": FORMAT, "version": 1, "opset": OPSET, "graphs": entries}
        text = json.dumps(manifest, indent=2) + "\n"
        write_text_atomic(tmp / MANIFEST, text)
    return json.loads(text)
