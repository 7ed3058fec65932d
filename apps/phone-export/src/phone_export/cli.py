"""`phone-export`: a built model (a `press-play export` folder) as a bundle for an Android or iOS app.

phone-export android BUILD_DIR --out DIR [--formats ort,pte] [--budget 2GB] [--context N]
phone-export ios BUILD_DIR --out DIR [--formats mlpackage,pte] [--budget 4GB]
phone-export push BUNDLE --adb [--device SERIAL] [--dest /data/local/tmp/omnicoder]
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from omni_model.errors import OmniError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n")[0])
out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


def fail(message: str) -> NoReturn:
    err.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)
    raise typer.Exit(1)


@contextmanager
def reporting_errors() -> Iterator[None]:
    from omni_kv import KVCacheError

    try:
        yield
    except (OmniError, KVCacheError) as e:
        fail(str(e))
    except KeyboardInterrupt:
        err.print("\n[yellow]interrupted[/yellow]")
        raise typer.Exit(130) from None


Out = Annotated[
    Path, typer.Option("--out", "-o", help="The bundle folder to write (replaced if it is a bundle).")
]
Formats = Annotated[
    str | None,
    typer.Option("--formats", help="Comma-separated formats [android: ort,pte; ios: mlpackage,pte]."),
]
Budget = Annotated[
    str, typer.Option("--budget", help="The device's memory budget for the model: 2GB, 4GB, ...")
]
Context = Annotated[
    int | None,
    typer.Option("--context", min=2, help="KV cache length the app uses [the build's max_seq_len]."),
]
Threads = Annotated[int, typer.Option("--threads", min=1, help="CPU threads for the host verification.")]


def _bundle(platform: str, build_dir: Path, out_dir: Path, formats: str | None, budget: str, context: int | None,
            threads: int) -> None:  # fmt: skip
    with reporting_errors():
        from omni_kv.spec import parse_size
        from phone_export.bundle import BundleConfig, build_bundle

        chosen = tuple(f.strip() for f in formats.split(",") if f.strip()) if formats else ()
        config = BundleConfig(platform, chosen, parse_size(budget, "--budget"), context, threads=threads)
        columns = (TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn())
        with Progress(*columns, console=err, transient=True, disable=not err.is_terminal) as bar:
            task = bar.add_task("bundle", total=1)
            manifest = build_bundle(build_dir, out_dir, config,
                                    lambda what, done, total: bar.update(task, description=what, completed=done, total=total))  # fmt: skip
    table = Table(title=f"{platform} bundle: {out_dir}", title_justify="left")
    for col in ("file", "runtime", "size", "memory at context", "fits", "host check"):
        table.add_column(col)
    for m in manifest["models"].values():
        v, b = m["verification"], m["budget"]
        check = v.get("reason") or v.get("how", "")
        table.add_row(m["path"], m["runtime"], f"{m['file_bytes'] / 1e6:.1f} MB", f"{b['total_bytes'] / 1e6:.1f} MB",
                      "yes" if b["fits"] else "no", check)  # fmt: skip
    out.print(table)
    out.print(f"dashboard: [cyan]{escape(str(out_dir / 'dashboard.html'))}[/cyan]", soft_wrap=True)


@app.command()
def android(
    build_dir: Annotated[Path, typer.Argument(help="A press-play export folder.")], out_dir: Out,
    formats: Formats = None, budget: Budget = "2GB", context: Context = None, threads: Threads = 2,
) -> None:  # fmt: skip
    """A bundle for Android: ONNX Runtime Mobile (.ort) and ExecuTorch (.pte), verified on this host."""
    _bundle("android", build_dir, out_dir, formats, budget, context, threads)


@app.command()
def ios(
    build_dir: Annotated[Path, typer.Argument(help="A press-play export folder.")], out_dir: Out,
    formats: Formats = None, budget: Budget = "2GB", context: Context = None, threads: Threads = 2,
) -> None:  # fmt: skip
    """A bundle for iOS: Core ML (.mlpackage) and ExecuTorch (.pte); Core ML is validated structurally off macOS."""
    _bundle("ios", build_dir, out_dir, formats, budget, context, threads)


@app.command()
def push(
    bundle: Annotated[Path, typer.Argument(help="A bundle folder from phone-export android.")],
    adb: Annotated[bool, typer.Option("--adb", help="Copy with adb to a connected Android device.")] = False,
    device: Annotated[str | None, typer.Option("--device", "-s", help="adb serial, when several are attached.")] = None,
    dest: Annotated[str, typer.Option("--dest", help="Folder on the device.")] = "/data/local/tmp/omnicoder",
) -> None:  # fmt: skip
    """Copy a bundle to a connected Android device (adb must be on the PATH and a device attached)."""
    with reporting_errors():
        from phone_export.bundle import read_bundle

        manifest = read_bundle(bundle)
    if not adb:
        fail("push needs a transport: --adb (the only one there is)")
    if manifest["platform"] != "android":
        fail(f"{bundle}: an {manifest['platform']} bundle; adb pushes Android bundles")
    exe = shutil.which("adb")
    if exe is None:
        fail("adb is not on the PATH (install Android's platform-tools)")
    listed = subprocess.run([exe, "devices"], capture_output=True, text=True, timeout=60)
    attached = [line.split()[0] for line in listed.stdout.splitlines()[1:] if line.strip().endswith("device")]
    if device is not None and device not in attached:
        fail(f"device {device} is not attached (adb devices lists: {', '.join(attached) or 'none'})")
    if not attached:
        fail("no Android device is attached (adb devices lists none)")
    if device is None and len(attached) > 1:
        fail(f"{len(attached)} devices are attached; pick one with --device ({', '.join(attached)})")
    serial = device or attached[0]
    target = f"{dest.rstrip('/')}/{bundle.name}"
    pushed = subprocess.run([exe, "-s", serial, "push", str(bundle), target], capture_output=True, text=True)
    if pushed.returncode != 0:
        fail(f"adb push to {serial} failed: {' '.join(pushed.stderr.split())[:200]}")
    out.print(f"pushed {escape(str(bundle))} to {escape(serial)}:{escape(target)}")


def main() -> None:
    app()
