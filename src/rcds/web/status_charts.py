"""Small charts as inline SVG, drawn on the server: the status page needs no JavaScript and no CDN.

Each chart scales to its container (``viewBox`` plus ``width: 100%`` in the style sheet). Every bar and
point carries a ``<title>``, which browsers show on hover, so exact values are there without a script.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from html import escape

WIDTH, HEIGHT = 480, 150
LEFT, RIGHT, TOP, BOTTOM = 60, 10, 10, 24  # room for the axis labels
PALETTE = ("#2a6fdb", "#d9822b", "#2e9e5b", "#9b59b6", "#c0392b")


def nice_max(value: float) -> float:
    """The axis top: 1, 2 or 5 times a power of ten, at or above ``value``."""
    if value <= 0:
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 5, 10):
        if value <= step * power:
            return float(step * power)
    return float(10 * power)


def _frame(
    top: float, fmt: Callable[[float], str], labels: Sequence[tuple[float, str]], title: str
) -> list[str]:
    plot_h = HEIGHT - TOP - BOTTOM
    out = [
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{escape(title)}" '
        'xmlns="http://www.w3.org/2000/svg">',
        f"<title>{escape(title)}</title>",
    ]
    for frac in (0.0, 0.5, 1.0):
        y = TOP + plot_h * (1 - frac)
        out.append(f'<line class="grid" x1="{LEFT}" y1="{y:.1f}" x2="{WIDTH - RIGHT}" y2="{y:.1f}"/>')
        out.append(
            f'<text class="axis" x="{LEFT - 4}" y="{y + 4:.1f}" text-anchor="end">{escape(fmt(top * frac))}</text>'
        )
    for i, (x, text) in enumerate(labels):
        # The outer labels of a time axis sit at the very edges: anchored inwards so that none is cut off.
        anchor = "middle"
        if x <= LEFT + 1:
            anchor = "start"
        elif x >= WIDTH - RIGHT - 1 and i == len(labels) - 1:
            anchor = "end"
        out.append(
            f'<text class="axis" x="{x:.1f}" y="{HEIGHT - 6}" text-anchor="{anchor}">{escape(text)}</text>'
        )
    return out


def bar_chart(
    values: Sequence[float | None],
    labels: Sequence[str],
    title: str,
    fmt: Callable[[float], str] = lambda v: f"{v:g}",
    tips: Sequence[str] | None = None,
    color: str = PALETTE[0],
    every: int = 6,
    stacked: Sequence[float] | None = None,
    stacked_color: str = "#c0392b",
) -> str:
    """Bars for ``values`` (None: no bar), with every ``every``-th label under the axis; ``stacked``: a
    second series drawn on top of the first (failures on publishes), so an hour with only failures shows."""
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    n = max(1, len(values))
    extra = list(stacked) if stacked is not None else [0.0] * len(values)
    totals = [(v or 0.0) + e for v, e in zip(values, extra, strict=True)]
    top = nice_max(max(totals) if totals else 0.0)
    slot = plot_w / n
    gap = min(2.0, slot * 0.2)
    marks = [(LEFT + slot * (i + 0.5), labels[i]) for i in range(0, len(labels), max(1, every))]
    out = _frame(top, fmt, marks, title)
    width = max(0.5, slot - gap)
    for i, v in enumerate(values):
        if not totals[i]:
            continue
        x = LEFT + slot * i + gap / 2
        tip = escape(tips[i] if tips else f"{labels[i]}: {fmt(v or 0.0)}")
        base = float(TOP + plot_h)
        for part, fill in ((v or 0.0, color), (extra[i], stacked_color)):
            if not part:
                continue
            h = plot_h * min(1.0, part / top)
            base -= h
            out.append(
                f'<rect x="{x:.1f}" y="{base:.1f}" width="{width:.1f}" height="{h:.1f}" fill="{fill}">'
                f"<title>{tip}</title></rect>"
            )
    out.append("</svg>")
    return "".join(out)


def line_chart(
    series: Sequence[tuple[str, Sequence[tuple[float, float]]]],
    start: float,
    end: float,
    title: str,
    fmt: Callable[[float], str] = lambda v: f"{v:g}",
    time_label: Callable[[float], str] = lambda t: "",
    ticks: int = 4,
) -> str:
    """One line per ``(name, [(t, value), ...])`` over the time range ``start``..``end``."""
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    span = max(1e-9, end - start)
    peak = max((v for _, pts in series for _, v in pts), default=0.0)
    top = nice_max(peak)
    marks = [(LEFT + plot_w * i / ticks, time_label(start + span * i / ticks)) for i in range(ticks + 1)]
    out = _frame(top, fmt, marks, title)

    def xy(t: float, v: float) -> tuple[float, float]:
        return LEFT + plot_w * (t - start) / span, TOP + plot_h * (1 - min(1.0, v / top))

    for k, (name, pts) in enumerate(series):
        color = PALETTE[k % len(PALETTE)]
        if not pts:
            continue
        coords = " ".join(f"{x:.1f},{y:.1f}" for x, y in (xy(t, v) for t, v in pts))
        out.append(
            f'<polyline points="{coords}" fill="none" stroke="{color}" stroke-width="1.8">'
            f"<title>{escape(name)}</title></polyline>"
        )
        t, v = pts[-1]
        x, y = xy(t, v)
        out.append(
            f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{color}">'
            f"<title>{escape(name)}: {escape(fmt(v))} at {escape(time_label(t))}</title></circle>"
        )
    if not any(pts for _, pts in series):
        out.append(
            f'<text class="empty" x="{LEFT + plot_w / 2:.1f}" y="{TOP + plot_h / 2:.1f}" '
            'text-anchor="middle">no samples yet</text>'
        )
    out.append("</svg>")
    return "".join(out)


__all__ = ["bar_chart", "line_chart", "nice_max"]
