"""A build's report.json rendered for people: report.md, and dashboard.html (one static page, inline SVG
charts of tokens/s, memory against the budget and perplexity deltas; no script, no network)."""

from __future__ import annotations

from html import escape
from typing import Any

from omni_export.budget import mb
from omni_runtime.charts import bars, stacked


def _fmt_mb(n: float | None) -> str:
    return "—" if n is None else f"{n / 1e6:,.1f}"


def _result(check: dict[str, Any]) -> str:
    if not check.get("ran", True):
        return "structural only"
    return "passed" if check["passed"] else ("failed (allowed)" if check["allowed"] else "FAILED")


def _speed_rows(report: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(engine label, bench figures) for every benchmarked format and peer."""
    rows = [(f"{fmt} ({f['weights']})", f["bench"]) for fmt, f in report["formats"].items() if "bench" in f]
    rows += [(name, b) for name, b in report.get("peers", {}).items() if "decode_tok_s_short" in b]
    return rows


def render_markdown(report: dict[str, Any]) -> str:
    p, ref = report["profile"], report["reference"]
    status = "passed" if report["status"] == "passed" else "FAILED"
    lines = [f"# Build of {report['source']['model']} for {p['name']}: {status}", "",
             f"- Profile `{p['name']}` ({p['path']}): {p['description']}",
             f"- Source: `{report['source']['path']}` (sha256 {report['source']['sha256'][:16]}…)",
             f"- Budget {mb(report['budget_bytes'])}, context {p['context']:,} tokens, ONNX KV cache {p['kv']}, "
             f"speculative proposer {p['speculative']}",
             f"- Machine: {report['machine']['cpu']}, {report['machine']['threads']} threads; "
             f"Python {report['machine']['python']}; {report['created']}",
             f"- Reference: {ref['description']}: perplexity **{ref['perplexity']:.3f}** on the first "
             f"{ref['ppl_tokens']:,} tokens of {ref['text']} in {ref['ppl_context']}-token windows", "",
             "## Checks", "", "| check | result | figures |", "|---|---|---|"]  # fmt: skip
    for c in report["checks"]:
        lines.append(f"| {c['name']} | {_result(c)} | {c['detail']} |")
    lines += ["", "## Formats", "", "| format | runtime | weights | file MB | KV MB at context | runtime MB | total MB | "
              "perplexity | vs PyTorch |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for fmt, f in report["formats"].items():
        b, par = f["budget"], f["parity"]
        runtime = _fmt_mb(b["overhead_bytes"]) if b["overhead_measured"] else "not measured"
        ppl = f"{par['perplexity']:.3f}" if "perplexity" in par else "—"
        delta = f"{par['perplexity_delta']:+.2%}" if "perplexity_delta" in par else "—"
        lines.append(f"| {fmt} | {f['runtime']} | {f['weights']} | {_fmt_mb(f['file_bytes'])} | {_fmt_mb(b['kv_bytes'])} "
                     f"| {runtime} | {_fmt_mb(b['total_bytes'])} | {ppl} | {delta} |")  # fmt: skip
    speed = _speed_rows(report)
    if speed:
        first = speed[0][1]
        lines += ["", "## Speed on this machine", "",
                  f"By the protocol of `just bench --suite onnx`: fresh process per round, {first['rounds']} rounds, "
                  "medians; decode tok/s after a 16-token and a 512-token prompt, the 512-token prompt's prefill, "
                  "peak RSS of the process (runtime library included).", "",
                  "| engine | decode tok/s @short | decode tok/s @long | prefill tok/s | peak RSS MB | vs first |",
                  "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
        for name, bench in speed:
            ratio = bench["decode_tok_s_short"] / first["decode_tok_s_short"]
            lines.append(f"| {name} | {bench['decode_tok_s_short']:.1f} | {bench['decode_tok_s_long']:.1f} | "
                         f"{bench['prefill_tok_s']:.0f} | {bench['peak_rss_mb']:.0f} | {ratio:.2f}x |")  # fmt: skip
        for fmt, f in report["formats"].items():
            s = f.get("bench", {}).get("speculative")
            if s:
                same = "identical to" if s["tokens_identical"] else "not identical to"
                lines.append(f"\n{fmt}: {s['proposer']} speculation decodes at {s['decode_tok_s']:.1f} tok/s against "
                             f"{s['plain_decode_tok_s']:.1f} plain ({s['speedup']:.2f}x, {s['tokens_per_step']:.2f} "
                             f"tokens per verification step; greedy tokens {same} plain decoding) after the long prompt.")  # fmt: skip
    for name, peer in report.get("peers", {}).items():
        if "skipped" in peer:
            lines.append(f"\n{name}: not measured ({peer['skipped']}).")
    lines += ["", "## Stages", "", "| stage | status | seconds |", "|---|---|---:|"]
    for name, s in report["stages"].items():
        lines.append(f"| {name} | {s['status']} | {s.get('seconds', 0):.1f} |")
    lines += ["", "## Reproduce", ""]
    lines += [f"- {what}: `{cmd}`" for what, cmd in report["commands"].items()]
    return "\n".join(lines) + "\n"


def render_dashboard(report: dict[str, Any]) -> str:
    p, formats = report["profile"], report["formats"]
    speed = _speed_rows(report)
    speed_chart = bars([(f"{name} decode @short", b["decode_tok_s_short"], f"{b['decode_tok_s_short']:.1f} tok/s")
                        for name, b in speed] + [(f"{name} decode @long", b["decode_tok_s_long"],
                        f"{b['decode_tok_s_long']:.1f} tok/s") for name, b in speed]) if speed else ""  # fmt: skip
    prefill_chart = bars([(f"{name} prefill", b["prefill_tok_s"], f"{b['prefill_tok_s']:.0f} tok/s")
                          for name, b in speed]) if speed else ""  # fmt: skip
    memory = stacked([(f"{fmt} ({f['weights']})", {"weights": f["budget"]["weights_bytes"], "KV cache": f["budget"]["kv_bytes"],
                       "runtime": f["budget"]["overhead_bytes"]}) for fmt, f in formats.items()],
                     report["budget_bytes"], f"budget {mb(report['budget_bytes'])}")  # fmt: skip
    deltas = [(f"{fmt} ({f['weights']})", abs(f["parity"]["perplexity_delta"]) * 100, f"{f['parity']['perplexity_delta']:+.2%}")
              for fmt, f in formats.items() if "perplexity_delta" in f["parity"]]  # fmt: skip
    tolerance = p["validate"]["ppl_tolerance"] * 100
    delta_chart = (
        bars([*deltas, ("tolerance", tolerance, f"±{tolerance:.1f}%")], color="#5a9a5a") if deltas else ""
    )
    checks = "".join(
        f'<tr><td>{escape(c["name"])}</td><td class="{"ok" if c["passed"] else "bad"}">{_result(c)}</td>'
        f"<td>{escape(c['detail'])}</td></tr>"
        for c in report["checks"]
    )
    title = f"{report['source']['model']} for {p['name']}"
    none = "<p>No format ran on this host.</p>"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:960px;color:#222}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px;font-size:13px;text-align:left}}
h2{{margin-top:1.6em}}.dim{{color:#666;font-size:13px}}.ok{{color:#2a7a2a}}.bad{{color:#c03030;font-weight:bold}}</style>
</head><body>
<h1>{escape(title)}: {"passed" if report["status"] == "passed" else "FAILED"}</h1>
<p class="dim">{escape(report["created"])} · {escape(p["description"])} · budget {mb(report["budget_bytes"])} ·
context {p["context"]:,} tokens · {escape(report["machine"]["cpu"])}, {report["machine"]["threads"]} threads</p>
<h2>Checks</h2>
<table><tr><th>check</th><th>result</th><th>figures</th></tr>{checks}</table>
<h2 id="speed">Decode speed</h2>
<p class="dim">Tokens/s after a short and a long prompt, medians of fresh processes on this machine; a phone's differ.</p>
<div id="speed-chart">{speed_chart or none}</div>
<h2 id="prefill">Prefill speed</h2>
<div id="prefill-chart">{prefill_chart or none}</div>
<h2 id="memory">Memory against the budget</h2>
<p class="dim">Weights (the file), the KV cache at {p["context"]:,} tokens and the runtime memory measured on this host.</p>
<div id="memory-chart">{memory}</div>
<h2 id="perplexity">Perplexity against PyTorch float32</h2>
<p class="dim">|perplexity / reference − 1| on {report["reference"]["ppl_tokens"]:,} tokens of {escape(report["reference"]["text"])};
reference {report["reference"]["perplexity"]:.3f}.</p>
<div id="perplexity-chart">{delta_chart or "<p>No format was scored.</p>"}</div>
</body></html>
"""
