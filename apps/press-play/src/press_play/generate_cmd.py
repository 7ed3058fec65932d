"""`press-play generate`: stream a completion of one prompt, then its speed on stderr.

The sampling options are defined once here as Annotated aliases and shared with `chat`. Defaults are
the SmolLM2 model card's (temperature 0.2, top-p 0.9); --temperature 0 is greedy.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape

from omni_model.errors import DataError
from omni_model.sampling_config import SamplingConfig
from omni_model.zoo import DEFAULT_MODEL
from press_play.common import Runner, err, open_runner, reporting_errors

if TYPE_CHECKING:
    from omni_model.streaming import GenerationResult
    from omni_runtime.speculative import Proposer

Model = Annotated[
    str,
    typer.Option("--model", "-m", help="Hugging Face folder, .gguf file, zoo name, or an exported folder."),
]
EngineOption = Annotated[
    str,
    typer.Option(
        "--engine",
        help="torch, onnx or executorch (exported folders), or auto: by the folder's manifest.",
    ),
]
KVOption = Annotated[
    str | None,
    typer.Option(
        "--kv",
        help="KV cache of the PyTorch engine: dense, int8, kivi, nf4, sink, window, paged "
        "(settings after a colon: kivi:bits=8, sink:window=1024, paged:budget_bytes=16MiB).",
    ),
]
KNNOption = Annotated[
    str | None,
    typer.Option(
        "--knn", help="A kNN-LM datastore (press-play index datastore) to mix into the predictions."
    ),
]
KNNSettingsOption = Annotated[
    str | None,
    typer.Option("--knn-settings", help="kNN-LM mixture: k=16,lambda=0.25,temperature=10 (any of them)."),
]
MaxNewTokens = Annotated[int, typer.Option("--max-new-tokens", "-n", help="Most tokens to generate.")]
Temperature = Annotated[float, typer.Option("--temperature", "-t", help="Sampling temperature; 0 is greedy.")]
TopK = Annotated[int, typer.Option("--top-k", help="Keep the k most likely tokens; 0 is off.")]
TopP = Annotated[
    float, typer.Option("--top-p", help="Keep the most likely tokens up to this total probability; 1 is off.")
]
MinP = Annotated[
    float,
    typer.Option("--min-p", help="Drop tokens below this fraction of the top token's probability; 0 is off."),
]
RepetitionPenalty = Annotated[
    float,
    typer.Option("--repetition-penalty", help="Penalize tokens already in the prompt or output; 1 is off."),
]
Seed = Annotated[
    int | None, typer.Option("--seed", help="Seed for sampling; the same seed gives the same text.")
]


def write(text: str) -> None:
    """Stream text to stdout as is (no markup, no wrapping)."""
    typer.echo(text, nl=False)


def stats_line(r: GenerationResult) -> str:
    line = (f"{r.n_generated} tokens, {r.decode_tokens_per_second:.1f} tok/s decode, "
            f"prompt {r.n_prompt} tokens in {r.prefill_seconds:.2f}s, finish: {r.finish_reason}")  # fmt: skip
    if (s := r.speculation) is not None:
        line += (f"; speculative ({s.proposer}): {s.tokens_per_step:.2f} tokens per verification step, "
                 f"{s.accepted}/{s.drafted} drafts kept ({100 * s.acceptance_rate:.0f}%)")  # fmt: skip
    return line


def chat_prompt(runner: Runner, messages: list[dict[str, str]]) -> str:
    return runner.tokenizer.apply_chat_template(messages, add_generation_prompt=True)


def stream_reply(runner: Runner, prompt: str, config: SamplingConfig, speculative: Proposer | None = None,
                 draft_tokens: int = 4) -> GenerationResult:  # fmt: skip
    """Generate from a text prompt, streaming to stdout; end the line and print speed on stderr."""
    from omni_runtime.generate import generate_text

    result = generate_text(runner.engine, runner.tokenizer, prompt, config, on_text=write, speculative=speculative,
                           draft_tokens=draft_tokens)  # fmt: skip
    write("\n")
    err.print(f"[dim]{stats_line(result)}[/dim]", soft_wrap=True)
    return result


def generate(
    prompt: Annotated[str, typer.Argument(help="The prompt text.")],
    model: Model = DEFAULT_MODEL,
    engine: EngineOption = "auto",
    kv: KVOption = None,
    knn: KNNOption = None,
    knn_settings: KNNSettingsOption = None,
    max_new_tokens: MaxNewTokens = 256,
    temperature: Temperature = 0.2,
    top_k: TopK = 0,
    top_p: TopP = 0.9,
    min_p: MinP = 0.0,
    repetition_penalty: RepetitionPenalty = 1.0,
    seed: Seed = None,
    stop: Annotated[
        list[str] | None, typer.Option("--stop", help="Stop when the text contains this string (repeatable).")
    ] = None,
    chat: Annotated[
        bool,
        typer.Option("--chat/--raw", help="Wrap the prompt in the model's chat template, or send it as is."),
    ] = True,
    rag: Annotated[
        str | None,
        typer.Option(
            "--rag", help="An index of text (press-play index build): put its nearest chunks in the prompt."
        ),
    ] = None,
    rag_k: Annotated[int, typer.Option("--rag-k", min=1, help="Chunks to retrieve with --rag.")] = 3,
    speculative: Annotated[
        str | None,
        typer.Option(
            "--speculative",
            help="Draft tokens and verify several per forward: lookup (n-grams of the prompt and text so far), "
            "draft:MODEL (a smaller model with the same vocabulary) or heads:PATH (press-play train heads).",
        ),
    ] = None,
    draft_tokens: Annotated[
        int, typer.Option("--draft-tokens", help="Most drafts one forward verifies (1..16).")
    ] = 4,
) -> None:
    """Generate text from a prompt, streamed to stdout; tokens/s goes to stderr."""
    with reporting_errors():
        config = SamplingConfig(
            max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
            repetition_penalty=repetition_penalty, seed=seed, stop_strings=tuple(stop or ()),
        )  # fmt: skip
        runner = open_runner(model, engine, kv, knn, knn_settings)
        proposer = None
        if speculative is not None:
            from press_play.common import open_proposer

            if knn is not None:
                raise DataError("--speculative does not combine with --knn (the kNN mixture is not verified)")
            proposer = open_proposer(speculative, runner)
        elif draft_tokens != 4:
            raise DataError("--draft-tokens needs --speculative")
        messages = [{"role": "user", "content": prompt}]
        sources = []
        if rag is not None:
            if not chat:
                raise DataError("--rag puts passages in chat messages; it does not combine with --raw")
            from omni_retrieval.rag import Retriever, rag_messages

            sources = Retriever(rag)(prompt, rag_k)
            messages = rag_messages(prompt, sources)
        text = chat_prompt(runner, messages) if chat else prompt
        stream_reply(runner, text, config, proposer, draft_tokens)
        for i, src in enumerate(sources, 1):
            err.print(
                f"[dim][{i}] {escape(Path(src.file).name)}, token {src.start}, score {src.score:.3f}[/dim]"
            )
