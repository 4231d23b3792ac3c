"""The table on the terminal and the JSON file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.paths import PATHS, PathName
from bench.results import Figure, Value

HEADERS = ("figure", "unit", *[str(p) for p in PATHS], "mw/direct", "mw/emailproxy", "goal")


def _number(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _cell(value: Value | None) -> str:
    if value is None:
        return "-"
    if value.status != "ok" or value.value is None:
        return value.status
    return _number(value.value) + ("*" if value.note else "")


def _ratio(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}"


def _goal(figure: Figure) -> str:
    if figure.goal is None:
        return ""
    held = figure.goal_held()
    verdict = "n/a" if held is None else "HELD" if held else "MISSED"
    return f"{verdict}: {figure.goal.text}"


def rows(figures: list[Figure]) -> list[tuple[str, ...]]:
    return [
        (
            figure.title,
            figure.unit,
            *[_cell(figure.values.get(path)) for path in PATHS],
            _ratio(figure.ratio(PathName.MAILWARDEN, PathName.DIRECT)),
            _ratio(figure.ratio(PathName.MAILWARDEN, PathName.EMAILPROXY)),
            _goal(figure),
        )
        for figure in figures
    ]


def table(figures: list[Figure], markdown: bool = False) -> str:
    body = rows(figures)
    if markdown:
        lines = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        return "\n".join(lines)
    widths = [max(len(row[i]) for row in [HEADERS, *body]) for i in range(len(HEADERS))]
    out = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [HEADERS, *body]
    ]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def notes(figures: list[Figure]) -> list[str]:
    """Why values are marked (*) or missing, one line each."""
    found = []
    for figure in figures:
        for path, value in figure.values.items():
            if value.note and value.status != "n/a":
                found.append(f"{figure.key} / {path} ({value.status}): {value.note}")
    return found


def write_json(path: Path, meta: dict[str, Any], figures: list[Figure]) -> None:
    document = {"meta": meta, "figures": {figure.key: figure.to_json() for figure in figures}}
    path.write_text(json.dumps(document, indent=2, default=str) + "\n")
