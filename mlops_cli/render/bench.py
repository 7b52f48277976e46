"""Tables for `mlops bench`."""

from __future__ import annotations

from collections.abc import Iterator

from rich.console import RenderableType
from rich.text import Text

from mlops_cli.render import fmt_bytes, fmt_ms, key_values, note, table
from mlops_cli.services.bench import BenchReport, BenchRow
from mlops_cli.services.bench.sweep import NOT_MEASURED, TIMED

SPEEDUP = "speed-up vs eager"


def columns(unit: str) -> tuple[str, ...]:
    """The table's columns; throughput is headed by its unit (tokens/s for text, items/s otherwise)."""
    return ("runtime", "dtype", "batch", "seq", "p50", "p90", unit, "peak memory", SPEEDUP)


def bench_tables(report: BenchReport) -> Iterator[RenderableType]:
    yield key_values(f"Benchmark of {report.model}", [
        ("against", report.against or "-"),
        ("device", report.device),
        ("threads", f"{report.threads} ({report.threads_source})"),
        ("timing", f"{report.repeats} interleaved repeats after {report.warmup} warm-up call(s); p50 = median"),
        ("inputs", report.input_source),
        ("speed-up vs", report.baseline or "nothing (no eager baseline)"),
    ])
    shaped = [row for row in report.rows if row.batch is not None]
    if shaped:
        memory = sorted({row.memory for row in shaped if row.status == TIMED and row.memory != NOT_MEASURED})
        heads = columns(shaped[0].throughput_unit)
        yield table("Latency, throughput, memory", heads, (_row(row) for row in shaped), numeric=heads[2:8],
                    caption=f"peak memory: {', '.join(memory) or NOT_MEASURED}; speed-up: eager p50 / p50, with its "
                            "95% bootstrap interval (no measurable difference when it spans 1.0)")
    unshaped = [row for row in report.rows if row.batch is None]
    if unshaped:
        yield table("Not timed", ("runtime", "dtype", "status", "why"),
                    ((row.runtime, row.dtype, Text(row.status, style="bold red"), row.note or "") for row in unshaped))
    for line in report.notes:
        yield note(f"note: {line}")
    if report.plot:
        yield note(f"plot written to {report.plot}")


def _row(row: BenchRow) -> tuple[str | Text, ...]:
    sizes = (row.runtime, row.dtype, str(row.batch), "-" if row.seq_len is None else str(row.seq_len))
    if row.status != TIMED or row.latency is None:
        return (*sizes, "-", "-", "-", "-", Text(row.note or row.status, style="bold red"))
    throughput = f"{row.throughput:,.1f}" if row.throughput is not None else "-"
    memory = "not measured" if row.peak_memory_bytes is None else fmt_bytes(row.peak_memory_bytes)
    return (*sizes, fmt_ms(row.latency.median_ms), fmt_ms(row.latency.p90_ms), throughput, memory,
            _speedup(row))


def _speedup(row: BenchRow) -> str | Text:
    if row.speedup is None:
        return row.speedup_text or "-"
    style = "green" if row.speedup.measurable and row.speedup.ratio > 1 else \
        "red" if row.speedup.measurable else ""
    return Text(row.speedup_text or "-", style=style)
