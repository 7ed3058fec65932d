"""`press-play export`: a model to a folder that ONNX Runtime runs (omni_export), with a progress bar."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from omni_model.errors import DataError
from omni_model.zoo import DEFAULT_MODEL
from press_play.common import err, out, reporting_errors
from press_play.generate_cmd import Model


def export(
    out_dir: Annotated[
        Path, typer.Option("--out", "-o", help="The folder to write (replaced if it is an export).")
    ],
    model: Model = DEFAULT_MODEL,
    fmt: Annotated[
        str,
        typer.Option(
            "--format",
            help="onnx (ONNX Runtime), executorch (.pte for XNNPACK on Android/iOS CPUs), or omni (a press-play "
            "train omni folder: decoder, media encoders and decoders, one bundle for ONNX Runtime).",
        ),
    ] = "onnx",
    weights: Annotated[
        str | None,
        typer.Option(
            "--weights",
            help="onnx: float32, float16, int8 or int4; executorch: float32 or int4 (8-bit dynamic activations); "
            "omni: the decoder's, as onnx. [dim]Default: int4; omni float32.[/dim]",
        ),
    ] = None,
    block_size: Annotated[
        int, typer.Option("--block-size", help="Quantization block along K: 16..256.")
    ] = 32,
    symmetric: Annotated[
        bool,
        typer.Option("--symmetric/--asymmetric", help="Block zero points: implicit (symmetric) or stored."),
    ] = False,
    accuracy_level: Annotated[
        int,
        typer.Option("--accuracy-level", help="MatMulNBits compute: 1 float32, 4 int8 activations (faster)."),
    ] = 4,
    max_seq_len: Annotated[
        int | None,
        typer.Option(
            "--max-seq-len", min=2, help="Longest context the graph serves [onnx 4096, executorch 2048]."
        ),
    ] = None,
    kv: Annotated[
        str,
        typer.Option(
            "--kv", help="The KV cache the graph takes and returns: float32, or int8 (codes + scales)."
        ),
    ] = "float32",
    kv_calibration: Annotated[
        Path | None,
        typer.Option("--kv-calibration", help="With --kv int8: a sidecar from `press-play kv calibrate`."),
    ] = None,
) -> None:
    """Export a model to a folder an on-device runtime opens (graph or program, tokenizer, manifest with
    parity figures against PyTorch)."""
    with reporting_errors():
        if fmt not in ("onnx", "executorch", "omni"):
            raise DataError(f"--format {fmt}: not supported (supported: onnx, executorch, omni)")
        if fmt == "omni":
            export_omni_bundle(model, out_dir, weights or "float32", max_seq_len, kv, kv_calibration)
            return
        weights = weights or "int4"
        columns = (TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn())
        with Progress(*columns, console=err, transient=True, disable=not err.is_terminal) as bar:
            task = bar.add_task("export", total=5)

            def progress(what: str, done: int, total: int) -> None:
                bar.update(task, description=what, completed=done)

            if fmt == "executorch":
                from omni_export.executorch import ExecuTorchConfig, export_executorch

                if weights not in ("float32", "int4"):
                    raise DataError(f"--weights {weights}: the ExecuTorch export takes float32 or int4")
                n = max_seq_len or 2048
                et_config = ExecuTorchConfig(weights=weights, group_size=block_size, max_seq_len=n,  # type: ignore[arg-type]
                                             prefill_chunk=min(128, n))  # fmt: skip
                manifest = export_executorch(model, out_dir, et_config, progress)
            else:
                from omni_export.export import ExportConfig, export_onnx

                config = ExportConfig(weights=weights, block_size=block_size, symmetric=symmetric,  # type: ignore[arg-type]
                                      accuracy_level=accuracy_level, max_seq_len=max_seq_len or 4096, kv=kv,
                                      kv_calibration=None if kv_calibration is None else str(kv_calibration))  # fmt: skip
                manifest = export_onnx(model, out_dir, config, progress)
    p = manifest["parity"]
    out.print(f"wrote [bold]{escape(str(out_dir))}[/bold]: {manifest['file_bytes'] / 1e6:.1f} MB, {weights} weights",
              soft_wrap=True)  # fmt: skip
    err.print(
        f"[dim]parity against PyTorch: max |logits diff| {p['max_abs_logits_diff_prefill']:.2e} (prefill "
        f"{p['prompt_tokens']}), {p['max_abs_logits_diff_decode']:.2e} (decode); greedy tokens agreeing "
        f"{p['greedy_tokens_agreeing']}/{p['greedy_tokens_compared']}[/dim]",
        soft_wrap=True,
    )
    out.print(
        f'run it: [cyan]press-play generate --model {escape(str(out_dir))} "Hello"[/cyan]', soft_wrap=True
    )


def export_omni_bundle(model: str, out_dir: Path, weights: str, max_seq_len: int | None, kv: str,
                       kv_calibration: Path | None) -> None:  # fmt: skip
    """`--format omni`: omni_export.omni.export_omni, with its parity figures."""
    from omni_export.omni import export_omni

    if max_seq_len is not None or kv != "float32" or kv_calibration is not None:
        raise DataError("--format omni keeps the model's context and a float32 latent cache "
                        "(no --max-seq-len, --kv or --kv-calibration)")  # fmt: skip
    columns = (TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err, transient=True, disable=not err.is_terminal) as bar:
        task = bar.add_task("export", total=None)

        def progress(what: str, done: int, total: int) -> None:
            bar.update(task, description=what, completed=done, total=total)

        manifest = export_omni(model, out_dir, weights, progress)
    p = manifest["parity"]
    out.print(f"wrote [bold]{escape(str(out_dir))}[/bold]: {manifest['bytes'] / 1e6:.1f} MB, {weights} decoder, "
              f"{len(manifest['graphs'])} media graphs", soft_wrap=True)  # fmt: skip
    err.print(
        f"[dim]parity against PyTorch: decoder max |logits diff| {p['decoder']['max_abs_logits_diff_prefill']:.2e}, "
        f"with media {p['media_prefill']['max_abs_logits_diff']:.2e}; media graphs at most "
        f"{max(p['graphs'].values()):.2e}[/dim]",
        soft_wrap=True,
    )
    out.print(f'run it: [cyan]press-play generate --model {escape(str(out_dir))} --image digit.png '
              f'"what digit is this?"[/cyan]', soft_wrap=True)  # fmt: skip
