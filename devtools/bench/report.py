"""Summary statistics and Markdown tables for `python -m devtools.bench`."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

FIT_HEADERS = (
    "input (4 × 2048×2048)",
    "upload limit",
    "`fit_for_upload` wall time, median (max)",
    "output total",
    "output images",
    "longest event-loop stall during `prepare_for_upload`, median (max)",
)
SHUTDOWN_HEADERS = ("state at SIGTERM", "runs", "SIGTERM → exit, median", "max", "exit status")


@dataclass
class Table:
    title: str
    headers: Sequence[str]
    rows: list[Sequence[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        lines = [f"### {self.title}", "", header_line(self.headers), "|" + "---|" * len(self.headers)]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        if self.notes:
            lines.append("")
            lines += self.notes
        return "\n".join(lines)


def header_line(headers: Sequence[str]) -> str:
    """The header row exactly as printed, so a test can look for it."""
    return "| " + " | ".join(headers) + " |"


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile: always one of the observed values, which suits small samples."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def seconds(value: float, digits: int = 2) -> str:
    return "–" if math.isnan(value) else f"{value:.{digits}f} s"


def millis(value: float) -> str:
    if math.isnan(value):
        return "–"
    return f"{value * 1000:.1f} ms" if value < 0.1 else f"{value * 1000:.0f} ms"


def mebibytes(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


def median_and_max(values: Sequence[float], unit: str = "s") -> str:
    if not values:
        return "–"
    if unit == "ms":
        return f"{millis(median(values))} ({millis(max(values))})"
    if unit == "count":
        middle = median(values)
        shown = f"{middle:.0f}" if float(middle).is_integer() else f"{middle:.1f}"
        return f"{shown} ({max(values):.0f})"
    return f"{seconds(median(values))} ({seconds(max(values))})"
