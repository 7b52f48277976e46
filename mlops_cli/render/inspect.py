"""Tables for `mlops inspect`."""

from __future__ import annotations

from collections.abc import Iterator

from rich.console import RenderableType

from mlops_cli.render import fmt_bytes, fmt_count, key_values, note, table
from mlops_cli.services.inspect import InspectReport


def inspect_tables(report: InspectReport) -> Iterator[RenderableType]:
    yield key_values(f"Checkpoint: {report.path}", [
        ("format", report.format),
        ("size on disk", fmt_bytes(report.file_bytes)),
        ("tensors", report.tensor_count),
        ("elements", fmt_count(report.element_count)),
        ("tensor bytes", fmt_bytes(report.tensor_bytes)),
        *([("state_dict key", report.state_key)] if report.state_key else []),
    ])
    if report.dtypes:
        yield table("By dtype", ("dtype", "tensors", "elements", "bytes"),
                    ((d.dtype, d.tensors, fmt_count(d.elements), fmt_bytes(d.nbytes)) for d in report.dtypes),
                    numeric=("tensors", "elements", "bytes"))
    if report.largest:
        yield table("Largest tensors", ("name", "dtype", "shape", "bytes", "shares storage with"),
                    ((t.name, t.dtype, list(t.shape), fmt_bytes(t.nbytes), t.tied_to or "") for t in report.largest),
                    numeric=("bytes",))
    if report.checkpoint_entries:
        yield key_values("Training checkpoint entries", report.checkpoint_entries.items())
    if report.config:
        yield key_values("Config", report.config.items())
    if report.graph:
        graph = dict(report.graph)
        ops = graph.pop("ops", {})
        yield key_values("ONNX graph", graph.items())
        yield table("Nodes by op type", ("op", "count"), ops.items(), numeric=("count",))
    if report.metadata:
        yield key_values("Metadata", report.metadata.items())
    if report.files:
        yield table("Files", ("file", "bytes"), ((n, fmt_bytes(s)) for n, s in report.files.items()),
                    numeric=("bytes",))
    for line in report.notes:
        yield note(line)
