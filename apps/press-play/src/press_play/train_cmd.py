"""`press-play train ...`: distill, pretrain, lora and moe (omni_train), with a time budget, a printed
plan, a live progress bar, and --resume."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.progress import (
    BarColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from omni_model.zoo import DEFAULT_MODEL
from press_play.common import err, out, reporting_errors

train_app = typer.Typer(help="Train: distil a sparse student, pretrain it, LoRA, upcycled MoE.",
                        no_args_is_help=True, rich_markup_mode="rich")  # fmt: skip

Data = Annotated[list[str] | None, typer.Option("--data", help="Text files, folders of .txt, or 'shakespeare' (default); repeatable.")]  # fmt: skip
Out = Annotated[
    Path, typer.Option("--out", "-o", help="Run folder: plan, metrics, checkpoint, the trained model.")
]
Minutes = Annotated[
    float | None, typer.Option("--budget-minutes", help="Wall-clock budget, resumes included.")
]
Hours = Annotated[float | None, typer.Option("--budget-hours", help="Wall-clock budget in hours.")]
Steps = Annotated[int | None, typer.Option("--steps", help="Optimizer steps (at most, with a budget).")]
SeqLen = Annotated[int, typer.Option("--seq-len", help="Tokens per sequence.")]
Batch = Annotated[int, typer.Option("--batch-size", help="Sequences per micro-step.")]
Accum = Annotated[int, typer.Option("--grad-accum", help="Micro-steps per optimizer step.")]
LR = Annotated[float, typer.Option("--lr", help="Peak learning rate (AdamW, warmup then cosine).")]
Resume = Annotated[bool, typer.Option("--resume", help="Go on from the run folder's checkpoint.")]
BF16 = Annotated[bool, typer.Option("--bf16", help="bfloat16 autocast for the forward pass.")]
EvalEvery = Annotated[int, typer.Option("--eval-every", help="Validation perplexity every N steps.")]
Seed = Annotated[int, typer.Option("--seed", help="Seed for weights and data order.")]
Cache = Annotated[
    Path | None,
    typer.Option(
        "--data-cache", help="Where tokenized datasets are kept. [dim]Default: the omnicoder cache.[/dim]"
    ),
]
Teacher = Annotated[str, typer.Option("--teacher", help="Zoo name, folder or GGUF of the teacher.")]
Base = Annotated[str, typer.Option("--model", "-m", help="Zoo name, folder or GGUF of the base model.")]
Student = Annotated[str, typer.Option("--student", help="Student preset: mla-moe-30m or dense-30m.")]


@dataclass(frozen=True)
class Common:
    data: list[str]
    out: Path
    budget_s: float | None
    steps: int | None
    seq_len: int
    batch_size: int
    grad_accum: int
    lr: float
    resume: bool
    bf16: bool
    eval_every: int
    seed: int
    cache: Path | None

    def config(self):
        from omni_train import TrainConfig

        return TrainConfig(seq_len=self.seq_len, batch_size=self.batch_size, grad_accum=self.grad_accum, lr=self.lr,
                           min_lr=self.lr / 10, steps=self.steps, budget_s=self.budget_s, eval_every=self.eval_every,
                           bf16=self.bf16, seed=self.seed)  # fmt: skip


def _common(
    data, out_dir, minutes, hours, steps, seq_len, batch, accum, lr, resume, bf16, eval_every, seed, cache
) -> Common:
    from omni_train.loop import init_distributed
    from press_play.common import fail

    init_distributed()  # under torchrun: join the group; every process runs the same command
    if minutes is not None and hours is not None:
        fail("give --budget-minutes or --budget-hours, not both")
    budget = minutes * 60 if minutes is not None else hours * 3600 if hours is not None else None
    if budget is None and steps is None:
        fail("give a budget (--budget-minutes / --budget-hours) or --steps")
    return Common(data or ["shakespeare"], out_dir, budget, steps, seq_len, batch, accum, lr, resume, bf16,
                  eval_every, seed, cache)  # fmt: skip


class _Display:
    """The plan as a line, then a bar with loss, tokens/s and the time left; evaluations as lines."""

    def __init__(self) -> None:
        cols = (TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn())  # fmt: skip
        self.bar = Progress(*cols, console=err, disable=not err.is_terminal)
        self.task = None

    def __call__(self, e) -> None:
        from omni_train.loop import rank

        if rank() != 0:
            return
        if e.kind == "plan":
            d = e.data
            err.print(f"plan: {d['steps']:,} steps, {d['tokens']:,} tokens, about {d['expected_s'] / 60:.1f} min "
                      f"({d['step_s']:.2f} s/step, {d['world']} process(es)); written to plan.json", soft_wrap=True)  # fmt: skip
            self.bar.start()
            self.task = self.bar.add_task("training", total=e.steps, completed=e.step, info="")
        elif e.kind == "step" and self.task is not None:
            d = e.data
            self.bar.update(
                self.task, completed=e.step, info=f"loss {d['loss']:.3f}  {d['tok_s']:,.0f} tok/s"
            )
        elif e.kind == "eval" and e.data:
            figures = [f"perplexity {e.data['val_ppl']:.2f}"] if "val_ppl" in e.data else []
            figures += [
                f"{k.removesuffix('_acc')} top-1 {v:.1%}" for k, v in e.data.items() if k.endswith("_acc")
            ]
            err.print(f"step {e.step}: validation {', '.join(figures)}")
        elif e.kind == "done":
            self.bar.stop()


class _Steps:
    """A transient bar for a stage before training (teacher logits, greedy continuations): the
    callback `(what, done, total)`; stopped when the stage is done or fails."""

    def __init__(self) -> None:
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn(),
                            TextColumn("eta"), TimeRemainingColumn(), console=err, transient=True,
                            disable=not err.is_terminal)  # fmt: skip
        self.task = None

    def __enter__(self):
        return self

    def __call__(self, what: str, done: int, total: int) -> None:
        if self.task is None:
            self.bar.start()
            self.task = self.bar.add_task(what, total=total)
        self.bar.update(self.task, completed=done, description=what)
        if done >= total:
            self.bar.stop()

    def __exit__(self, *exc) -> None:
        self.bar.stop()


def _data(common: Common, base):
    from omni_model.corpus import default_cache_dir
    from omni_train import run

    with err.status("tokenizing the data") as status:

        def report(what: str, done: int, total: int) -> None:
            status.update(f"{escape(what)} {done}/{total}")

        cache = common.cache or default_cache_dir().parent / "datasets"
        return run.dataset(common.data, base, cache, on_progress=report)


def _finish(result, what: str, path: Path) -> None:
    from omni_train.loop import rank

    if rank() != 0:
        return
    ppl = result.metrics.get("val_ppl")
    ppl_text = "" if ppl is None else f"; validation perplexity {ppl:.2f}"
    out.print(f"{what}: {result.steps:,} steps, {result.tokens:,} tokens in {result.elapsed_s / 60:.1f} min "
              f"(stopped: {result.stopped}){ppl_text}; wrote [bold]{escape(str(path))}[/bold]", soft_wrap=True)  # fmt: skip
    if result.stopped == "interrupted":
        err.print(f"[yellow]interrupted[/yellow]: the checkpoint in {escape(str(result.checkpoint))} is intact; "
                  "go on with the same command and --resume", soft_wrap=True)  # fmt: skip
        raise typer.Exit(130)


@train_app.command()
def distill(
    out_dir: Out, teacher: Teacher = DEFAULT_MODEL, student: Student = "mla-moe-30m", data: Data = None,
    budget_minutes: Minutes = None, budget_hours: Hours = None, steps: Steps = None, seq_len: SeqLen = 256,
    batch_size: Batch = 8, grad_accum: Accum = 1, lr: LR = 2e-3, resume: Resume = False, bf16: BF16 = False,
    eval_every: EvalEvery = 100, seed: Seed = 0, data_cache: Cache = None,
    temperature: Annotated[float, typer.Option("--temperature", help="Softening of both distributions (1: one softmax serves both loss terms, the cheapest step).")] = 1.0,
    alpha: Annotated[float, typer.Option("--alpha", help="Weight of the teacher term (the rest: data CE).")] = 0.5,
    cache_teacher: Annotated[int | None, typer.Option("--cache-teacher", min=1, max=4096, help="Compute the teacher's top-K logits of every training window once, beside the dataset, and train from them (no teacher during training).")] = None,
    inherit: Annotated[bool, typer.Option("--inherit-embeddings/--random-embeddings", help="Start the student's token embedding from the teacher's, projected on its top principal directions.")] = True,
) -> None:  # fmt: skip
    """Distil the teacher into a small student sharing its tokenizer (KL on softened logits + CE)."""
    with reporting_errors():
        from omni_train import run

        c = _common(data, out_dir, budget_minutes, budget_hours, steps, seq_len, batch_size, grad_accum, lr,
                    resume, bf16, eval_every, seed, data_cache)  # fmt: skip
        cfg = c.config()
        with err.status(f"loading {escape(teacher)}"):
            t = run.load_base(teacher)
        ds = _data(c, t)
        with _Steps() as report:
            r = run.distill(student, t, ds, cfg, c.out, temperature=temperature, alpha=alpha, cache_k=cache_teacher,
                            inherit=inherit, resume=c.resume, on_event=_Display(), on_progress=report)  # fmt: skip
        _finish(r, f"distilled {student}", c.out / "model")


@train_app.command()
def pretrain(
    out_dir: Out, tokenizer_of: Annotated[str, typer.Option("--tokenizer-of", help="Model whose tokenizer (and vocabulary) the student uses.")] = DEFAULT_MODEL,
    student: Student = "mla-moe-30m", data: Data = None, budget_minutes: Minutes = None, budget_hours: Hours = None,
    steps: Steps = None, seq_len: SeqLen = 256, batch_size: Batch = 8, grad_accum: Accum = 1, lr: LR = 2e-3,
    resume: Resume = False, bf16: BF16 = False, eval_every: EvalEvery = 100, seed: Seed = 0, data_cache: Cache = None,
) -> None:  # fmt: skip
    """Train the student from random weights on the data alone (the baseline distillation must beat)."""
    with reporting_errors():
        from omni_train import run

        c = _common(data, out_dir, budget_minutes, budget_hours, steps, seq_len, batch_size, grad_accum, lr,
                    resume, bf16, eval_every, seed, data_cache)  # fmt: skip
        with err.status(f"loading {escape(tokenizer_of)}"):
            base = run.load_base(tokenizer_of)
        ds = _data(c, base)
        r = run.pretrain(student, base, ds, c.config(), c.out, resume=c.resume, on_event=_Display())
        _finish(r, f"pretrained {student}", c.out / "model")


@train_app.command()
def lora(
    out_dir: Out, model: Base = DEFAULT_MODEL, data: Data = None, budget_minutes: Minutes = None,
    budget_hours: Hours = None, steps: Steps = None, seq_len: SeqLen = 256, batch_size: Batch = 4,
    grad_accum: Accum = 1, lr: LR = 1e-3, resume: Resume = False, bf16: BF16 = False, eval_every: EvalEvery = 100,
    seed: Seed = 0, data_cache: Cache = None,
    rank: Annotated[int, typer.Option("--rank", help="Adapter rank.")] = 8,
    lora_alpha: Annotated[float, typer.Option("--lora-alpha", help="Adapter scale numerator (scale = alpha/rank).")] = 16.0,
    dropout: Annotated[float, typer.Option("--dropout", help="Dropout on the adapter's input.")] = 0.0,
    target: Annotated[list[str] | None, typer.Option("--target", help="Linear names to adapt (repeatable); default: attention and MLP projections.")] = None,
) -> None:  # fmt: skip
    """LoRA adapters on a frozen base; the adapters are saved on their own (out/adapters)."""
    with reporting_errors():
        from omni_train import run
        from omni_train.lora import LoRAConfig

        c = _common(data, out_dir, budget_minutes, budget_hours, steps, seq_len, batch_size, grad_accum, lr,
                    resume, bf16, eval_every, seed, data_cache)  # fmt: skip
        lcfg = LoRAConfig(
            rank=rank, alpha=lora_alpha, dropout=dropout, **({"targets": tuple(target)} if target else {})
        )
        with err.status(f"loading {escape(model)}"):
            base = run.load_base(model)
        ds = _data(c, base)
        r = run.lora(base, ds, c.config(), c.out, lcfg, resume=c.resume, on_event=_Display())
        _finish(r, f"LoRA on {model}", c.out / "adapters")


@train_app.command()
def moe(
    out_dir: Out, model: Base = DEFAULT_MODEL, data: Data = None, budget_minutes: Minutes = None,
    budget_hours: Hours = None, steps: Steps = None, seq_len: SeqLen = 256, batch_size: Batch = 4,
    grad_accum: Accum = 1, lr: LR = 2e-4, resume: Resume = False, bf16: BF16 = False, eval_every: EvalEvery = 100,
    seed: Seed = 0, data_cache: Cache = None,
    experts: Annotated[int, typer.Option("--experts", help="Experts per upcycled FFN.")] = 8,
    top_k: Annotated[int, typer.Option("--top-k", help="Experts per token.")] = 2,
    method: Annotated[str, typer.Option("--method", help="copy (replicated experts) or split (FFN partitioned).")] = "copy",
) -> None:  # fmt: skip
    """Upcycle the base's FFNs to a mixture of experts and go on training it; expert load per step in metrics."""
    with reporting_errors():
        from omni_train import run

        c = _common(data, out_dir, budget_minutes, budget_hours, steps, seq_len, batch_size, grad_accum, lr,
                    resume, bf16, eval_every, seed, data_cache)  # fmt: skip
        with err.status(f"loading {escape(model)}"):
            base = run.load_base(model)
        ds = _data(c, base)
        r = run.moe(base, ds, c.config(), c.out, n_experts=experts, top_k=top_k, method=method, resume=c.resume,
                    on_event=_Display())  # fmt: skip
        _finish(r, f"{model} upcycled to {experts} experts", c.out / "model")


