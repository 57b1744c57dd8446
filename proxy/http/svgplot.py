"""Tiny inline SVG plots (scatter, line, bars), so the dashboard ships its charts with no library.

No JavaScript chart library is shipped: PyPI and npm give none that installs offline as package
data here, and a few dozen points need no more than `<circle>`s and a `<polyline>`. Every
point is a `<circle class="point">` and every bar a `<rect class="bar">` carrying its values,
which the browser tests count.
"""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

W, H, PAD = 420, 220, 36


def _scale(values: Sequence[float], low: float, high: float) -> list[float]:
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    return [low + (v - lo) / span * (high - low) for v in values]


def plot(xs: Sequence[float | str], ys: Sequence[float], *, title: str, x_label: str, y_label: str,
         line: bool = False, css_class: str = "plot") -> str:
    """An `<svg>` of the points (x, y); text x values are placed in order of first appearance."""
    if not ys:
        return f'<p class="empty">{escape(title)}: no points yet</p>'
    labels: list[str] = []
    if all(isinstance(x, int | float) and not isinstance(x, bool) for x in xs):
        numeric = [float(x) for x in xs]  # type: ignore[arg-type]
    else:
        labels = list(dict.fromkeys(str(x) for x in xs))
        numeric = [float(labels.index(str(x))) for x in xs]
    x_range = "" if labels else f" ({min(numeric):.4g} to {max(numeric):.4g})"
    px = _scale(numeric, PAD, W - PAD / 2)
    py = _scale([float(y) for y in ys], H - PAD, PAD / 2)
    parts = [f'<svg class="{escape(css_class)}" data-title="{escape(title)}" width="{W}" height="{H}" '
             f'viewBox="0 0 {W} {H}" role="img"><title>{escape(title)}</title>',
             f'<line x1="{PAD}" y1="{H - PAD}" x2="{W - PAD / 2}" y2="{H - PAD}" class="axis"/>',
             f'<line x1="{PAD}" y1="{PAD / 2}" x2="{PAD}" y2="{H - PAD}" class="axis"/>',
             f'<text x="{W / 2}" y="{H - 6}" class="label">{escape(x_label)}{x_range}</text>',
             f'<text x="4" y="12" class="label">{escape(y_label)} ({min(ys):.4g} to {max(ys):.4g})</text>']
    if line and len(px) > 1:
        points = " ".join(f"{x:.1f},{y:.1f}" for x, y in zip(px, py, strict=True))
        parts.append(f'<polyline points="{points}" class="line"/>')
    for x, y, vx, vy in zip(px, py, xs, ys, strict=True):
        parts.append(f'<circle class="point" cx="{x:.1f}" cy="{y:.1f}" r="4" data-x="{escape(str(vx))}" '
                     f'data-y="{vy!r}"><title>{escape(str(vx))}: {vy:.6g}</title></circle>')
    if labels:
        for i, label in enumerate(labels):
            x = _scale([float(v) for v in range(len(labels))] or [0.0], PAD, W - PAD / 2)[i]
            parts.append(f'<text x="{x:.1f}" y="{H - PAD + 14}" class="tick">{escape(label)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def bars(labels: Sequence[str], values: Sequence[float], *, title: str, y_label: str,
         css_class: str = "bars") -> str:
    """An `<svg>` bar chart, one `<rect class="bar">` per label (histograms, importances)."""
    if not values:
        return f'<p class="empty">{escape(title)}: nothing to plot</p>'
    top = max(max(values), 0.0) or 1.0
    step = (W - PAD * 1.5) / len(values)
    parts = [f'<svg class="{escape(css_class)}" data-title="{escape(title)}" width="{W}" height="{H}" '
             f'viewBox="0 0 {W} {H}" role="img"><title>{escape(title)}</title>',
             f'<line x1="{PAD}" y1="{H - PAD}" x2="{W - PAD / 2}" y2="{H - PAD}" class="axis"/>',
             f'<text x="4" y="12" class="label">{escape(title)} · {escape(y_label)} (max {top:.4g})</text>']
    for i, (label, value) in enumerate(zip(labels, values, strict=True)):
        height = max(value, 0.0) / top * (H - PAD * 1.5)
        x = PAD + i * step
        parts.append(f'<rect class="bar" x="{x + step * 0.1:.1f}" y="{H - PAD - height:.1f}" '
                     f'width="{step * 0.8:.1f}" height="{height:.1f}" data-label="{escape(label)}" '
                     f'data-value="{value!r}"><title>{escape(label)}: {value:.6g}</title></rect>')
        if len(values) <= 12:
            parts.append(f'<text x="{x + step * 0.1:.1f}" y="{H - PAD + 14}" class="tick">'
                         f'{escape(label[:14])}</text>')
    parts.append("</svg>")
    return "".join(parts)
