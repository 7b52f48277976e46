"""Tables for parity reports (verify-parity, and the verification step of exports, compress, prune)."""

from __future__ import annotations

from collections.abc import Iterator

from rich.console import RenderableType
from rich.text import Text

from mlops_cli.render import fmt_float, fmt_ms, fmt_pct, note, table, verdict
from mlops_cli.services.parity import ParityReport

PARITY_COLUMNS = ("input set", "output", "max |diff|", "max rel", "mean |diff|", "p99 |diff|", "cosine",
                  "top-1", "min atol", "result")
LATENCY_COLUMNS = ("input set", "reference p50", "reference p90", "candidate p50", "candidate p90", "speed-up")


def parity_rows(report: ParityReport) -> Iterator[tuple[object, ...]]:
    for shape in report.shapes:
        if shape.error and not shape.outputs:
            yield (shape.label, "-", "-", "-", "-", "-", "-", "-", "-", Text(f"FAIL: {shape.error}", style="red"))
            continue
        for diff in shape.outputs:
            status = Text("PASS", style="green") if diff.passed else Text(f"FAIL{': ' + diff.problem if diff.problem else ''}",
                                                                        style="red")
            yield (shape.label, diff.name, fmt_float(diff.max_abs), fmt_float(diff.max_rel), fmt_float(diff.mean_abs),
                   fmt_float(diff.p99_abs), fmt_float(diff.cosine, 6), fmt_pct(diff.top1_agreement),
                   fmt_float(diff.min_atol_to_pass), status)


def parity_tables(report: ParityReport, title: str | None = None) -> Iterator[RenderableType]:
    """The parity table, the latency table and the verdict line."""
    masked = "padded positions excluded" if report.masked_positions_excluded else "padded positions included"
    yield table(title or f"Parity: {report.candidate} ({report.candidate_backend}) vs {report.reference} "
                         f"({report.reference_backend})",
                PARITY_COLUMNS, parity_rows(report), numeric=PARITY_COLUMNS[2:9],
                caption=f"pass: |cand - ref| <= atol {report.atol:g} + rtol {report.rtol:g} * |ref|; {masked}; "
                        f"device {report.device}")
    timed = [s for s in report.shapes if s.reference_latency and s.candidate_latency]
    if timed:
        yield table("Latency (warm, median of repeats)", LATENCY_COLUMNS, (
            (s.label, fmt_ms(s.reference_latency.median_ms), fmt_ms(s.reference_latency.p90_ms),  # type: ignore[union-attr]
             fmt_ms(s.candidate_latency.median_ms), fmt_ms(s.candidate_latency.p90_ms),  # type: ignore[union-attr]
             f"{s.speedup:.2f}x" if s.speedup else "-") for s in timed), numeric=LATENCY_COLUMNS[1:])
    for line in report.notes:
        yield note(line)
    yield verdict(report.passed, report.verdict)