@train_app.command()
def heads(
    out_dir: Out, model: Base = DEFAULT_MODEL, data: Data = None, budget_minutes: Minutes = None,
    budget_hours: Hours = None, steps: Steps = None, seq_len: SeqLen = 128, batch_size: Batch = 8,
    grad_accum: Accum = 1, lr: LR = 1e-3, resume: Resume = False, bf16: BF16 = False, eval_every: EvalEvery = 100,
    seed: Seed = 0, data_cache: Cache = None,
    n_heads: Annotated[int, typer.Option("--heads", help="Heads: head k predicts token t+k+1.")] = 3,
    prompts: Annotated[int, typer.Option("--prompts", min=1, help="Prompts the base continues greedily.")] = 256,
    new_tokens: Annotated[int, typer.Option("--new-tokens", min=1, help="Greedy tokens per prompt.")] = 96,
    soft: Annotated[bool, typer.Option("--soft", help="Match the base's distribution (KL), not its argmax.")] = False,
    chat: Annotated[bool, typer.Option("--chat", help="Prompts are requests about passages, in the chat template: "
                                       "the heads learn the base's answers.")] = False,
    prompt_len: Annotated[int, typer.Option("--prompt-len", min=1, help="Tokens of text per prompt.")] = 32,
    draft_vocab: Annotated[int | None, typer.Option("--draft-vocab", min=1, help="Draft from the N tokens the base "
                                                    "produces most (cheaper heads; FR-Spec).")] = None,
) -> None:  # fmt: skip
    """Medusa-style draft heads on the frozen base, self-distilled on its own greedy continuations."""
    with reporting_errors():
        from omni_train import run
        from omni_train.heads import HeadsConfig

        c = _common(data, out_dir, budget_minutes, budget_hours, steps, seq_len, batch_size, grad_accum, lr,
                    resume, bf16, eval_every, seed, data_cache)  # fmt: skip
        hcfg = HeadsConfig(n_heads=n_heads)
        with err.status(f"loading {escape(model)}"):
            base = run.load_base(model)
        ds = _data(c, base)
        with _Steps() as report:
            r = run.heads(base, ds, c.config(), c.out, hcfg, prompts=prompts, new_tokens=new_tokens, soft=soft,
                          chat=chat, prompt_len=prompt_len, draft_vocab=draft_vocab,
                          resume=c.resume, on_event=_Display(), on_progress=report)  # fmt: skip
        accs = ", ".join(f"head {k} {r.metrics[f'head{k}_acc']:.1%}" for k in range(1, n_heads + 1)
                         if f"head{k}_acc" in r.metrics)  # fmt: skip
        if accs:
            err.print(f"top-1 agreement with the base's greedy token on validation text: {accs}")
        _finish(r, f"{n_heads} heads on {model}", c.out / "heads")


