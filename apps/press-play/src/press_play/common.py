"""What every command shares: the two consoles, one-line errors, loading with a spinner, texts.

Generated text and --json go to stdout; spinners, progress bars, statistics and errors go to
stderr, so `press-play generate ... > out.txt` captures only the text.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from omni_model.errors import DataError, OmniError

if TYPE_CHECKING:
    from omni_kv import CacheSpec
    from omni_model.loader import LoadedModel
    from omni_model.tokenizer import Tokenizer
    from omni_runtime.engine import Engine
    from omni_runtime.speculative import Proposer

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


def fail(message: str, code: int = 1) -> NoReturn:
    """Print `error: message` as one line on stderr and exit."""
    # soft_wrap: a long message stays one line (a pipe or CI log should not see it wrapped at 80).
    err.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)
    raise typer.Exit(code)


@contextmanager
def reporting_errors() -> Iterator[None]:
    """Turn bad input (any OmniError, or a KV cache setting omni_kv rejects) into one line and exit 1;
    Ctrl-C into a short note and exit 130."""
    from omni_kv import KVCacheError

    try:
        yield
    except (OmniError, KVCacheError) as e:
        fail(str(e))
    except KeyboardInterrupt:
        err.print("\n[yellow]interrupted[/yellow]")
        raise typer.Exit(130) from None


def installed_versions() -> list[tuple[str, str]]:
    """(name, version) of every installed omni-* distribution and the two apps, sorted by name."""
    import importlib.metadata as md

    found: dict[str, str] = {}
    for dist in md.distributions():
        name = (dist.metadata["Name"] or "").lower().replace("_", "-")
        if name.startswith("omni-") or name in ("press-play", "phone-export"):
            found[name] = dist.version
    return sorted(found.items())


def load_model(source: str) -> tuple[LoadedModel, float]:
    """Load a model under a spinner; return it and the seconds it took."""
    import omni_model

    t0 = time.perf_counter()
    with err.status(f"loading {escape(source)}"):
        lm = omni_model.load(source)
    return lm, time.perf_counter() - t0


@dataclass
class Settings:
    threads: int = 2  # CPU threads for torch and ONNX Runtime; the root callback sets it


settings = Settings()


@dataclass
class Runner:
    """What the generate, chat and eval commands run: an engine, its tokenizer, and words for both."""

    engine: Engine
    tokenizer: Tokenizer
    source: str
    description: str


def is_exported(source: str) -> bool:
    return (Path(source) / "manifest.json").is_file()


def open_runner(
    source: str,
    engine: str = "auto",
    kv: str | None = None,
    knn: str | None = None,
    knn_settings: str | None = None,
    exact: bool = False,
) -> Runner:
    """`engine` "torch" loads the model with omni_model; "onnx" opens an exported folder (press-play
    export) with ONNX Runtime; "executorch" an ExecuTorch export (press-play export --format executorch)
    with executorch.runtime; "auto" picks by the folder's manifest, torch for anything else. `kv`: the
    PyTorch engine's cache kind (omni_kv.CacheSpec text, e.g. int8, kivi, sink:window=1024). `exact`: the
    ONNX engine computes one token as two rows (OrtEngine's `exact`)."""
    if engine not in ("auto", "torch", "onnx", "executorch"):
        raise DataError(f"--engine {engine}: must be auto, torch, onnx or executorch")
    if engine == "auto" and is_exported(source):
        from omni_runtime.executorch_engine import is_executorch_folder

        engine = "executorch" if is_executorch_folder(source) else "onnx"
    exported = engine in ("onnx", "executorch")
    if knn is not None and exported:
        raise DataError(f"--knn {knn}: kNN-LM runs with the PyTorch engine (it needs the hidden states)")
    if knn_settings is not None and knn is None:
        raise DataError("--knn-settings needs --knn DIR")
    spec = None
    if kv is not None:
        if exported:
            raise DataError(
                f"--kv {kv}: an exported model's cache is fixed at export (press-play export --kv)"
            )
        from omni_kv import CacheSpec

        spec = CacheSpec.parse(kv)
    if exported:
        from omni_model.tokenizer import Tokenizer

        if engine == "onnx":
            from omni_runtime.ort_engine import OrtEngine

            with err.status(f"opening {escape(source)} with ONNX Runtime"):
                opened: Engine = OrtEngine(source, threads=settings.threads, exact=exact)
            kind = "ONNX"
        else:
            from omni_runtime.executorch_engine import ExecuTorchEngine

            with err.status(f"opening {escape(source)} with ExecuTorch"):
                opened = ExecuTorchEngine(source, threads=settings.threads)
            kind = "ExecuTorch (XNNPACK)"
        tok = Tokenizer.from_hf_folder(Path(source))
        manifest = opened.manifest  # type: ignore[attr-defined]
        q, cfg = manifest["quantization"]["weights"], manifest["config"]
        desc = (
            f"{kind}, {q} weights, {cfg['n_layers']} layers, dim {cfg['dim']}, context {opened.max_seq_len}"
        )
        return Runner(opened, tok, source, desc)
    lm, _ = load_model(source)
    if knn is not None:
        return knn_runner(lm, knn, spec, knn_settings)
    return runner_for(lm, spec)


def knn_runner(
    lm: LoadedModel, folder: str, cache: CacheSpec | None = None, settings_text: str | None = None
) -> Runner:
    """The PyTorch engine with its predictions mixed with a kNN-LM datastore's (omni_retrieval)."""
    import torch

    from omni_retrieval.knnlm import KNNLM, KNNConfig
    from omni_runtime.torch_engine import TorchEngine

    config = KNNConfig() if settings_text is None else KNNConfig.parse(settings_text)
    knn = KNNLM(folder, config, vocab_size=lm.config.vocab_size, dim=lm.config.dim)

    class KNNEngine(TorchEngine):
        name = "torch+knn"

        @torch.inference_mode()
        def forward(self, ids, last_only: bool = True):
            self._check(ids)
            h = self.model.hidden_states(torch.tensor([list(ids)], dtype=torch.long), self._cache)[0]
            h = h[-1:] if last_only else h
            return knn.mix(self.model.logits(h[None])[0], h).numpy()

    desc = describe(lm) + f", kNN-LM over {knn.index.count:,} positions of {folder}"
    return Runner(KNNEngine(lm, cache=cache), lm.tokenizer, lm.source, desc)


def runner_for(lm: LoadedModel, cache: CacheSpec | None = None) -> Runner:
    from omni_runtime.torch_engine import TorchEngine

    desc = describe(lm) + ("" if cache is None or cache.kind == "dense" else f", {cache.kind} KV cache")
    return Runner(TorchEngine(lm, cache=cache), lm.tokenizer, lm.source, desc)


def describe(lm: LoadedModel) -> str:
    cfg = lm.config
    return (f"{cfg.n_params() / 1e6:.0f}M parameters, {cfg.n_layers} layers, dim {cfg.dim}, "
            f"vocab {cfg.vocab_size}, context {cfg.max_seq_len}")  # fmt: skip


def read_text(source: str) -> str:
    """The text of a file, or of a Shakespeare play by short name ('hamlet', 'macbeth', ...)."""
    from omni_model import corpus

    path = Path(source)
    if path.is_dir():
        raise DataError(f"--text {source}: is a folder, not a text file")
    if not path.exists():
        if path.suffix or "/" in source or "\\" in source:
            raise DataError(f"--text {source}: no such file")
        try:
            path = corpus.text_path(source)
        except DataError as e:
            raise DataError(f"--text {source}: not a file, and {e}") from None
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"--text {source}: cannot read it as UTF-8 text: {e}") from None


