"""`press-play chat`: an interactive conversation through the model's chat template.

The whole history is re-encoded and prefilled each turn: simple, and cheap at these model sizes.
A failed or interrupted turn leaves the history as it was, so the user can /reset or go on.
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape

from omni_model.errors import OmniError
from omni_model.sampling_config import SamplingConfig
from omni_model.zoo import DEFAULT_MODEL
from press_play.common import err, open_runner, out, reporting_errors
from press_play.generate_cmd import (
    EngineOption,
    KNNOption,
    KNNSettingsOption,
    KVOption,
    MaxNewTokens,
    MinP,
    Model,
    RepetitionPenalty,
    Seed,
    Temperature,
    TopK,
    TopP,
    chat_prompt,
    stream_reply,
)

HELP = "[dim]/reset clears the history, /exit (or Ctrl-D) leaves; Ctrl-C stops a reply.[/dim]"


def chat(
    model: Model = DEFAULT_MODEL,
    engine: EngineOption = "auto",
    kv: KVOption = None,
    knn: KNNOption = None,
    knn_settings: KNNSettingsOption = None,
    system: Annotated[
        str | None, typer.Option("--system", help="A system message that opens the conversation.")
    ] = None,
    max_new_tokens: MaxNewTokens = 512,
    temperature: Temperature = 0.2,
    top_k: TopK = 0,
    top_p: TopP = 0.9,
    min_p: MinP = 0.0,
    repetition_penalty: RepetitionPenalty = 1.0,
    seed: Seed = None,
) -> None:
    """Chat with a model in the terminal; the history is kept until /reset."""
    with reporting_errors():
        config = SamplingConfig(
            max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
            repetition_penalty=repetition_penalty, seed=seed,
        )  # fmt: skip
        runner = open_runner(model, engine, kv, knn, knn_settings)
    start = [{"role": "system", "content": system}] if system else []
    history = list(start)
    err.print(f"[bold]{escape(runner.source)}[/bold] [dim]({runner.description})[/dim]", soft_wrap=True)
    err.print(HELP)
    while True:
        try:
            line = out.input("[bold green]you>[/bold green] ").strip()
        except (EOFError, KeyboardInterrupt):
            out.print()
            return
        if not line:
            continue
        if line == "/exit":
            return
        if line == "/reset":
            history = list(start)
            err.print("[dim]history cleared[/dim]")
            continue
        if line.startswith("/"):
            err.print(f"[yellow]unknown command {escape(line)}[/yellow] {HELP}", soft_wrap=True)
            continue
        messages = [*history, {"role": "user", "content": line}]
        try:
            result = stream_reply(runner, chat_prompt(runner, messages), config)
        except OmniError as e:
            err.print(f"[red]error:[/red] {escape(str(e))} [dim](/reset starts over)[/dim]", soft_wrap=True)
            continue
        except KeyboardInterrupt:
            err.print("\n[yellow]reply interrupted; it is not kept in the history[/yellow]")
            continue
        history = [*messages, {"role": "assistant", "content": result.text or ""}]
