"""`press-play build` (and a bare `press-play`): the single-button build, with a live display per stage
and a summary table; `--json` prints the report instead, `--dry-run` the plan."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from omni_export.budget import mb
from omni_model.zoo import DEFAULT_MODEL
from press_play.build_profile import DEFAULT_PROFILE, available_profiles
from press_play.build_store import Event
from press_play.common import err, out, reporting_errors, settings

STATE_WORDS = {"cached": "[cyan]cached[/cyan]", "done": "[green]built[/green]", "failed": "[red]failed[/red]"}


class _Display:
    """One line per stage: a spinner and bar while it runs, then built/cached with its time."""

    def __init__(self, enabled: bool) -> None:
        self.enabled, self.live = enabled, err.is_terminal
        self.bar = Progress(SpinnerColumn(finished_text="•"), TextColumn("{task.fields[stage]:<16}"),
                            TextColumn("{task.description}"), BarColumn(bar_width=24), TimeElapsedColumn(),
                            console=err, disable=not (enabled and self.live))  # fmt: skip
        self.tasks: dict[str, Any] = {}

    def __enter__(self) -> _Display:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.__exit__(*exc)

    def __call__(self, e: Event) -> None:
        if not self.enabled:
            return
        if e.stage not in self.tasks:
            self.tasks[e.stage] = self.bar.add_task("", total=None, stage=e.stage)
        task = self.tasks[e.stage]
        if e.state == "progress":
            self.bar.update(task, description=escape(e.detail), completed=e.done, total=e.total or None)
        elif e.state in STATE_WORDS:
            took = f"built in {e.seconds:.1f}s" if e.state == "cached" else f"{e.seconds:.1f}s"
            words = f"{STATE_WORDS[e.state]} ({took})"
            self.bar.update(task, description=words, completed=1, total=1)
            self.bar.stop_task(task)
            if not self.live:  # a log or CI: one plain line per finished stage
                err.print(f"{e.stage:<16} {words}", soft_wrap=True)


def build(
    model: Annotated[
        str, typer.Argument(help="Zoo name, Hugging Face folder or .gguf file.", show_default=True)
    ] = DEFAULT_MODEL,
    profile: Annotated[
        str,
        typer.Option(
            "--profile",
            "-p",
            help=f"A profile from profiles/ ({', '.join(available_profiles())}) or a .toml file.",
        ),
    ] = DEFAULT_PROFILE,
    out_dir: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="The build folder. [dim]Default: build/MODEL/PROFILE[/dim]"),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Redo every stage, cached or not.")] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the plan (stages, formats, expected sizes) and exit.")
    ] = False,
    allow_fail: Annotated[
        list[str] | None,
        typer.Option(
            "--allow-fail",
            help="Build even if this check fails: onnx.parity, coreml.budget, parity, budget (repeatable).",
        ),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the report (or plan) as JSON on stdout, no live display.")
    ] = False,
    peer_python: Annotated[
        str | None,
        typer.Option(
            "--peer-python",
            help="Python of the benchmark-only peer environment (llama.cpp); '' for none. "
            "[dim]Default: .venv-peers/bin/python if present[/dim]",
        ),
    ] = None,
) -> None:
    """Build a model for a phone: import, compress, export to the profile's formats, validate against
    PyTorch and the memory budget, benchmark, and write report.md, report.json and dashboard.html."""
    with reporting_errors():
        run_build(model, profile, out_dir, force=force, dry_run=dry_run, allow_fail=tuple(allow_fail or ()),
                  as_json=as_json, peer_python=peer_python)  # fmt: skip


def run_build(model: str = DEFAULT_MODEL, profile: str = DEFAULT_PROFILE, out_dir: Path | None = None, *,
              force: bool = False, dry_run: bool = False, allow_fail: tuple[str, ...] = (), as_json: bool = False,
              peer_python: str | None = None) -> None:  # fmt: skip
    from press_play.build import BuildConfig, output_dir
    from press_play.build import build as run
    from press_play.build_profile import load_profile

    prof = load_profile(profile)
    folder = out_dir or output_dir(model, prof.name)
    config = BuildConfig(prof, folder, model, force=force, dry_run=dry_run, allow_fail=allow_fail,
                         threads=settings.threads, peer_python=peer_python)  # fmt: skip
    with _Display(enabled=not as_json and not dry_run) as display:

        def on_event(e: Event) -> None:
            if e.stage == "resolve" and e.state == "done" and display.enabled:  # the model is known to exist
                err.print(f"[bold]press-play build[/bold] {escape(model)} · profile [bold]{escape(prof.name)}[/bold] "
                          f"({escape(prof.description)}) → {escape(str(folder))}", soft_wrap=True)  # fmt: skip
            display(e)

        report = run(config, on_event)
    if as_json:
        typer.echo(json.dumps(report, default=str))
    elif dry_run:
        _print_plan(report)
    else:
        _print_summary(report)


def _print_plan(plan: dict[str, Any]) -> None:
    p = plan["profile"]
    out.print(f"[bold]plan[/bold]: {escape(plan['model'])} ({escape(plan['source']['path'])}) for profile "
              f"[bold]{escape(p['name'])}[/bold] → {escape(plan['out'])}", soft_wrap=True)  # fmt: skip
    out.print(f"budget {mb(plan['budget_bytes'])}, context {p['context']:,} tokens, ONNX KV cache {p['kv']}, "
              f"speculative proposer {p['speculative']}", soft_wrap=True)  # fmt: skip
    t = Table(box=None, padding=(0, 2), title="formats", title_justify="left")
    for col in ("format", "runtime", "weights", "expected size", "KV cache at context"):
        t.add_column(col)
    for fmt, f in plan["formats"].items():
        t.add_row(fmt, f["runtime"], f["weights"], f"~{mb(f['expected_bytes'])}", mb(f["kv_bytes"]))
    out.print(t)
    s = Table(box=None, padding=(0, 2), title="stages", title_justify="left")
    s.add_column("stage")
    s.add_column("status")
    for name, status in plan["stages"].items():
        s.add_row(name, status)
    out.print(s)


def _print_summary(report: dict[str, Any]) -> None:
    t = Table(title="build", title_justify="left", box=None, padding=(0, 1))
    for col in ("format", "weights", "size", "memory", "budget", "ppl vs PyTorch", "decode tok/s"):
        t.add_column(col)
    for fmt, f in report["formats"].items():
        b, par = f["budget"], f["parity"]
        delta = (
            f"{par['perplexity_delta']:+.2%}"
            if "perplexity_delta" in par
            else ("structural" if not par.get("ran", True) else "—")
        )
        speed = f"{f['bench']['decode_tok_s_short']:.1f}" if "bench" in f else "—"
        t.add_row(
            fmt, f["weights"], mb(f["file_bytes"]), mb(b["total_bytes"]), mb(b["budget_bytes"]), delta, speed
        )
    for name, peer in report.get("peers", {}).items():
        if "decode_tok_s_short" in peer:
            t.add_row(name, "(peer)", mb(peer["file_bytes"]), "", "", "", f"{peer['decode_tok_s_short']:.1f}")
    out.print(t)
    cached = sum(s["status"] == "cached" for s in report["stages"].values())
    out.print(f"{len(report['checks'])} checks: {sum(c['passed'] for c in report['checks'])} passed; "
              f"{cached} of {len(report['stages'])} stages reused; {report['seconds']:.1f}s", soft_wrap=True)  # fmt: skip
    folder = Path(report["out"])
    for name in ("report.md", "report.json", "dashboard.html"):
        out.print(f"  [cyan]{escape(str(folder / name))}[/cyan]", soft_wrap=True)
    out.print(f"run it: [cyan]{escape(report['commands']['generate'])}[/cyan]", soft_wrap=True)
