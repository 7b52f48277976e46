"""Tables for `mlops export onnx`: what was written, the graph's named inputs/outputs, stage timings,
optimisation passes and the verification (the shared parity tables)."""

from __future__ import annotations

from collections.abc import Iterator

from rich.console import RenderableType
from rich.text import Text

from mlops_cli.render import fmt_bytes, fmt_ms, key_values, note, table, verdict
from mlops_cli.render.parity import parity_tables
from mlops_cli.services.export_onnx import ExportOnnxReport


def export_onnx_tables(report: ExportOnnxReport) -> Iterator[RenderableType]:
    exporter = report.exporter_used + (" (fallback)" if report.fallback_reason else "")
    yield key_values(f"ONNX export: {report.model}", [
        ("output", report.output),
        *((f"file {name}", fmt_bytes(size)) for name, size in report.files.items()),
        ("exporter", exporter),
        ("opset", report.opset),
        ("dynamic dims", ", ".join(report.dynamic_dims) or "none (static shapes)"),
        ("exported at", ", ".join(f"{name}={size}" for name, size in report.export_sizes.items()) or "-"),
        ("external data", "yes" if report.external_data else "no (one file)"),
        ("nodes", report.nodes),
        ("onnx.checker", report.checker),
    ])
    yield table("Graph inputs and outputs", ("kind", "name", "dtype", "dims"), [
        *(("input", v.name, v.dtype, _dims(v.dims)) for v in report.inputs),
        *(("output", v.name, v.dtype, _dims(v.dims)) for v in report.outputs),
    ])
    if report.optimize_passes:
        yield table("Optimisation passes (each re-verified and timed)",
                    ("pass", "nodes before", "nodes after", "latency before", "latency after", "kept", "time",
                     "result"), (
            (p.name, p.nodes_before, "-" if p.nodes_after is None else p.nodes_after, fmt_ms(p.latency_before_ms),
             fmt_ms(p.latency_after_ms), Text("yes", style="green") if p.accepted else Text("no", style="red"),
             f"{p.seconds:.2f} s", p.reason)
            for p in report.optimize_passes),
                    numeric=("nodes before", "nodes after", "latency before", "latency after", "time"),
                    caption="latency: median on the export example, one thread, ONNX Runtime")
    if report.verification is not None:
        title = f"Verification: {report.output} (onnxruntime) vs {report.model}"
        yield from parity_tables(report.verification, title=title, with_verdict=False)
    yield table("Time per stage", ("stage", "seconds"),
                ((stage, f"{seconds:.2f}") for stage, seconds in report.stages.items()), numeric=("seconds",))
    for line in report.notes:
        yield note(line)
    yield verdict(report.passed, report.verdict)


def _dims(dims: tuple[str | int, ...]) -> str:
    return "[" + ", ".join(str(d) for d in dims) + "]"
