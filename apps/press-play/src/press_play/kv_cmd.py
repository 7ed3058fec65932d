"""`press-play kv ...`: the KV cache of a model. `plan`: what each cache kind costs against a budget."""

from __future__ import annotations

import re
from typing import Annotated

import typer
from rich.table import Table

from omni_model.errors import DataError
from omni_model.zoo import DEFAULT_MODEL
from press_play.common import out, reporting_errors
from press_play.generate_cmd import Model

kv_app = typer.Typer(help="Plan and inspect KV caches.", no_args_is_help=True, rich_markup_mode="rich")

KINDS = ("dense", "dense:dtype=float16", "int8", "kivi", "kivi:bits=8", "nf4", "sink", "window")
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_bytes(text: str, what: str = "--budget") -> int:
    """'2GB', '512MiB', '1e6': a byte count; a one-line error otherwise."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    unit = m.group(2).upper() if m else ""
    if not m or unit not in _UNITS:
        raise DataError(f"{what} {text!r}: not a size (examples: 2GB, 512MiB, 64MB)")
    n = int(float(m.group(1)) * _UNITS[unit])
    if n <= 0:
        raise DataError(f"{what} {text!r}: must be positive")
    return n


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

        n = parse_bytes(budget)
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


kv_app.command()(plan)
