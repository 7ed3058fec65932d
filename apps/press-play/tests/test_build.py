"""press-play build on a tiny random model: the pipeline, its cache, interruption, bad input, the dashboard."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from press_play import cli
from press_play.build import BuildConfig, build
from press_play.build_profile import ProfileError, available_profiles, load_profile

runner = CliRunner()

# The tiny model serves 256 tokens; Hamlet through its 300-token BPE is long enough for every figure.
TINY_PROFILE = """
description = "tiny test build"
budget = "512MB"
context = 128
speculative = "lookup"

[onnx]
weights = "{weights}"

[coreml]
weights = "float32"

[validate]
greedy_tokens = 8
ppl_tokens = 256
ppl_context = 64
ppl_tolerance = {tolerance}

[bench]
rounds = 1
short_tokens = 8
prompt_tokens = 32
decode_tokens = 16
"""


def write_profile(folder: Path, name: str = "tiny", weights: str = "float32", tolerance: float = 0.01,
                  coreml: bool = True) -> Path:  # fmt: skip
    text = TINY_PROFILE.format(weights=weights, tolerance=tolerance)
    if not coreml:
        text = text.replace('[coreml]\nweights = "float32"\n', "")
    path = folder / f"{name}.toml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def built(tiny_model_dir, tmp_path_factory):
    """One finished build of the tiny model (ONNX float32 and Core ML float32)."""
    root = tmp_path_factory.mktemp("build")
    profile = load_profile(str(write_profile(root)))
    out = root / "out"
    events = []
    report = build(BuildConfig(profile, out, str(tiny_model_dir), peer_python=""), events.append)
    return out, profile, report, events


def test_shipped_profiles_follow_the_schema():
    assert {"mobile-2gb", "mobile-4gb", "desktop"} <= set(available_profiles())
    for name in available_profiles():
        p = load_profile(name)
        assert "onnx" in p.formats and p.budget_bytes > 0
    assert load_profile("mobile-2gb").budget_bytes == 2 * 10**9


@pytest.mark.parametrize(("body", "message"), [
    ('description = "x"\nbudget = "2GB"\ncontext = 64\nwhat = 1\n[onnx]\nweights = "int4"', "unknown key what"),
    ('description = "x"\nbudget = "2GB"\ncontext = "long"\n[onnx]\nweights = "int4"', "context must be an integer"),
    ('description = "x"\nbudget = "2GB"\ncontext = 64\n[onnx]\nweights = "int3"', "onnx.weights must be one of"),
    ('description = "x"\nbudget = "2GB"\ncontext = 64\n[onnx]\nweights = "int4"\n[bench]\nrounds = true', "bench.rounds must be an integer"),
    ('description = "x"\nbudget = "lots"\ncontext = 64\n[onnx]\nweights = "int4"', "budget"),
    ('description = "x"\nbudget = "2GB"\ncontext = 64', "missing key onnx"),
    ('description = "x"\nbudget = "2GB"\ncontext = 64\n[executorch]\nweights = "int8"\n[onnx]\nweights = "int4"', "executorch.weights"),
    ("description = ", "not valid TOML"),
])  # fmt: skip
def test_a_bad_profile_is_one_line_naming_the_file_and_key(tmp_path, body, message):
    path = tmp_path / "bad.toml"
    path.write_text(body)
    with pytest.raises(ProfileError) as e:
        load_profile(str(path))
    assert message in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value)


def test_build_validates_benchmarks_and_reports(built):
    out, _profile, report, events = built
    assert report["status"] == "passed"
    assert {s["status"] for s in report["stages"].values()} == {"built"}
    onnx = report["formats"]["onnx"]
    # float32: the same greedy tokens as PyTorch, logits within tolerance, perplexity the same.
    assert onnx["parity"]["passed"] and onnx["parity"]["tokens_identical"]
    assert onnx["parity"]["max_abs_logits_diff"] < 1e-3
    assert abs(onnx["parity"]["perplexity_delta"]) < 1e-4
    assert onnx["budget"]["fits"] and onnx["budget"]["overhead_measured"]
    assert onnx["budget"]["total_bytes"] == (onnx["budget"]["weights_bytes"] + onnx["budget"]["kv_bytes"]
                                             + onnx["budget"]["overhead_bytes"])  # fmt: skip
    bench = onnx["bench"]
    assert bench["decode_tok_s_short"] > 0 and bench["prefill_tok_s"] > 0 and bench["peak_rss_mb"] > 0
    assert bench["speculative"]["proposer"] == "lookup" and bench["speculative"]["tokens_identical"]
    coreml = report["formats"]["coreml"]
    assert coreml["file_bytes"] > 0 and coreml["parity"]["ran"] is (sys.platform == "darwin")
    assert {c["name"] for c in report["checks"]} == {
        "onnx.parity",
        "onnx.budget",
        "coreml.parity",
        "coreml.budget",
    }
    # the files: report.json equals what build returned; report.md and the dashboard carry its figures
    assert (
        json.loads((out / "report.json").read_text())["formats"]["onnx"]["file_bytes"] == onnx["file_bytes"]
    )
    md = (out / "report.md").read_text()
    assert f"{onnx['parity']['perplexity']:.3f}" in md and "## Speed on this machine" in md
    html = (out / "dashboard.html").read_text()
    assert html.count("<svg") == 4 and "http" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "<script" not in html
    # events: every stage started and finished, with progress from inside the export
    assert any(e.stage == "export-onnx" and e.state == "progress" for e in events)
    assert [e.stage for e in events if e.state == "done"][-1] == "report"


def test_figures_match_a_separate_eval_perplexity(built):
    out, profile, report, _ = built
    v = profile.validate
    result = runner.invoke(cli.app, ["eval", "perplexity", "--model", str(out / "onnx"), "--context",
                                     str(v.ppl_context), "--max-tokens", str(v.ppl_tokens), "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    separate = json.loads(result.stdout)["ppl"]
    assert separate == pytest.approx(report["formats"]["onnx"]["parity"]["perplexity"], rel=1e-5)


def test_a_second_build_reuses_every_stage(built, tiny_model_dir):
    out, profile, first, _ = built
    again = build(BuildConfig(profile, out, str(tiny_model_dir), peer_python=""))
    assert {name: s["status"] for name, s in again["stages"].items()} == dict.fromkeys(
        first["stages"], "cached"
    )
    assert again["formats"]["onnx"]["bench"] == first["formats"]["onnx"]["bench"]
    assert again["seconds"] < first["seconds"] / 3


def test_a_changed_or_damaged_output_is_rebuilt(built, tiny_model_dir, tmp_path):
    out0, profile, _, _ = built
    out = tmp_path / "out"
    shutil.copytree(out0, out)
    with (out / "onnx" / "model.onnx.data").open("r+b") as f:  # one flipped byte in the weights
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    (out / "coreml" / "manifest.json").write_text("{}")  # and an edited Core ML manifest
    report = build(BuildConfig(profile, out, str(tiny_model_dir), peer_python=""))
    status = {name: s["status"] for name, s in report["stages"].items()}
    assert status["export-onnx"] == "built" and status["export-coreml"] == "built"
    assert json.loads((out / "coreml" / "manifest.json").read_text())["format"] == "omnicoder-coreml"
    # the export is deterministic: the rebuilt weights are the original bytes, so what depends on them stays
    for name in ("model.onnx.data", "manifest.json"):  # the manifest carries no clock time
        assert (out / "onnx" / name).read_bytes() == (out0 / "onnx" / name).read_bytes()
    assert status["reference"] == "cached" and status["validate-onnx"] == "cached"


INTERRUPT = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from press_play.build import BuildConfig, build
    from press_play.build_profile import load_profile

    # A process started in the background by a non-interactive shell inherits SIGINT ignored, and
    # Python then keeps it ignored: restore the KeyboardInterrupt a terminal's Ctrl-C would raise.
    signal.signal(signal.SIGINT, signal.default_int_handler)

    def on_event(e):
        # mid-export: the graph is written under its temporary name, parity is being measured
        if e.stage == "export-onnx" and e.state == "progress" and "parity" in e.detail:
            os.kill(os.getpid(), signal.{sig})

    build(BuildConfig(load_profile(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], force=True, peer_python=""), on_event)
""")


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGINT"])
def test_an_interrupted_export_is_rebuilt_not_trusted(built, tiny_model_dir, tmp_path, sig):
    out0, profile, _, _ = built
    out = tmp_path / "out"
    shutil.copytree(out0, out)  # a finished build, then a forced rebuild killed mid-export
    proc = subprocess.run([sys.executable, "-c", INTERRUPT.format(sig=sig), profile.path, str(out),
                           str(tiny_model_dir)], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode != 0
    assert not (out / "stages" / "export-onnx.json").exists()  # the record went first
    if sig == "SIGKILL":  # nothing cleaned up: the temporary folder is still there
        assert [p for p in out.iterdir() if p.name.startswith(".onnx.") and p.name.endswith(".tmp")]
    report = build(BuildConfig(profile, out, str(tiny_model_dir), peer_python=""))
    assert report["stages"]["export-onnx"]["status"] == "built"
    assert report["stages"]["export-coreml"]["status"] == "cached"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # leftovers removed
    assert report["formats"]["onnx"]["parity"]["passed"]


def test_a_failed_check_fails_the_build_with_figure_and_threshold(tiny_model_dir, tmp_path):
    path = write_profile(tmp_path, "strict", weights="int4", tolerance=1e-9, coreml=False)
    out = tmp_path / "out"
    result = runner.invoke(cli.app, ["build", str(tiny_model_dir), "--profile", str(path), "--out", str(out),
                                     "--peer-python", ""])  # fmt: skip
    assert result.exit_code == 1
    line = result.stderr.strip().splitlines()[-1]
    assert [line] == [e for e in result.stderr.splitlines() if e.startswith("error:")]
    assert line.startswith("error: check onnx.parity failed: perplexity") and "tolerance 0%" in line
    assert "Traceback" not in result.output
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "failed" and "bench-onnx" not in report["stages"]
    assert "FAILED" in (out / "report.md").read_text()
    allowed = runner.invoke(cli.app, ["build", str(tiny_model_dir), "--profile", str(path), "--out", str(out),
                                      "--peer-python", "", "--allow-fail", "onnx.parity", "--json"])  # fmt: skip
    assert allowed.exit_code == 0, allowed.output
    report = json.loads(allowed.stdout)
    assert report["status"] == "passed" and report["stages"]["export-onnx"]["status"] == "cached"
    check = next(c for c in report["checks"] if c["name"] == "onnx.parity")
    assert not check["passed"] and check["allowed"]


def test_dry_run_prints_the_plan_and_writes_nothing(built, tiny_model_dir, tmp_path):
    out0, profile, _, _ = built
    fresh = tmp_path / "fresh"
    result = runner.invoke(
        cli.app, ["build", str(tiny_model_dir), "-p", profile.path, "-o", str(fresh), "--dry-run"]
    )
    assert result.exit_code == 0, result.output
    assert "export-onnx" in result.stdout and "to run" in result.stdout and "expected size" in result.stdout
    assert not fresh.exists()
    plan = runner.invoke(
        cli.app, ["build", str(tiny_model_dir), "-p", profile.path, "-o", str(out0), "--dry-run", "--json"]
    )
    assert plan.exit_code == 0, plan.output
    plan = json.loads(plan.stdout)
    assert set(plan["stages"].values()) == {"cached", "written"}
    assert plan["formats"]["onnx"]["expected_bytes"] == pytest.approx(
        json.loads((out0 / "report.json").read_text())["formats"]["onnx"]["file_bytes"], rel=0.5
    )


@pytest.mark.parametrize(("args", "message"), [
    (["build", "no-such-model"], "zoo: smollm2-135m-instruct"),
    (["build", "--profile", "no-such-profile"], "unknown profile 'no-such-profile' (profiles: desktop"),
    (["build", "--allow-fail", "speed"], "--allow-fail speed: no such check"),
])  # fmt: skip
def test_bad_input_is_one_line(args, message, tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(cli.app, [*args, "--out", str(out)])
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and message in result.stderr and "Traceback" not in result.output
    assert not out.exists()


def test_an_output_folder_that_is_a_file_is_refused(tiny_model_dir, tmp_path):
    target = tmp_path / "file"
    target.write_text("mine")
    result = runner.invoke(cli.app, ["build", str(tiny_model_dir), "--out", str(target)])
    assert result.exit_code == 1 and "is a file, not a folder" in result.stderr
    assert target.read_text() == "mine"


def test_no_space_left_is_one_line_and_leaves_nothing_half_written(tiny_model_dir, tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:  # fmt: skip
        pytest.skip("needs root to mount a small tmpfs")
    try:
        path = write_profile(tmp_path, coreml=False)
        result = runner.invoke(cli.app, ["build", str(tiny_model_dir), "-p", str(path), "-o", str(mount / "out"),
                                         "--peer-python", ""])  # fmt: skip
        assert result.exit_code == 1, result.output
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "no space left on the device" in errors[0], result.stderr
        leftovers = [p for p in (mount / "out").rglob("*") if p.name.startswith(".") or p.suffix == ".tmp"]
        assert not leftovers and not (mount / "out" / "onnx").exists()
    finally:
        subprocess.run(["umount", str(mount)], check=False)


# ---------------------------------------------------------------------------------- headless Chromium


def _png_pixels(data: bytes) -> tuple[int, int, list[bytes]]:
    """Width, height and the raw RGB(A) rows of a non-interlaced 8-bit PNG (what Chromium writes)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width = 8, b"", 0
    while pos < len(data):
        (n,), kind = struct.unpack(">I", data[pos : pos + 4]), data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + n]
        if kind == b"IHDR":
            width, height, depth, color = struct.unpack(">IIBB", body[:10])
            assert depth == 8 and color in (2, 6)
            bpp = 3 if color == 2 else 4
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    raw, stride, rows, prev = zlib.decompress(idat), width * bpp, [], bytearray(width * bpp)
    for y in range(height):
        f, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], prev[i - bpp] if i >= bpp else 0
            if f == 1:
                line[i] = (line[i] + a) & 255
            elif f == 2:
                line[i] = (line[i] + b) & 255
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(line))
        prev = line
    return width, bpp, rows


def test_the_dashboard_renders_in_headless_chromium(built, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if chromium is None:
        pytest.skip("no Chromium on this machine (.ci/run installs Debian's chromium)")
    out, _, _report, _ = built
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1000,1400"]  # fmt: skip
    url = (out / "dashboard.html").resolve().as_uri()
    dom = subprocess.run([chromium, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-500:]
    for chart in ("speed-chart", "prefill-chart", "memory-chart", "perplexity-chart"):
        assert f'id="{chart}"><svg' in dom.stdout
    shot = tmp_path / "dashboard.png"
    proc = subprocess.run([chromium, *flags, f"--screenshot={shot}", url], capture_output=True, timeout=120)
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-500:]
    width, bpp, rows = _png_pixels(shot.read_bytes())
    assert width == 1000 and len(rows) == 1400

    def count(rgb: tuple[int, int, int]) -> int:
        return sum(1 for row in rows for i in range(0, len(row), bpp) if tuple(row[i : i + 3]) == rgb)

    assert count((0x3B, 0x6E, 0xA5)) > 2000  # the bars: speed, prefill, weights
    assert count((0xE0, 0xA0, 0x30)) > 20  # the KV cache segments of the memory chart and its legend
    assert count((0xC0, 0x30, 0x30)) > 20  # the budget line
    assert count((0x5A, 0x9A, 0x5A)) > 500  # the perplexity chart's tolerance bar


def test_bench_suite_times_the_build_and_measures_its_figures_again(tiny_model_dir, tmp_path):
    from press_play.bench_build import BuildBenchConfig, render_build_section, run_build_bench

    path = write_profile(tmp_path, coreml=False)
    config = BuildBenchConfig.quick_config(
        model=str(tiny_model_dir), profile=str(path), work_dir=str(tmp_path / "w")
    )
    rep = run_build_bench(config)
    assert set(rep.cached_stages.values()) == {"cached"} and rep.cached_s < rep.first_s
    assert rep.eval_ppl == pytest.approx(rep.report["formats"]["onnx"]["parity"]["perplexity"], rel=1e-5)
    assert len(rep.separate["omnicoder-onnx"]) == 1
    section = render_build_section(rep)
    assert section.startswith("<!-- bench:build:start -->") and section.rstrip().endswith(
        "<!-- bench:build:end -->"
    )
    assert "| `press-play build` again |" in section and "omnicoder-onnx decode tok/s @short" in section
