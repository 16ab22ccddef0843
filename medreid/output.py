"""Rows out as a table, CSV or JSON (the formats of every listing command)."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from collections.abc import Sequence
from typing import Any

FORMATS = ("table", "csv", "json")


def _plain(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.UTC)
        return value.isoformat()
    return value


def _cell(value: Any, width: int) -> str:
    if value is None:
        text = ""
    elif isinstance(value, dict | list):
        text = json.dumps(value, separators=(",", ":"), default=str)
    else:
        text = str(_plain(value))
    return text if len(text) <= width else text[: width - 1] + "…"


def render(
    rows: Sequence[dict[str, Any]], fmt: str, columns: Sequence[str], max_width: int = 40
) -> str:
    if fmt == "json":
        return json.dumps(
            [{k: _plain(v) for k, v in row.items()} for row in rows], indent=2, default=str
        )
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(columns)
        for row in rows:
            writer.writerow(
                [
                    json.dumps(row.get(c), default=str)
                    if isinstance(row.get(c), dict | list)
                    else ("" if row.get(c) is None else _plain(row.get(c)))
                    for c in columns
                ]
            )
        return buffer.getvalue().rstrip("\n")
    cells = [[_cell(row.get(c), max_width) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.append(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")
    return "\n".join(lines)


def parse_when(text: str, now: dt.datetime) -> dt.datetime:
    """ISO 8601 ('2026-11-26', '2026-11-26T08:00') or relative ('30m', '12h', '7d') before
    ``now``, in UTC."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    stripped = text.strip()
    if stripped and stripped[-1] in units and stripped[:-1].isdigit():
        return now - dt.timedelta(seconds=int(stripped[:-1]) * units[stripped[-1]])
    try:
        value = dt.datetime.fromisoformat(stripped)
    except ValueError:
        raise ValueError(
            f"{text!r} is neither an ISO date/time nor a relative time like 30m, 12h, 7d"
        ) from None
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return value.astimezone(dt.UTC)
