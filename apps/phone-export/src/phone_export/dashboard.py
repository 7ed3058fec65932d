"""dashboard.html for a bundle: one static page, inline SVG charts, no script and no network."""

from __future__ import annotations

from html import escape
from typing import Any

COLORS = {"weights": "#3b6ea5", "kv": "#e0a030", "runtime": "#9a9a9a"}


def _mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


def _bars(rows: list[tuple[str, float, str]], unit: str, width: int = 560) -> str:
    """Horizontal bars: (label, value, text shown at the bar's end)."""
    top = max((v for _, v, _ in rows), default=0) or 1
    h, label_w = 26, 190
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{h * len(rows) + 8}" role="img">'
    ]
    for i, (label, value, text) in enumerate(rows):
        y = 4 + i * h
        w = (width - label_w - 120) * value / top
        parts.append(f'<text x="0" y="{y + 16}" font-size="13">{escape(label)}</text>'
                     f'<rect x="{label_w}" y="{y + 3}" width="{w:.1f}" height="16" fill="#3b6ea5"/>'
                     f'<text x="{label_w + w + 6:.1f}" y="{y + 16}" font-size="12">{escape(text)}</text>')  # fmt: skip
    parts.append("</svg>")
    return "".join(parts)


def _budget_chart(models: dict[str, Any], budget: int, width: int = 560) -> str:
    """Stacked bars of weights, KV cache and runtime against the budget line."""
    h, label_w = 30, 190
    totals = [m["budget"]["total_bytes"] for m in models.values()]
    top = max([budget, *totals]) * 1.05
    scale = (width - label_w - 20) / top
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{h * len(models) + 44}" role="img">'
    ]
    for i, m in enumerate(models.values()):
        b, y, x = m["budget"], 4 + i * h, float(label_w)
        parts.append(f'<text x="0" y="{y + 17}" font-size="13">{escape(m["path"])}</text>')
        for part, value in (
            ("weights", b["weights_bytes"]),
            ("kv", b["kv_bytes"]),
            ("runtime", b["overhead_bytes"]),
        ):
            w = value * scale
            parts.append(f'<rect x="{x:.1f}" y="{y + 4}" width="{w:.1f}" height="18" fill="{COLORS[part]}">'
                         f"<title>{part}: {_mb(value)}</title></rect>")  # fmt: skip
            x += w
    bx = label_w + budget * scale
    n = len(models)
    parts.append(f'<line x1="{bx:.1f}" y1="0" x2="{bx:.1f}" y2="{h * n + 4}" stroke="#c03030" stroke-width="2"/>'
                 f'<text x="{min(bx, width - 110):.1f}" y="{h * n + 20}" font-size="12" fill="#c03030">budget {_mb(budget)}</text>')  # fmt: skip
    legend = " ".join(f'<tspan fill="{c}">■</tspan> {k}' for k, c in COLORS.items())
    parts.append(f'<text x="0" y="{h * n + 38}" font-size="12">{legend}</text></svg>')
    return "".join(parts)


def render(manifest: dict[str, Any]) -> str:
    models = manifest["models"]
    cfg = manifest["config"]
    sizes = _bars([(m["path"], m["file_bytes"], _mb(m["file_bytes"])) for m in models.values()], "MB")
    ran = {f: m for f, m in models.items() if m["verification"].get("ran")}
    speed = _bars([(f"{m['path']} decode", m["verification"]["decode_tok_s"], f"{m['verification']['decode_tok_s']:.1f} tok/s")
                   for m in ran.values()] + [(f"{m['path']} prefill", m["verification"]["prefill_tok_s"],
                   f"{m['verification']['prefill_tok_s']:.1f} tok/s") for m in ran.values()], "tok/s")  # fmt: skip
    rows = []
    for m in models.values():
        v, b = m["verification"], m["budget"]
        parity = (f"perplexity {v['perplexity']:.3f} vs {v['reference_perplexity']:.3f} ({v['perplexity_delta']:+.2%})"
                  if "perplexity" in v else ("tokens identical" if v.get("tokens_identical")
                  else (f"tokens differ from {v.get('first_difference')}" if v.get("ran") else v.get("how", ""))))  # fmt: skip
        rows.append(f"<tr><td>{escape(m['path'])}</td><td>{escape(m['runtime'])}</td><td>{escape(m['weights'])}</td>"
                    f"<td>{_mb(m['file_bytes'])}</td><td>{_mb(b['total_bytes'])}</td><td>{'yes' if b['fits'] else 'no'}</td>"
                    f"<td>{escape(parity)}</td><td>{'passed' if v['passed'] else 'FAILED'}</td></tr>")  # fmt: skip
    title = f"{manifest['platform']} bundle of {manifest['source']}"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:900px;color:#222}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px;font-size:13px;text-align:left}}
h2{{margin-top:1.6em}}.dim{{color:#666;font-size:13px}}</style></head><body>
<h1>{escape(title)}</h1>
<p class="dim">{escape(manifest["created"])} · {cfg["n_layers"]} layers, dim {cfg["dim"]}, vocabulary {cfg["vocab_size"]:,} ·
context {manifest["context"]:,} tokens · budget {_mb(manifest["budget_bytes"])} · reference: {escape(manifest["reference"])}</p>
<h2>Files</h2>
<table><tr><th>file</th><th>runtime</th><th>weights</th><th>size</th><th>memory</th><th>fits</th><th>parity</th><th>host check</th></tr>
{"".join(rows)}</table>
<h2>Size</h2>{sizes}
<h2>Memory against the budget</h2>
<p class="dim">Weights (the file), the KV cache at {manifest["context"]:,} tokens, and the runtime's own memory measured on this host.</p>
{_budget_chart(models, manifest["budget_bytes"])}
<h2>Speed on this host</h2>
<p class="dim">Greedy decoding of {max((m["verification"].get("generated", 0) for m in models.values()), default=0)} tokens in each runtime; a phone's figures differ.</p>
{speed or "<p>No runtime ran on this host.</p>"}
</body></html>
"""
