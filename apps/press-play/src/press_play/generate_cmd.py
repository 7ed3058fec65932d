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
    typer.Option(
        "--knn-settings",
        help="kNN-LM mixture: k=1024,lambda=0.3,temperature=66.8 (any of them; the defaults suit SmolLM2).",
    ),
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
    temperature: Annotated[
        float | None,
        typer.Option(
            "--temperature",
            "-t",
            help="Sampling temperature; 0 is greedy. 0.2 by default; an omni "
            "bundle's media answers default to the bundle's own (the one its figures were measured at).",
        ),
    ] = None,
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
    exact: Annotated[
        bool | None,
        typer.Option(
            "--exact/--no-exact",
            help="ONNX engine: run a one-token step as two rows, so that every position gets the same logits "
            "in a step as in a verification and greedy speculative output equals plain output token for "
            "token (a step costs a second row). On by default with --speculative.",
        ),
    ] = None,
    image: Annotated[
        Path | None,
        typer.Option("--image", help="Omni bundle: an image to ask about (read as 28 x 28 grey, resized)."),
    ] = None,
    audio: Annotated[
        Path | None, typer.Option("--audio", help="Omni bundle: a WAV of speech to ask about (up to 3 s).")
    ] = None,
    video: Annotated[
        Path | None,
        typer.Option("--video", help="Omni bundle: an MP4 clip (frames and sound track) to ask about."),
    ] = None,
    output_modality: Annotated[
        str | None,
        typer.Option(
            "--output-modality",
            help="Omni bundle: answer with an image, audio or video (sampled at --temperature, --seed) "
            "written to --output; text answers are greedy.",
        ),
    ] = None,
    guidance: Annotated[
        float | None,
        typer.Option(
            "--guidance",
            help="Omni bundle: classifier-free guidance of a media answer (1: none); "
            "the bundle's own by default.",
        ),
    ] = None,
    output: Annotated[
        Path | None, typer.Option("--output", help="With --output-modality: the PNG, WAV or MP4 to write.")
    ] = None,
    candidates: Annotated[
        int,
        typer.Option(
            "--candidates",
            help="Omni bundle: draw this many media answers and write the one the bundle's cross-modal "
            "verifier scores best against the digits asked for.",
        ),
    ] = 1,
) -> None:
    """Generate text from a prompt, streamed to stdout; tokens/s goes to stderr. An omni bundle (press-play
    export --format omni) also takes --image, --audio and --video, and answers in --output-modality."""
    with reporting_errors():
        media = {"--image": image, "--audio": audio, "--video": video, "--output-modality": output_modality,
                 "--output": output}  # fmt: skip
        if is_omni_bundle(model) or any(v is not None for v in media.values()):
            others = {"--kv": kv, "--knn": knn, "--rag": rag, "--speculative": speculative, "--exact": exact}
            if used := [k for k, v in others.items() if v is not None]:
                raise DataError(f"{', '.join(used)}: not for an omni bundle")
            if engine not in ("auto", "onnx"):
                raise DataError(f"--engine {engine}: an omni bundle runs with onnx")
            generate_omni(model, prompt, image, audio, video, output_modality, output, max_new_tokens,
                          temperature, seed or 0, guidance, candidates)  # fmt: skip
            return
        if guidance is not None or candidates != 1:
            raise DataError("--guidance, --candidates: only for an omni bundle's media answers")
        temperature = 0.2 if temperature is None else temperature
        config = SamplingConfig(
            max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
            repetition_penalty=repetition_penalty, seed=seed, stop_strings=tuple(stop or ()),
        )  # fmt: skip
        runner = open_runner(
            model, engine, kv, knn, knn_settings, speculative is not None if exact is None else exact
        )
        if exact and runner.engine.name != "onnx":
            raise DataError(f"--exact: for the ONNX engine (this model runs on {runner.engine.name})")
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


OMNI_OUTPUTS = {"image": (".png",), "audio": (".wav",), "video": (".mp4", ".mov", ".mkv")}


def is_omni_bundle(source: str) -> bool:
    """A folder press-play export --format omni wrote (omni_runtime.omni.MANIFEST; not imported for
    text models, which do not need onnxruntime loaded to ask)."""
    return (Path(source) / "omni-bundle.json").is_file()