@train_app.command()
def omni(
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Model folder to write (omni_model.load opens it).")] = Path("omni-digits"),
    budget_hours: Annotated[float, typer.Option("--budget-hours", min=0.01, help="Wall clock of the whole run.")] = 1.75,
    media: Annotated[Path | None, typer.Option("--media", help="A `press-play media train` folder: its tokenizers "
                                               "are used instead of training them here.")] = None,
    quick: Annotated[bool, typer.Option("--quick", help="Tiny data and model: a smoke run.")] = False,
    threads: Annotated[int, typer.Option("--threads", min=1, help="torch threads.")] = 2,
    seed: Seed = 0,
) -> None:  # fmt: skip
    """The any-to-any digit-world model: reads and writes text, images, speech and video; judged on held-out data."""
    with reporting_errors():
        import torch

        from omni_media.errors import MediaError
        from omni_train.errors import TrainError
        from press_play.common import fail
        from press_play.omni_cmd import MARKER, OmniRecipe, quick_recipe, run_omni

        if out_dir.exists() and not (out_dir / MARKER).is_file():
            fail(f"{out_dir}: exists and is not an omni model folder (no {MARKER}); not overwriting it")
        if media is not None and not (media / "media-tokenizers.json").is_file():
            fail(f"{media}: not a `press-play media train` folder (no media-tokenizers.json)")
        budget = budget_hours * 3600
        recipe = quick_recipe(budget) if quick else OmniRecipe(budget_s=budget, seed=seed)
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        bar = Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn(),
                       TimeRemainingColumn(), console=err, transient=True)  # fmt: skip
        task = bar.add_task("training", total=1.0, visible=False)

        def step(e) -> None:
            if e.kind == "step":
                loss = e.data.get("loss", float("nan"))
                bar.update(task, completed=min(1.0, e.elapsed_s / e.budget_s), visible=True,
                           description=f"step {e.step} {e.data.get('task', '')} loss {loss:.3f}")  # fmt: skip

        def say(what: str) -> None:
            bar.console.print(escape(what))

        try:
            with bar:
                run = run_omni(recipe, out_dir, media, progress=say, on_step=step)
        except (MediaError, TrainError) as e:
            fail(str(e))
        finally:
            torch.set_num_threads(before)
        f = run.figures
        u, g = f["understanding"], f["generation"]
        out.print(f"wrote {escape(str(out_dir))} in {f['wall_s'] / 60:.1f} min "
                  f"({f['training']['steps']:,} steps, {f['training']['tokens']:,} tokens)", soft_wrap=True)  # fmt: skip
        out.print(f"image -> text {u['image_to_text']:.1%} · speech -> text {u['speech_to_text_words']:.1%} of words · "
                  f"video -> text {u['video_to_text']:.1%} (digit and direction)")  # fmt: skip
        rr = lambda k: f" ({g[k + '_reranked']:.1%} with the verifier)" if k + "_reranked" in g else ""  # noqa: E731
        out.print(f"text -> image {g['text_to_image']:.1%}{rr('text_to_image')} · text -> speech "
                  f"{g['text_to_speech']:.1%}{rr('text_to_speech')} · text -> video {g['text_to_video']:.1%} of frames")  # fmt: skip
