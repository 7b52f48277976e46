"""Tables for `mlops export onnx`: what was written, the graph's named inputs/outputs, stage timings,
optimisation passes and the verification (the shared parity tables)."""

from __future__ import annotations

from collections.abc import Iterator

from rich.console import RenderableType
from rich.text import Text

from mlops_cli.render import fmt_bytes, fmt_ms, key_values, note, table, verdict
from mlops_cli.render.parity import parity_tables
from mlops_cli.services.export_onnx import ExportOnnxReport
from mlops_cli.services.onnx_lm import ExportWithPastReport


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


def export_with_past_tables(report: ExportWithPastReport) -> Iterator[RenderableType]:
    """`export onnx --task causal-lm`: the decoder written, its cache layout, and the sizes it was checked at."""
    yield key_values(f"ONNX export with KV cache: {report.model}", [
        ("output", report.output),
        ("engine", f"{report.engine}: the KV-cache exporter ({report.engine_reason})"),
        *((f"file {name}", fmt_bytes(size)) for name, size in report.files.items()),
        ("family", report.family),
        ("cache", f"{report.layers} layer(s) x {report.kv_heads} KV head(s) x head dim {report.head_dim}"),
        ("opset", report.opset),
        ("external data", "yes" if report.external_data else "no (one file)"),
    ])
    cache = [n for n in report.input_names if n.startswith("past_key_values.")]
    presents = [n for n in report.output_names if n.startswith("present.")]
    yield table("Graph inputs and outputs", ("kind", "names"), [
        ("input", ", ".join(n for n in report.input_names if n not in cache)),
        ("input", f"{cache[0]} ... {cache[-1]} ({len(cache)})" if cache else "-"),
        ("output", ", ".join(n for n in report.output_names if n not in presents)),
        ("output", f"{presents[0]} ... {presents[-1]} ({len(presents)})" if presents else "-"),
    ])
    checked = ", ".join(f"batch {b}, sequence {s}, past {p}" for b, s, p in report.checked_passes)
    yield verdict(True, f"written and checked against the model at {len(report.checked_passes)} size(s): {checked}")