def generate_omni(bundle: str, prompt: str, image: Path | None, audio: Path | None, video: Path | None,
                  modality: str | None, output: Path | None, max_new_tokens: int, temperature: float | None,
                  seed: int, guidance: float | None = None, candidates: int = 1) -> None:  # fmt: skip
    """An omni bundle's answer: text on stdout, or an image, speech or a clip written to `output` (with
    `candidates` > 1, the one the bundle's verifier scores best)."""
    import time

    import numpy as np

    from omni_runtime.omni import OmniRuntime
    from press_play.common import out, settings

    if not is_omni_bundle(bundle):
        raise DataError(f"--image, --audio, --video and --output-modality take an omni bundle (press-play export "
                        f"--format omni); {bundle} is not one")  # fmt: skip
    if (modality is None) != (output is None):
        raise DataError("--output-modality and --output go together")
    if modality is not None:
        if modality not in OMNI_OUTPUTS:
            raise DataError(f"--output-modality {modality}: must be image, audio or video")
        if output.suffix.lower() not in OMNI_OUTPUTS[modality]:  # type: ignore[union-attr]
            raise DataError(
                f"--output {output}: a {modality} is written as {' or '.join(OMNI_OUTPUTS[modality])}"
            )
        if image is not None or audio is not None or video is not None:
            raise DataError(
                "--output-modality answers a text prompt; it does not take --image, --audio or --video"
            )
    if temperature is not None and temperature < 0:
        raise DataError(f"--temperature {temperature}: must be >= 0")
    if guidance is not None and not 0 < guidance <= 100:
        raise DataError(f"--guidance {guidance}: must be in (0, 100]")
    if guidance is not None and modality is None:
        raise DataError("--guidance steers a media answer; it needs --output-modality")
    if not 1 <= candidates <= 64:
        raise DataError(f"--candidates {candidates}: must be in 1..64")
    if candidates != 1 and modality is None:
        raise DataError("--candidates draws media answers; it needs --output-modality")
    with err.status(f"opening {escape(bundle)} with ONNX Runtime"):
        rt = OmniRuntime(bundle, threads=settings.threads)
    t0 = time.perf_counter()
    if modality is None:
        ids = rt.answer_ids(prompt, image, audio, video, max_new_tokens)
        write(rt.tokenizer.decode([i for i in ids if i < rt.text_vocab], skip_special_tokens=True) + "\n")
        err.print(f"[dim]{len(ids)} tokens in {time.perf_counter() - t0:.2f}s[/dim]", soft_wrap=True)
        return
    drawn = rt.generate_media(prompt, modality, candidates, seed, temperature, guidance, rerank=False)  # type: ignore[arg-type]
    scores = rt.verify(prompt, modality, drawn) if candidates > 1 else None  # type: ignore[arg-type]
    result = drawn[int(np.argmax(scores))] if scores is not None else drawn[0]
    took = time.perf_counter() - t0
    _write_media(output, modality, result, rt)  # type: ignore[arg-type]
    what = {"image": lambda r: f"{r.shape[1]} x {r.shape[0]} image",
            "audio": lambda r: f"{len(r)} spoken word{'s' * (len(r) != 1)}",
            "video": lambda r: f"{len(r)} frames of {r.shape[2]} x {r.shape[1]}"}[modality](result)  # fmt: skip
    out.print(f"wrote {escape(str(output))}: {what}", soft_wrap=True)
    if candidates > 1:
        err.print("[dim]" + (f"the verifier's pick of {candidates} (scores {', '.join(f'{x:.2f}' for x in scores)})"
                             if scores is not None else
                             f"the first of {candidates}: the bundle has no verifier, or the prompt names no "
                             "digit for it to check") + "[/dim]", soft_wrap=True)  # fmt: skip
    err.print(f"[dim]generated in {took:.2f}s[/dim]", soft_wrap=True)


def _write_media(path: Path, modality: str, x, rt) -> None:
    """PNG, WAV (the words one after another, 0.1 s apart) or MP4 at the bundle's frame rate."""

    import numpy as np

    from omni_media.errors import MediaError

    if modality == "audio":
        from omni_runtime.omni import write_wav

        rate = rt.layout["audio"]["sample_rate"]
        gap = np.zeros((len(x), rate // 10), np.float32)
        write_wav(path, np.concatenate([x, gap], axis=1).reshape(-1)[: -rate // 10], rate)
    elif modality == "video":
        from omni_media.video import write_video

        try:
            write_video(path, x, fps=rt.layout["video"]["fps"])
        except MediaError as e:
            raise DataError(str(e)) from None
    else:
        from PIL import Image

        from omni_model.files import writing_file

        try:
            with writing_file(path, ".png") as tmp:
                Image.fromarray(x, mode="L").save(tmp, format="PNG")
        except OSError as e:
            raise DataError(f"{path}: cannot write: {' '.join(str(e).split())[:200]}") from None
