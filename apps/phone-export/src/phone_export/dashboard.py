"""dashboard.html for a bundle: one static page, inline SVG charts, no script and no network."""

from __future__ import annotations

from html import escape
from typing import Any

from omni_runtime.charts import bars, mb, stacked


def render(manifest: dict[str, Any]) -> str:
    models = manifest["models"]
    cfg = manifest["config"]
    sizes = bars([(m["path"], m["file_bytes"], mb(m["file_bytes"])) for m in models.values()])
    ran = {f: m for f, m in models.items() if m["verification"].get("ran")}
    speed = bars([(f"{m['path']} decode", m["verification"]["decode_tok_s"], f"{m['verification']['decode_tok_s']:.1f} tok/s")
                   for m in ran.values()] + [(f"{m['path']} prefill", m["verification"]["prefill_tok_s"],
                   f"{m['verification']['prefill_tok_s']:.1f} tok/s") for m in ran.values()])  # fmt: skip
    rows = []
    for m in models.values():
        v, b = m["verification"], m["budget"]
        parity = (f"perplexity {v['perplexity']:.3f} vs {v['reference_perplexity']:.3f} ({v['perplexity_delta']:+.2%})"
                  if "perplexity" in v else ("tokens identical" if v.get("tokens_identical")
                  else (f"tokens differ from {v.get('first_difference')}" if v.get("ran") else v.get("how", ""))))  # fmt: skip
        rows.append(f"<tr><td>{escape(m['path'])}</td><td>{escape(m['runtime'])}</td><td>{escape(m['weights'])}</td>"
                    f"<td>{mb(m['file_bytes'])}</td><td>{mb(b['total_bytes'])}</td><td>{'yes' if b['fits'] else 'no'}</td>"
                    f"<td>{escape(parity)}</td><td>{'passed' if v['passed'] else 'FAILED'}</td></tr>")  # fmt: skip
    title = f"{manifest['platform']} bundle of {manifest['source']}"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:900px;color:#222}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px;font-size:13px;text-align:left}}
h2{{margin-top:1.6em}}.dim{{color:#666;font-size:13px}}</style></head><body>
<h1>{escape(title)}</h1>
<p class="dim">{escape(manifest["created"])} · {cfg["n_layers"]} layers, dim {cfg["dim"]}, vocabulary {cfg["vocab_size"]:,} ·
context {manifest["context"]:,} tokens · budget {mb(manifest["budget_bytes"])} · reference: {escape(manifest["reference"])}</p>
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


def _budget_chart(models: dict[str, Any], budget: int) -> str:
    """Weights, KV cache and runtime stacked per file against the budget line."""
    rows = [(m["path"], {"weights": m["budget"]["weights_bytes"], "kv": m["budget"]["kv_bytes"],
                         "runtime": m["budget"]["overhead_bytes"]}) for m in models.values()]  # fmt: skip
    return stacked(rows, budget, f"budget {mb(budget)}")
