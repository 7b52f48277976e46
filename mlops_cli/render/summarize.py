"""Tables for `mlops summarize`."""

from __future__ import annotations

from collections.abc import Iterator

from rich.console import RenderableType

from mlops_cli.render import fmt_bytes, fmt_count, fmt_ms, fmt_pct, key_values, note, table
from mlops_cli.services.summarize import LayerRow, SummaryReport


def summary_tables(report: SummaryReport) -> Iterator[RenderableType]:
    yield key_values(f"Model: {report.reference}", [
        ("kind", report.kind), ("class", report.model_class), ("device", report.device)])
    yield from _parameter_tables(report)
    if report.layers:
        yield _layer_table(report.layers, report.depth)
    if report.compute is not None or report.timing is not None:
        yield _totals_table(report)
    if report.onnx is not None:
        yield from _onnx_tables(report)
    for line in report.notes:
        yield note(line)


def _parameter_tables(report: SummaryReport) -> Iterator[RenderableType]:
    params, stored = report.parameters, report.stored
    if report.onnx is not None:
        rows: list[tuple[str, object]] = [("initializer elements", fmt_count(params.total))]
    else:
        rows = [("total (tied counted per name)", fmt_count(params.total)),
                ("unique (tied counted once)", fmt_count(params.unique))]
    if params.trainable is not None:
        rows.append(("trainable", fmt_count(params.trainable)))
    if params.buffers:
        rows.append(("buffers (elements)", fmt_count(params.buffers)))
    rows.append(("in memory" if report.onnx else "in memory (parameters + buffers)", fmt_bytes(params.memory_bytes)))
    if stored is not None:
        rows.append(("on disk (files)", fmt_bytes(stored.file_bytes)))
        rows.append(("tensor bytes in the files", fmt_bytes(stored.tensor_bytes)))
    yield key_values("Parameters", rows)
    if params.by_dtype:
        title = "Initializers by dtype" if report.onnx else "Parameters and buffers by dtype"
        yield table(title, ("dtype", "tensors", "elements", "bytes"),
                    ((d.dtype, d.tensors, fmt_count(d.elements), fmt_bytes(d.nbytes)) for d in params.by_dtype),
                    numeric=("tensors", "elements", "bytes"))
    if params.tied:
        yield table("Tied weights (one tensor, several names)", ("names",),
                    ((" = ".join(group),) for group in params.tied))


def _shapes(row: LayerRow) -> str:
    if not row.output_shapes:
        return "-"
    first = "[" + ", ".join(str(d) for d in row.output_shapes[0]) + "]"
    more = len(row.output_shapes) - 1
    return f"{first} +{more}" if more else first


def _layer_table(rows: tuple[LayerRow, ...], depth: int) -> RenderableType:
    total = (rows[0].macs or 0) if rows and not rows[0].path else 0
    return table(
        f"Layers (depth {depth}; MACs of all calls, attention included; full paths in --json)",
        ("module", "type", "output shape", "params", "MACs", "share"),
        ((("  " * row.depth) + (row.path.rpartition(".")[2] or "(model)") + (f" x{row.calls}" if row.calls > 1 else ""),
          row.type, _shapes(row), fmt_count(row.params), fmt_count(row.macs),
          fmt_pct(row.macs / total) if total and row.macs else "-") for row in rows),
        numeric=("params", "MACs", "share"))


def _totals_table(report: SummaryReport) -> RenderableType:
    compute, timing = report.compute, report.timing
    rows: list[tuple[str, object]] = [("inputs", ", ".join(f"{name} {shape}" for name, shape in report.inputs.items()))]
    if compute is not None:
        rows += [
            ("MACs (whole batch)", fmt_count(compute.macs)),
            (f"MACs per example (batch {compute.batch_size})", fmt_count(compute.macs_per_example)),
            ("FLOPs per example (2 per MAC)", fmt_count(compute.flops_per_example)),
            ("attention MACs", f"{fmt_count(compute.attention_macs)} ({fmt_pct(compute.attention_macs / compute.macs)})"
             if compute.macs else fmt_count(compute.attention_macs)),
            ("activations, peak alive (inference)", fmt_bytes(compute.activation_peak_bytes)),
            ("activations, all produced (training keeps up to)", fmt_bytes(compute.activation_total_bytes)),
        ]
        if compute.measured_peak_bytes is not None:
            rows.append(("CUDA peak allocated during the pass", fmt_bytes(compute.measured_peak_bytes)))
    if timing is not None:
        engine = "ONNX Runtime" if report.onnx else "torch"
        rows.append((f"forward time, {engine} on {report.device} (median of {timing.repeats}, warm)",
                     f"{fmt_ms(timing.median_ms)} (p90 {fmt_ms(timing.p90_ms)})"))
    return key_values("Totals for one forward pass", rows)


def _onnx_tables(report: SummaryReport) -> Iterator[RenderableType]:
    graph = report.onnx
    assert graph is not None
    yield key_values("ONNX graph", [
        ("opset", ", ".join(f"{domain} {version}" for domain, version in graph.opset.items())),
        ("IR version", graph.ir_version), ("producer", graph.producer or "-"), ("nodes", graph.nodes),
        ("initializers", f"{graph.initializers} ({fmt_bytes(graph.initializer_bytes)})"),
    ])
    yield table("Graph inputs and outputs", ("", "name", "type"),
                [*(("input", n, t) for n, t in graph.inputs.items()),
                 *(("output", n, t) for n, t in graph.outputs.items())])
    yield table("Nodes by op type", ("op", "count"), graph.ops.items(), numeric=("count",))
    if graph.external_data:
        yield table("External data files", ("file", "bytes"),
                    ((name, fmt_bytes(size)) for name, size in graph.external_data.items()), numeric=("bytes",))