def open_proposer(text: str, runner: Runner) -> Proposer:
    """The drafts of `press-play generate --speculative`: "lookup" (or "lookup:N", n-grams up to N),
    "draft:MODEL" (a model with the same vocabulary, on the target's engine kind) or "heads:PATH"
    (Medusa-style heads from `press-play train heads`; for an exported target, their ONNX form is made
    once beside them, named by the export it belongs to)."""
    from omni_runtime.speculative import DraftModel, HeadsProposer, PromptLookup

    kind, _, arg = text.partition(":")
    if kind == "lookup":
        if arg and not (arg.isdigit() and 1 <= int(arg) <= 64):
            raise DataError(f"--speculative {text}: lookup:N takes the longest n-gram N, 1..64")
        return PromptLookup(max_ngram=int(arg), min_ngram=min(2, int(arg))) if arg else PromptLookup()
    if kind == "draft" and arg:
        with err.status(f"opening the draft model {escape(arg)}"):
            if runner.engine.name == "onnx" and is_exported(arg):
                from omni_runtime.ort_engine import OrtEngine

                engine = OrtEngine(arg, threads=settings.threads, spin=False)  # it alternates with the target
            else:
                engine = open_runner(arg, "torch").engine
        return DraftModel(engine, runner.engine.vocab_size, name=f"draft {Path(arg).name}")
    if kind == "heads" and arg:
        return HeadsProposer(open_heads(Path(arg), runner))
    if kind == "heads-tree" and arg:
        if runner.engine.name != "torch":
            raise DataError(
                f"--speculative {text}: tree verification runs on the PyTorch engine (--engine torch)"
            )
        heads = open_heads(Path(arg), runner)
        return HeadsProposer(heads, [c for c in HEADS_TREE if len(c) <= heads.n_heads])
    raise DataError(
        f"--speculative {text}: must be lookup, lookup:N, draft:MODEL, heads:PATH or heads-tree:PATH"
    )


