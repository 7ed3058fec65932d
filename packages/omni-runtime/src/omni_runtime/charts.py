"""Inline SVG charts for static reports (dashboards of builds and bundles): no script, no network.

`bars` draws one horizontal bar per row; `stacked` draws rows of stacked segments against a limit line
(memory against a budget). Both return an `<svg>` element as a string, every label escaped.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from html import escape

BLUE = "#3b6ea5"
SEGMENT_COLORS = ("#3b6ea5", "#e0a030", "#9a9a9a", "#5a9a5a", "#a05a9a")


def mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


def bars(
    rows: Sequence[tuple[str, float, str]], width: int = 640, label_w: int = 230, color: str = BLUE
) -> str:
    """Horizontal bars, one per (label, value, text shown at the bar's end); scaled to the largest value."""
    top = max((v for _, v, _ in rows), default=0) or 1
    h = 26
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{width}" '
             f'height="{h * len(rows) + 8}" role="img">']  # fmt: skip
    for i, (label, value, text) in enumerate(rows):
        y = 4 + i * h
        w = max(0.0, (width - label_w - 120) * value / top)
        parts.append(f'<text x="0" y="{y + 16}" font-size="13">{escape(label)}</text>'
                     f'<rect x="{label_w}" y="{y + 3}" width="{w:.1f}" height="16" fill="{color}"/>'
                     f'<text x="{label_w + w + 6:.1f}" y="{y + 16}" font-size="12">{escape(text)}</text>')  # fmt: skip
    parts.append("</svg>")
    return "".join(parts)


def stacked(rows: Sequence[tuple[str, Mapping[str, float]]], limit: float, limit_text: str, width: int = 640,
            label_w: int = 230, value_text=mb) -> str:  # fmt: skip
    """Rows of stacked segments (label, {segment: value}) and a red line at `limit`, with a legend of the
    segments in order of first appearance. Each segment carries a tooltip with its value."""
    names = list(dict.fromkeys(k for _, segs in rows for k in segs))
    colors = {k: SEGMENT_COLORS[i % len(SEGMENT_COLORS)] for i, k in enumerate(names)}
    h, n = 30, len(rows)
    top = max([limit, *(sum(segs.values()) for _, segs in rows)]) * 1.05 or 1
    scale = (width - label_w - 20) / top
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{width}" height="{h * n + 44}" role="img">'
    ]
    for i, (label, segs) in enumerate(rows):
        y, x = 4 + i * h, float(label_w)
        parts.append(f'<text x="0" y="{y + 17}" font-size="13">{escape(label)}</text>')
        for name, value in segs.items():
            w = max(0.0, value * scale)
            parts.append(f'<rect x="{x:.1f}" y="{y + 4}" width="{w:.1f}" height="18" fill="{colors[name]}">'
                         f"<title>{escape(name)}: {escape(value_text(value))}</title></rect>")  # fmt: skip
            x += w
    bx = label_w + limit * scale
    parts.append(f'<line x1="{bx:.1f}" y1="0" x2="{bx:.1f}" y2="{h * n + 4}" stroke="#c03030" stroke-width="2"/>'
                 f'<text x="{min(bx, width - 130):.1f}" y="{h * n + 20}" font-size="12" fill="#c03030">'
                 f"{escape(limit_text)}</text>")  # fmt: skip
    legend = " ".join(f'<tspan fill="{colors[k]}">■</tspan> {escape(k)}' for k in names)
    parts.append(f'<text x="0" y="{h * n + 38}" font-size="12">{legend}</text></svg>')
    return "".join(parts)
