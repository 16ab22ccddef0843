"""Small inline SVG charts, drawn on the server: no script, nothing fetched by the browser.

Every label is escaped; the functions return markup ready to place in a page."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

from markupsafe import Markup, escape

BAR = "#2f6f9f"
ALERT = "#b8322a"
MUTED = "#6b7280"


def _svg(width: int, height: int, body: list[str], title: str) -> Markup:
    return Markup(
        f'<svg xmlns="http://www.w3.org/2000/svg" role="img" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" class="chart"><title>{escape(title)}</title>'
        + "".join(body)
        + "</svg>"
    )


def arrivals_chart(
    buckets: Sequence[tuple[dt.datetime, int]], *, title: str = "Instances received per hour"
) -> Markup:
    """Columns per hour, the hour labelled every six; the tallest column's count on the axis."""
    width, height, left, bottom, top, right = 720, 180, 40, 24, 10, 30
    plot_w, plot_h = width - left - right, height - bottom - top
    peak = max((n for _, n in buckets), default=0)
    step = plot_w / max(len(buckets), 1)
    body = [
        f'<line x1="{left}" y1="{top + plot_h}" x2="{width - right}" y2="{top + plot_h}" '
        f'stroke="{MUTED}"/>',
        f'<text x="{left - 4}" y="{top + 8}" text-anchor="end" font-size="10" '
        f'fill="{MUTED}">{peak}</text>',
        f'<text x="{left - 4}" y="{top + plot_h}" text-anchor="end" font-size="10" '
        f'fill="{MUTED}">0</text>',
    ]
    for index, (hour, count) in enumerate(buckets):
        x = left + index * step
        bar_h = plot_h * count / peak if peak else 0
        body.append(
            f'<rect x="{x + 1:.1f}" y="{top + plot_h - bar_h:.1f}" width="{max(step - 2, 1):.1f}" '
            f'height="{bar_h:.1f}" fill="{BAR}"><title>{escape(hour.strftime("%Y-%m-%d %H:00"))}'
            f" UTC: {count}</title></rect>"
        )
        if hour.hour % 6 == 0:
            label = hour.strftime("%d %H:00") if hour.hour == 0 else hour.strftime("%H:00")
            body.append(
                f'<text x="{x:.1f}" y="{height - 8}" font-size="10" fill="{MUTED}">'
                f"{escape(label)}</text>"
            )
    return _svg(width, height, body, title)


def rate_bars(
    rows: Sequence[tuple[str, int, int]], *, title: str, empty: str = "no results yet"
) -> Markup:
    """Horizontal bars of part/whole per label: (label, whole, part), e.g. mismatches of results
    per sender. The bar is the rate; the text says the counts too."""
    row_h, label_w, bar_w, width = 22, 150, 380, 680
    height = max(len(rows), 1) * row_h + 8
    body: list[str] = []
    if not rows:
        body.append(f'<text x="4" y="16" font-size="12" fill="{MUTED}">{escape(empty)}</text>')
    for index, (label, whole, part) in enumerate(rows):
        y = 4 + index * row_h
        rate = part / whole if whole else 0.0
        colour = ALERT if part else BAR
        body.append(
            f'<text x="{label_w - 6}" y="{y + 14}" text-anchor="end" font-size="12">'
            f"{escape(label)}</text>"
            f'<rect x="{label_w}" y="{y + 3}" width="{bar_w}" height="14" fill="#eef2f6"/>'
            f'<rect x="{label_w}" y="{y + 3}" width="{bar_w * rate:.1f}" height="14" '
            f'fill="{colour}"/>'
            f'<text x="{label_w + bar_w + 8}" y="{y + 14}" font-size="12">'
            f"{part}/{whole} ({rate:.1%})</text>"
        )
    return _svg(width, height, body, title)


def score_bars(
    scores: Sequence[tuple[str, float]], *, title: str, marker: float | None = None
) -> Markup:
    """Horizontal bars of scores in [0, 1] (COMPA's probabilities, match similarities), with an
    optional vertical marker (the identity threshold)."""
    row_h, label_w, bar_w = 22, 150, 380
    width, height = label_w + bar_w + 70, max(len(scores), 1) * row_h + 8
    body: list[str] = []
    for index, (label, score) in enumerate(scores):
        y = 4 + index * row_h
        clipped = min(max(score, 0.0), 1.0)
        body.append(
            f'<text x="{label_w - 6}" y="{y + 14}" text-anchor="end" font-size="12">'
            f"{escape(label)}</text>"
            f'<rect x="{label_w}" y="{y + 3}" width="{bar_w}" height="14" fill="#eef2f6"/>'
            f'<rect x="{label_w}" y="{y + 3}" width="{bar_w * clipped:.1f}" height="14" '
            f'fill="{BAR}"/>'
            f'<text x="{label_w + bar_w + 8}" y="{y + 14}" font-size="12">{score:.3f}</text>'
        )
    if marker is not None:
        x = label_w + bar_w * min(max(marker, 0.0), 1.0)
        body.append(
            f'<line x1="{x:.1f}" y1="0" x2="{x:.1f}" y2="{height}" stroke="{ALERT}" '
            f'stroke-dasharray="4 3"><title>threshold {marker:.3f}</title></line>'
        )
    return _svg(width, height, body, title)
