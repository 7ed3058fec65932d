"""What every command shares: the two consoles, one-line errors, loading with a spinner, texts.

Generated text and --json go to stdout; spinners, progress bars, statistics and errors go to
stderr, so `press-play generate ... > out.txt` captures only the text.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from omni_model.errors import DataError, OmniError

if TYPE_CHECKING:
    from omni_model.loader import LoadedModel

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


def fail(message: str, code: int = 1) -> NoReturn:
    """Print `error: message` as one line on stderr and exit."""
    # soft_wrap: a long message stays one line (a pipe or CI log should not see it wrapped at 80).
    err.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)
    raise typer.Exit(code)


@contextmanager
def reporting_errors() -> Iterator[None]:
    """Turn bad input (any OmniError) into one line and exit 1; Ctrl-C into a short note and exit 130."""
    try:
        yield
    except OmniError as e:
        fail(str(e))
    except KeyboardInterrupt:
        err.print("\n[yellow]interrupted[/yellow]")
        raise typer.Exit(130) from None


def load_model(source: str) -> tuple[LoadedModel, float]:
    """Load a model under a spinner; return it and the seconds it took."""
    import omni_model

    t0 = time.perf_counter()
    with err.status(f"loading {escape(source)}"):
        lm = omni_model.load(source)
    return lm, time.perf_counter() - t0


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
