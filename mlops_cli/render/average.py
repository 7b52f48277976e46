"""Tables for `mlops average`: each checkpoint's share, the tensors copied or handled apart, the drift."""

from __future__ import annotations

from collections.abc import Iterator

from rich.console import RenderableType

from mlops_cli.render import fmt_bytes, fmt_count, fmt_float, fmt_pct, key_values, note, table
from mlops_cli.services.average import AverageReport

METHODS = {"uniform": "uniform average", "weighted": "weighted average", "ema": "exponential moving average"}


def average_tables(report: AverageReport) -> Iterator[RenderableType]:
    method = METHODS[report.method] + (f" (decay {report.decay:g})" if report.decay is not None else "")
    memory = "not measured" if report.peak_rss_growth_bytes is None else \
        f"{fmt_bytes(report.peak_rss_growth_bytes)} (largest tensor {fmt_bytes(report.largest_tensor_bytes)})"
    yield key_values(f"Average: {report.output}", [
        ("method", method),
        ("output", f"{report.output_kind}, {fmt_bytes(report.output_bytes)}"),
        ("tensors", f"{report.tensors} ({report.averaged} averaged, {report.copied} copied from the last)"),
        ("elements", fmt_count(report.elements)),
        ("written", "tensor by tensor (streamed)" if report.streamed else "collected, then torch.save"),
        ("peak memory growth", memory),
        ("time", f"{report.seconds:.2f} s"),
    ])
    yield table("Checkpoints", ("#", "checkpoint", "share"),
                ((index + 1, name, fmt_float(share, 4)) for index, (name, share)
                 in enumerate(zip(report.inputs, report.coefficients, strict=True))), numeric=("#", "share"))
    if report.kept:
        yield table("Integer tensors and buffers", ("tensor", "dtype", "kind", "handling", "inputs agree"),
                    ((k.name, k.dtype, k.kind, k.handling, "no" if k.differs else "yes") for k in report.kept))
    if report.drift:
        yield table("Drift of the average from each input", ("checkpoint", "share", "max |diff|", "mean |diff|",
                                                             "min cosine", "top-1"),
                    ((d.checkpoint, fmt_float(d.coefficient, 4),
                      fmt_float(d.max_abs_diff) if d.problem is None else d.problem, fmt_float(d.mean_abs_diff),
                      fmt_float(d.min_cosine, 6), fmt_pct(d.top1_agreement)) for d in report.drift),
                    numeric=("share", "max |diff|", "mean |diff|", "min cosine", "top-1"))
        yield note(f"inputs: {report.drift_inputs}")
