"""The `press-play` command: build (also what a bare `press-play` runs), generate, chat, eval, export, ...

Commands stay thin (parse, call omni_model, render); each lives in its own module and is registered
here. `DEFAULT_ACTION` is what a bare `press-play` runs: the single-button build of the default model
for the default profile.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Annotated

import typer

from press_play.build_cmd import build, run_build
from press_play.chat_cmd import chat
from press_play.common import installed_versions, out, reporting_errors, settings
from press_play.eval_cmd import eval_app
from press_play.export_cmd import export
from press_play.generate_cmd import generate
from press_play.index_cmd import index_app
from press_play.kv_cmd import kv_app
from press_play.media_cmd import media_app
from press_play.tour import run_tour
from press_play.train_cmd import train_app

DEFAULT_ACTION: Callable[[], None] = run_build

app = typer.Typer(
    name="press-play",
    help="OmniCoder's press-play: build, run, chat with and evaluate small on-device language models.\n\n"
    "With no command, builds the default model (smollm2-135m-instruct) for the mobile-2gb profile: "
    "press-play build.",
    invoke_without_command=True,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.command()(build)
app.command()(generate)
app.command()(chat)
app.command()(export)
app.add_typer(eval_app, name="eval")
app.add_typer(kv_app, name="kv")
app.add_typer(index_app, name="index")
app.add_typer(train_app, name="train")
app.add_typer(media_app, name="media")
app.command("tour")(run_tour)


def _print_version(value: bool) -> None:
    if not value:
        return
    for name, version in installed_versions():
        out.print(f"{name} {version}", highlight=False)
    raise typer.Exit()


def _all_cores() -> int:
    # The cores this process may run on (a container or taskset may allow fewer than cpu_count).
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@app.callback()
def root(
    ctx: typer.Context,
    threads: Annotated[
        int | None,
        typer.Option(
            "--threads", min=1, help="CPU threads for torch and ONNX Runtime. [dim]Default: all cores.[/dim]"
        ),
    ] = None,
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=_print_version,
            is_eager=True,
            help="Show the versions of every omni-* package and exit.",
        ),
    ] = False,
) -> None:
    """OmniCoder's press-play: build, run, chat with and evaluate small on-device language models."""
    import torch

    settings.threads = threads or _all_cores()
    torch.set_num_threads(settings.threads)
    if ctx.invoked_subcommand is None:
        with reporting_errors():
            DEFAULT_ACTION()


def main() -> None:
    app()


if __name__ == "__main__":  # torchrun -m press_play.cli train ...
    main()
