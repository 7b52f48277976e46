"""`--plot FILE`: latency and throughput vs batch size, one line per runtime/precision (and sequence length).

A .png is drawn with matplotlib (Agg, no display needed); an .html page is self-contained: its charts are inline
SVG and its data sits in the page as JSON (no CDN, no script to fetch), so it opens offline and can be archived.
"""

from __future__ import annotations

import html
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from mlops_cli.core.errors import UsageError
from mlops_cli.core.io import atomic_file, write_bytes
from mlops_cli.services.bench.sweep import TIMED, BenchRow

PLOT_SUFFIXES = (".png", ".html")
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")


@dataclass(frozen=True)
class Series:
    """One line of a chart: a runtime/precision at one sequence length, by batch size."""

    name: str
    batches: tuple[int, ...]
    latency_ms: tuple[float, ...]
    throughput: tuple[float, ...]
    unit: str


def check_plot_path(path: Path) -> None:
    if path.suffix.lower() not in PLOT_SUFFIXES:
        raise UsageError(f"--plot {path}: the file must end in .png or .html",
                         hint="Use --plot bench.png (matplotlib) or --plot bench.html (self-contained).")


def series_of(rows: Sequence[BenchRow]) -> list[Series]:
    """The timed rows grouped into lines, in the order the runtimes were benched."""
    groups: dict[str, list[BenchRow]] = {}
    for row in rows:
        if row.status == TIMED and row.latency is not None and row.batch is not None:
            name = row.label if row.seq_len is None else f"{row.label} seq {row.seq_len}"
            groups.setdefault(name, []).append(row)
    result = []
    for name, members in groups.items():
        members.sort(key=lambda r: r.batch or 0)
        result.append(Series(name, tuple(r.batch or 0 for r in members),
                             tuple(r.latency.median_ms for r in members if r.latency is not None),
                             tuple(r.throughput or 0.0 for r in members), members[0].throughput_unit))
    return result


def write_plot(path: Path, rows: Sequence[BenchRow], title: str, force: bool) -> Path:
    """Write the charts to `path` (.png or .html)."""
    check_plot_path(path)
    series = series_of(rows)
    if path.suffix.lower() == ".png":
        return _write_png(path, series, title, force)
    return write_bytes(path, html_page(series, title).encode("utf-8"), force=force)


def _write_png(path: Path, series: list[Series], title: str, force: bool) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (latency, throughput) = plt.subplots(1, 2, figsize=(12, 4.5))
    for index, line in enumerate(series):
        colour = COLOURS[index % len(COLOURS)]
        latency.plot(line.batches, line.latency_ms, marker="o", color=colour, label=line.name)
        throughput.plot(line.batches, line.throughput, marker="o", color=colour, label=line.name)
    unit = series[0].unit if series else "items/s"
    for axes, label in ((latency, "latency p50 (ms)"), (throughput, f"throughput ({unit})")):
        axes.set_xlabel("batch size")
        axes.set_ylabel(label)
        axes.grid(True, alpha=0.3)
    latency.legend(fontsize="small")
    figure.suptitle(title)
    figure.tight_layout()
    with atomic_file(path, force) as temp:
        figure.savefig(temp, format="png", dpi=100)
    plt.close(figure)
    return path


def html_page(series: list[Series], title: str) -> str:
    """A page with two inline-SVG charts and the data they show as JSON (id `bench-data`)."""
    data = json.dumps([{"name": s.name, "batch": s.batches, "latency_ms": s.latency_ms, "throughput": s.throughput,
                        "unit": s.unit} for s in series], indent=1).replace("</", "<\\/")
    unit = series[0].unit if series else "items/s"
    charts = (svg_chart(series, "latency p50 (ms)", lambda s: s.latency_ms)
              + svg_chart(series, f"throughput ({unit})", lambda s: s.throughput))
    legend = "".join(f'<li><span style="color:{COLOURS[i % len(COLOURS)]}">&#9632;</span> {html.escape(s.name)}</li>'
                     for i, s in enumerate(series))
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            "<style>body{font-family:sans-serif;margin:2em} svg{margin-right:2em} ul{list-style:none}</style>"
            f"</head><body><h1>{html.escape(title)}</h1>{charts}<ul>{legend}</ul>"
            f'<script type="application/json" id="bench-data">{data}</script></body></html>\n')


def svg_chart(series: list[Series], label: str, values_of: Callable[[Series], Sequence[float]], width: int = 480,
              height: int = 320) -> str:
    """One line chart (batch size on x) as inline SVG, each point with a tooltip giving its value."""
    margin = 50
    xs = [b for s in series for b in s.batches] or [1]
    ys = [v for s in series for v in values_of(s)] or [1.0]
    x_low, x_high = min(xs), max(max(xs), min(xs) + 1)
    y_high = max(ys) * 1.1 or 1.0

    def point(batch: float, value: float) -> tuple[float, float]:
        x = margin + (batch - x_low) / (x_high - x_low) * (width - 2 * margin)
        return x, height - margin - value / y_high * (height - 2 * margin)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img">',
             f'<line x1="{margin}" y1="{height - margin}" x2="{width - margin}" y2="{height - margin}" '
             'stroke="black"/>',
             f'<line x1="{margin}" y1="{margin}" x2="{margin}" y2="{height - margin}" stroke="black"/>',
             f'<text x="{width / 2}" y="{height - 10}" text-anchor="middle">batch size</text>',
             f'<text x="12" y="{margin - 15}">{html.escape(label)}</text>',
             f'<text x="{margin - 5}" y="{margin}" text-anchor="end" font-size="10">{y_high:.3g}</text>']
    for batch in sorted(set(xs)):
        x, _ = point(batch, 0)
        parts.append(f'<text x="{x:.1f}" y="{height - margin + 15}" text-anchor="middle" font-size="10">{batch}'
                     "</text>")
    for index, line in enumerate(series):
        colour = COLOURS[index % len(COLOURS)]
        points = [point(b, v) for b, v in zip(line.batches, values_of(line), strict=True)]
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{path}"/>')
        for (x, y), batch, value in zip(points, line.batches, values_of(line), strict=True):
            parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{colour}"><title>'
                         f"{html.escape(line.name)}, batch {batch}: {value:.4g}</title></circle>")
    parts.append("</svg>")
    return "".join(parts)
