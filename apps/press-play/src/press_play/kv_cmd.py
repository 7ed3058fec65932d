"""`press-play kv ...`: the KV cache of a model. `plan`: what each cache kind costs against a budget."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from omni_model.zoo import DEFAULT_MODEL
from press_play.common import err, out, read_text, reporting_errors
from press_play.generate_cmd import Model

kv_app = typer.Typer(help="Plan and inspect KV caches.", no_args_is_help=True, rich_markup_mode="rich")

KINDS = ("dense", "dense:dtype=float16", "int8", "kivi", "kivi:bits=8", "nf4", "sink", "window", "paged")


def plan(
    model: Model = DEFAULT_MODEL,
    budget: Annotated[
        str, typer.Option("--budget", "-b", help="Bytes for the KV cache: 2GB, 512MiB, ...")
    ] = "2GB",
    kind: Annotated[
        list[str] | None,
        typer.Option(
            "--kv", help="Cache kinds to plan (repeatable; e.g. int8, kivi:bits=4,group=32). Default: all."
        ),
    ] = None,
    context: Annotated[
        int | None,
        typer.Option("--context", min=1, help="Also give the bytes each kind takes at this context."),
    ] = None,
) -> None:
    """The longest context each cache kind fits in a byte budget (and the bytes at --context)."""
    with reporting_errors():
        import omni_model
        from omni_kv import CacheSpec
        from omni_kv.spec import parse_size

        n = parse_size(budget, "--budget")
        specs = [(k, CacheSpec.parse(k)) for k in (kind or KINDS)]
        cfg = omni_model.load(model).config
        if cfg.mla is not None:
            dims = (cfg.n_layers, 1, cfg.mla.kv_lora_rank, cfg.mla.qk_rope_head_dim)
        else:
            dims = (cfg.n_layers, cfg.n_kv_heads, cfg.head_size, None)
        table = Table(
            title=f"KV cache of {model} within {n / 1e9:.3g} GB (trained context {cfg.max_seq_len})"
        )
        table.add_column("kind")
        table.add_column("bytes / token", justify="right")
        table.add_column("longest context", justify="right")
        if context:
            table.add_column(f"MB at {context}", justify="right")
        for name, spec in specs:
            per = spec.bytes_per_token(*dims)
            longest = spec.max_context(n, *dims)
            row = [name, f"{per:,.0f}", "unbounded" if spec.bounded else f"{longest:,}"]
            if context:
                row.append(f"{spec.kv_bytes(context, *dims) / 1e6:,.1f}")
            table.add_row(*row)
    out.print(table)


def calibrate(
    model: Model = DEFAULT_MODEL,
    text: Annotated[
        str, typer.Option("--text", "-t", help="A text file, or a Shakespeare play by name.")
    ] = "hamlet",
    out_path: Annotated[Path, typer.Option("--out", "-o", help="The JSON sidecar to write.")] = Path(
        "kv-calibration.json"
    ),
    max_tokens: Annotated[int, typer.Option("--max-tokens", min=2, help="Tokens of the text to run.")] = 8192,
    context: Annotated[int, typer.Option("--context", min=2, help="Window the text runs in.")] = 2048,
) -> None:
    """Measure per-channel key/value magnitudes on a text; int8 and nf4 caches read the sidecar
    (--kv int8:calibration=FILE)."""
    with reporting_errors():
        import omni_model
        from omni_kv.calibration import calibrate as run_calibration

        lm = omni_model.load(model)
        ids = lm.tokenizer.encode(read_text(text))[:max_tokens]
        with err.status(f"calibrating on {len(ids):,} tokens"):
            cal = run_calibration(lm.model, ids, str(model), context=min(context, lm.config.max_seq_len))
        cal.save(out_path)
    k = cal.key_absmax
    ratio = float((k.amax(dim=-1) / k.mean(dim=-1)).median())
    out.print(f"wrote {escape(str(out_path))}: {cal.n_layers} layers x {cal.n_kv_heads} kv heads x {cal.head_dim} "
              f"channels from {cal.tokens:,} tokens; largest key channel / mean channel (median over heads): "
              f"{ratio:.1f}x", soft_wrap=True)  # fmt: skip


kv_app.command()(plan)
kv_app.command()(calibrate)
