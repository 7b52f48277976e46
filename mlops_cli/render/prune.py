"""Tables for `mlops prune`: what was pruned, what it saves (raw vs compressed, MACs), drift and latency."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from rich.console import RenderableType
from rich.text import Text

from mlops_cli.render import fmt_bytes, fmt_count, fmt_float, fmt_ms, fmt_pct, key_values, note, table, verdict
from mlops_cli.render.parity import parity_tables
from mlops_cli.render.perplexity import perplexity_tables
from mlops_cli.services.prune import AmountResult, LatencyFigures, PruneReport, SizeFigures

DRIFT_COLUMNS = ("input set", "output", "max |diff|", "mean |diff|", "cosine", "top-1")


def prune_tables(report: PruneReport) -> Iterator[RenderableType]:
    yield key_values(f"Pruning: {report.model}", _settings(report))
    if report.is_sweep:
        yield from _sweep_tables(report)
    else:
        yield from _single_tables(report, report.results[0])
    yield from _skipped_notes(report.skipped)
    yield _size_note(report)
    for line in report.notes:
        yield note(line)
    if report.enforced:
        yield verdict(report.passed, report.verdict)
    else:
        yield Text.assemble(Text(" DRIFT ", style="bold black on yellow"), " ", report.verdict)


def _skipped_notes(skipped: tuple[tuple[str, str], ...], shown: int = 4) -> Iterator[RenderableType]:
    """One line per reason: 'left alone, <reason>: a, b, c and 5 more'."""
    by_reason: dict[str, list[str]] = {}
    for name, reason in skipped:
        by_reason.setdefault(reason, []).append(name)
    for reason, names in by_reason.items():
        more = f" and {len(names) - shown} more" if len(names) > shown else ""
        yield note(f"left alone, {reason}: {', '.join(names[:shown])}{more}")


def _settings(report: PruneReport) -> list[tuple[str, object]]:
    method = report.method
    if report.method == "ln-structured":
        method += f" (n={report.n:g}" + (f", dim={report.dim})" if report.dim is not None else ")")
    pairs: list[tuple[str, object]] = [
        ("method", method + ("  + structural shrink" if report.structured_shrink else "")),
        ("amount", ", ".join(f"{r.amount:g}" for r in report.results)),
        ("layers pruned", f"{len(report.targets)} ({len(report.skipped)} left alone)"),
        ("output kind", report.model_kind),
        ("device", report.device),
    ]
    if report.method == "random":
        pairs.append(("seed", report.seed))
    return pairs


# ---------------------------------------------------------------- one amount


def _single_tables(report: PruneReport, result: AmountResult) -> Iterator[RenderableType]:
    if report.structured_shrink:
        yield table("Tensors shrunk", ("tensor", "type", "shape before", "shape after", "removed"),
                    ((layer.name, layer.module_type, list(layer.shape_before or ()), list(layer.shape),
                      fmt_pct(layer.sparsity)) for layer in result.layers), numeric=("removed",))
    else:
        yield table("Sparsity per layer", ("layer", "type", "shape", "zeros", "elements", "sparsity"),
                    ((layer.name, layer.module_type, list(layer.shape), layer.zeros, layer.elements,
                      fmt_pct(layer.sparsity)) for layer in result.layers),
                    numeric=("zeros", "elements", "sparsity"),
                    caption=f"pruned layers: {fmt_pct(result.target_sparsity, 2)} zeros; whole model: "
                            f"{fmt_pct(result.model_sparsity, 2)} of {fmt_count(result.parameters)} parameters")
    yield table("Before / after", ("figure", "before", "after", "change"), _before_after(report, result),
                numeric=("before", "after", "change"))
    yield from _drift_tables(report, result)
    yield from perplexity_tables(result.perplexity, after="pruned")
    if result.output:
        yield key_values("Output", [("written", result.output),
                                    *((name, fmt_bytes(size)) for name, size in result.output_files.items()),
                                    ("reload check", result.reloaded or "-")])


def _before_after(report: PruneReport, result: AmountResult) -> Iterator[tuple[str, str, str, str]]:
    yield ("parameters", fmt_count(report.parameters_before), fmt_count(result.parameters),
           _change(report.parameters_before, result.parameters))
    yield ("zero parameters", fmt_pct(report.model_zeros_before / max(report.parameters_before, 1), 2),
           fmt_pct(result.model_sparsity, 2), "")
    yield from _size_rows(report.size_before, result.size)
    if result.macs is not None or report.macs_before is not None:
        yield ("MACs (one forward)", fmt_count(report.macs_before), fmt_count(result.macs),
               _change(report.macs_before, result.macs))
    if result.latency:
        latency = result.latency
        yield (f"latency p50 ({latency.input_set})", fmt_ms(latency.before.median_ms), fmt_ms(latency.after.median_ms),
               speed_change(latency))
        yield ("latency p90", fmt_ms(latency.before.p90_ms), fmt_ms(latency.after.p90_ms), "")


def speed_change(latency: LatencyFigures) -> str:
    """'1.80x faster (1.62-1.95x)' only where the interval supports it; else 'no measurable difference'."""
    return latency.ratio.describe() if latency.ratio else "-"


def _size_rows(before: SizeFigures, after: SizeFigures) -> Iterator[tuple[str, str, str, str]]:
    yield "weights, raw", fmt_bytes(before.raw_bytes), fmt_bytes(after.raw_bytes), _change(before.raw_bytes,
                                                                                           after.raw_bytes)
    yield (f"weights, {after.codec or 'compressed'}", fmt_bytes(before.gzip_bytes), fmt_bytes(after.gzip_bytes),
           _change(before.gzip_bytes, after.gzip_bytes))


def _size_note(report: PruneReport) -> Text:
    """How the compressed size was found (whole, or from a sample), so an estimate is never read as exact."""
    size = report.size_before
    if size.gzip_bytes is None:
        return note(f"compressed size: {size.method}")
    return note(f"compressed size ({size.codec}): {size.method}")


def _change(before: float | None, after: float | None) -> str:
    if not before or after is None:
        return "-"
    return f"{(after - before) / before:+.1%}"


def _drift_tables(report: PruneReport, result: AmountResult) -> Iterator[RenderableType]:
    title = f"Drift vs the unpruned model (amount {result.amount:g})"
    if "atol" in report.thresholds:
        yield from parity_tables(result.parity, title=title, with_verdict=False)  # ours covers every threshold
        return
    rows: list[tuple[object, ...]] = []
    for shape in result.parity.shapes:
        if shape.error and not shape.outputs:
            rows.append((shape.label, "-", "-", "-", "-", Text(shape.error, style="red")))
        for diff in shape.outputs:
            rows.append((shape.label, diff.name, fmt_float(diff.max_abs), fmt_float(diff.mean_abs),
                         fmt_float(diff.cosine, 6), fmt_pct(diff.top1_agreement)))
    yield table(title, DRIFT_COLUMNS, rows, numeric=DRIFT_COLUMNS[2:],
                caption="pruning changes the outputs by design: this is how much (top-1: share of predictions "
                        "unchanged)")


# ---------------------------------------------------------------- sweeps


def _sweep_tables(report: PruneReport) -> Iterator[RenderableType]:
    """The table to choose an amount from, then latency per amount, then where each output went."""
    shrink = report.structured_shrink
    columns = ["amount", *(["params", "MACs"] if shrink else ["sparsity"]), "raw size", "gzip size", "max |diff|",
               "cosine", "top-1", "speed-up", *(["result"] if report.enforced else [])]
    sizes = [fmt_count(report.parameters_before), fmt_count(report.macs_before)] if shrink else ["-"]
    baseline: list[object] = ["input", *sizes, fmt_bytes(report.size_before.raw_bytes),
                              fmt_bytes(report.size_before.gzip_bytes)]
    baseline += [""] * (len(columns) - len(baseline))
    rows: list[list[object]] = [baseline, *(_sweep_row(report, result) for result in report.results)]
    yield table("Sweep: one row per amount", columns, rows,
                numeric=[c for c in columns if c not in ("amount", "result")],
                caption="sparsity: zeros in the pruned layers; drift: worst over all outputs and input sets; "
                        "speed-up: p50 of the unpruned model / p50 of the pruned one, claimed only where its 95% "
                        "bootstrap interval excludes 1.0")
    timed = [r for r in report.results if r.latency]
    if timed:
        yield table(f"Latency per amount (A/B interleaved, {timed[0].latency.input_set})",  # type: ignore[union-attr]
                    LATENCY_COLUMNS, (_latency_row(r) for r in timed), numeric=LATENCY_COLUMNS[1:])
    scored = [r for r in report.results if r.perplexity]
    if scored:
        yield from _perplexity_sweep(scored)
    written = [r.output for r in report.results if r.output]
    if written:
        yield note("written: " + ", ".join(written))


def _perplexity_sweep(results: list[AmountResult]) -> Iterator[RenderableType]:
    """A causal LM's perplexity per amount, against the unpruned model's."""
    first = results[0].perplexity
    assert first is not None
    rows = [(f"{r.amount:g}", fmt_float(r.perplexity.after), f"{r.perplexity.relative_change:+.2%}",
             f"{r.perplexity.greedy_agreement:.1%}") for r in results if r.perplexity]
    yield table(f"Perplexity per amount on {Path(first.text).name} (unpruned: {fmt_float(first.before)})",
                ("amount", "perplexity", "change", "greedy agreement"), rows,
                numeric=("perplexity", "change", "greedy agreement"),
                caption=f"{first.tokens} tokens ({first.scored_tokens} scored) in windows of {first.window} moving "
                        f"by {first.stride}")


LATENCY_COLUMNS = ("amount", "before p50", "before p90", "after p50", "after p90", "speed-up")


def _latency_row(result: AmountResult) -> tuple[str, ...]:
    latency = result.latency
    assert latency is not None
    return (f"{result.amount:g}", fmt_ms(latency.before.median_ms), fmt_ms(latency.before.p90_ms),
            fmt_ms(latency.after.median_ms), fmt_ms(latency.after.p90_ms), speed_change(latency))


def _sweep_row(report: PruneReport, result: AmountResult) -> list[object]:
    drift, latency = result.drift, result.latency
    shrink = report.structured_shrink
    row: list[object] = [
        f"{result.amount:g}",
        *([fmt_count(result.parameters), fmt_count(result.macs)] if shrink else [fmt_pct(result.target_sparsity)]),
        fmt_bytes(result.size.raw_bytes), fmt_bytes(result.size.gzip_bytes),
        fmt_float(drift.max_abs) if not drift.error else Text(drift.error, style="red"),
        fmt_float(drift.cosine, 6), fmt_pct(drift.top1_agreement),
        speed_change(latency) if latency else "-",
    ]
    if report.enforced:
        row.append(Text("PASS", style="green") if result.passed else Text("FAIL", style="red"))  # why: verdict
    return row