DRAFT_VOCAB = 8192  # tokens exported heads draft from (FR-Spec's frequency-ranked subset)
# heads-tree: the best three for the next token, two for the one after the best, one deeper (Medusa's
# sparse trees, kept small: every node is a row of the verification forward)
HEADS_TREE = ((0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0), (0, 0, 0, 0))


def open_heads(folder: Path, runner: Runner):
    engine = runner.engine
    if engine.name == "torch":
        from omni_runtime.heads import TorchHeads
        from omni_train.run import source_sha256

        return TorchHeads(engine.lm, folder, base_sha256=source_sha256(engine.lm.source))  # type: ignore[attr-defined]
    if engine.name != "onnx":
        raise DataError(f"--speculative heads: not available with the {engine.name} engine")
    from omni_runtime.heads import HEADS_MANIFEST, OrtHeads

    if (folder / HEADS_MANIFEST).is_file():
        return OrtHeads(folder, engine)
    if not (folder / "heads.json").is_file():
        raise DataError(f"{folder}: neither Medusa heads (heads.json) nor their ONNX form ({HEADS_MANIFEST})")
    # Heads draft from the vocabulary they were trained on (--draft-vocab); heads trained on all of it
    # but carrying token counts draft from the DRAFT_VOCAB tokens the base produced most (FR-Spec: their
    # head's matmul, most of their cost, shrinks to match).
    import json

    from omni_export.heads import export_heads, manifest_sha256

    try:
        trained = json.loads((folder / "heads.json").read_text(encoding="utf-8")).get("draft_vocab")
    except (OSError, UnicodeDecodeError, ValueError, RecursionError, AttributeError) as e:
        raise DataError(
            f"{folder / 'heads.json'}: not a readable heads file ({' '.join(str(e).split())[:120]})"
        ) from None
    vocab = trained if isinstance(trained, int) and not isinstance(trained, bool) else None
    if vocab is None and (folder / "token-counts.npy").is_file() and engine.vocab_size > DRAFT_VOCAB:
        vocab = DRAFT_VOCAB
    onnx_dir = folder / f"onnx-{manifest_sha256(engine.folder)[:16]}{f'-v{vocab}' if vocab else ''}"  # type: ignore[attr-defined]
    if not (onnx_dir / HEADS_MANIFEST).is_file():
        with err.status(f"exporting the heads for {escape(str(engine.folder))}"):  # type: ignore[attr-defined]
            export_heads(folder, engine.folder, onnx_dir, vocab_size=vocab)  # type: ignore[attr-defined]
    return OrtHeads(onnx_dir, engine)
