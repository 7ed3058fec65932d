"""`press-play tour`: a short tour of the default model that says what it did.

Load the zoo model, stream a chat-templated reply with its speed, measure perplexity on the start of
Hamlet, then summarize and show the commands that go further.
"""

from __future__ import annotations

from rich.markup import escape
from rich.table import Table

from omni_model.sampling_config import SamplingConfig
from omni_model.zoo import DEFAULT_MODEL
from press_play.common import describe, load_model, out, read_text, runner_for
from press_play.eval_cmd import text_perplexity
from press_play.generate_cmd import chat_prompt, stream_reply

PROMPT = "In two sentences, who is Hamlet and what troubles him?"
TEXT, CONTEXT, MAX_TOKENS = "hamlet", 512, 4096
# Greedy, so the tour prints the same reply on every run.
SAMPLING = SamplingConfig(max_new_tokens=64, temperature=0.0)
NEXT_STEPS = [
    ('press-play generate "Write a sonnet about the sea" --temperature 0.7', "sample a completion"),
    ("press-play chat --system 'You are a helpful assistant.'", "talk to the model"),
    ("press-play eval perplexity --text macbeth --context 1024", "score another play"),
    ("press-play --help", "every command and option"),
]


def run_tour(model: str = DEFAULT_MODEL) -> None:
    """Load `model`, generate from a chat prompt, measure perplexity on Hamlet, summarize."""
    out.print(f"[bold]press-play tour[/bold] of [bold]{escape(model)}[/bold].\n")

    lm, load_s = load_model(model)
    out.print(
        f"[green]1. loaded[/green] {escape(lm.source)} in {load_s:.1f}s: {describe(lm)}", soft_wrap=True
    )

    out.print(
        f"\n[green]2. generating[/green] (chat template, greedy, up to {SAMPLING.max_new_tokens} tokens)"
    )
    out.print(f"[bold]you>[/bold] {escape(PROMPT)}")
    out.print("[bold]model>[/bold] ", end="")
    runner = runner_for(lm)
    gen = stream_reply(runner, chat_prompt(runner, [{"role": "user", "content": PROMPT}]), SAMPLING)

    out.print(
        f"\n[green]3. perplexity[/green] on Hamlet's first {MAX_TOKENS} tokens, {CONTEXT}-token windows"
    )
    ppl, n_tokens, ppl_s = text_perplexity(runner, read_text(TEXT), CONTEXT, MAX_TOKENS)
    out.print(f"perplexity [bold]{ppl.ppl:.2f}[/bold] ({ppl.n_scored} tokens scored in {ppl.n_windows} windows, "
              f"{ppl_s:.1f}s)")  # fmt: skip

    done = Table(title="What was done", show_header=False, box=None, title_justify="left", padding=(0, 2))
    done.add_row("load", f"{escape(lm.source)} ({load_s:.1f}s)")
    done.add_row("generate", f"{gen.n_generated} tokens at {gen.decode_tokens_per_second:.1f} tok/s")
    done.add_row("perplexity", f"{ppl.ppl:.2f} on Hamlet, {n_tokens} tokens, context {CONTEXT}")
    out.print()
    out.print(done)
    out.print("\n[bold]Go further[/bold]")
    for command, what in NEXT_STEPS:
        out.print(f"  [cyan]{escape(command)}[/cyan]  [dim]# {what}[/dim]", soft_wrap=True)
