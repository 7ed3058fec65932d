"""`press-play eval ...`: measurements of a model. For now: perplexity on a text."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from omni_model.zoo import DEFAULT_MODEL
from press_play.common import Runner, err, open_runner, out, read_text, reporting_errors
from press_play.generate_cmd import EngineOption, KNNOption, KNNSettingsOption, KVOption, Model

if TYPE_CHECKING:
    from omni_model.metrics import PerplexityResult

eval_app = typer.Typer(help="Evaluate a model.", no_args_is_help=True, rich_markup_mode="rich")


def text_perplexity(runner: Runner, text: str, context: int, max_tokens: int | None,
                    show_progress: bool = True) -> tuple[PerplexityResult, int, float]:  # fmt: skip
    """Tokenize and score a text, with a progress bar over windows on stderr; also tokens and seconds."""
    from omni_runtime.perplexity import perplexity

    ids = runner.tokenizer.encode(text)
    n_tokens = len(ids) if max_tokens is None else min(len(ids), max_tokens)
    t0 = time.perf_counter()
    columns = (
        TextColumn("perplexity"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("windows"),
        TimeElapsedColumn(),
    )
    # Off when stderr is not a terminal: a log gains nothing from a bar, and rich would leave a blank line.
    with Progress(
        *columns, console=err, transient=True, disable=not (show_progress and err.is_terminal)
    ) as bar:
        task = bar.add_task("windows", total=None)
        result = perplexity(runner.engine, ids, context, max_tokens=max_tokens,
                            on_progress=lambda done, total: bar.update(task, completed=done, total=total))  # fmt: skip
    return result, n_tokens, time.perf_counter() - t0


@eval_app.command("perplexity")
def perplexity_cmd(
    model: Model = DEFAULT_MODEL,
    engine: EngineOption = "auto",
    kv: KVOption = None,
    knn: KNNOption = None,
    knn_settings: KNNSettingsOption = None,
    text: Annotated[
        str,
        typer.Option(
            "--text", help="A text file, or a Shakespeare play by short name (hamlet, macbeth, ...)."
        ),
    ] = "hamlet",
    context: Annotated[
        int, typer.Option("--context", min=2, help="Window length in tokens; windows do not overlap.")
    ] = 512,
    max_tokens: Annotated[
        int | None, typer.Option("--max-tokens", min=2, help="Score only the first N tokens of the text.")
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON object to stdout, and no progress bar.")
    ] = False,
) -> None:
    """Perplexity of a model on a text, scored in non-overlapping windows of --context tokens.

    The text's tokens are cut into consecutive windows of --context tokens, with no overlap and no stride; in each window every token but the first is scored given the tokens before it in that window. This is how transformers-based reference numbers are computed.
    """
    with reporting_errors():
        body = read_text(text)
        runner = open_runner(model, engine, kv, knn, knn_settings)
        result, n_tokens, seconds = text_perplexity(
            runner, body, context, max_tokens, show_progress=not as_json
        )
    if as_json:
        record = {"model": runner.source, "engine": runner.engine.name, "text": text, "n_tokens": n_tokens, "context": result.context,
                  "n_windows": result.n_windows, "n_scored": result.n_scored, "nll_sum": result.nll_sum,
                  "ppl": result.ppl, "seconds": round(seconds, 3)}  # fmt: skip
        typer.echo(json.dumps(record))
        return
    out.print(f"perplexity [bold]{result.ppl:.3f}[/bold]", highlight=False)
    err.print(
        f"[dim]{escape(runner.source)} ({runner.engine.name}) on {escape(text)}: {n_tokens} tokens in {result.n_windows} windows of "
        f"{context}, {result.n_scored} scored, {seconds:.1f}s[/dim]",
        soft_wrap=True,
    )
