"""Tables for `mlops export jit` and `mlops export pt2`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from rich.console import RenderableType

from mlops_cli.render import fmt_bytes, key_values, note, table, verdict
from mlops_cli.render.parity import parity_tables
from mlops_cli.services.export_torch import DynamicDim, TorchExportReport

FORMAT_NAMES = {"torchscript": "TorchScript", "torch-export-pt2": "torch.export program",
                "aoti-package": "AOTInductor package"}


def export_tables(report: TorchExportReport) -> Iterator[RenderableType]:
    yield key_values(f"Export: {report.source} with {report.exporter} ({report.mode})", [
        ("source", f"{report.source} ({report.source_kind})"),
        ("device", report.device),
        ("call", _call_line(report)),
        ("outputs", f"{', '.join(report.outputs)} ({report.output_structure})"),
        *((FORMAT_NAMES.get(a.format, a.format), f"{a.path} ({fmt_bytes(a.file_bytes)})" if a.written
           else f"{a.path} (not written)") for a in report.artefacts),
    ])
    yield table("Inputs, in this order", ("#", "name", "dtype", "dims", "export shape"),
                ((i.position, i.name, i.dtype, f"[{', '.join(i.dims)}]", list(i.example_shape))
                 for i in report.inputs), numeric=("#",))
    if report.dynamic_dims:
        yield table("Dynamic dims kept by torch.export", ("input", "axis", "dim", "export size", "accepted sizes"),
                    ((d.input, d.axis, d.name, d.export_size, _range(d)) for d in report.dynamic_dims),
                    numeric=("axis", "export size"),
                    caption="ranges as torch.export states them; the verification below shows the sizes tried")
    yield table("Stages", ("stage", "seconds"), ((name, f"{seconds:.2f}") for name, seconds in report.stages.items()),
                numeric=("seconds",))
    if report.tracer_warnings:
        yield note(f"The tracer froze {len(report.tracer_warnings)} Python decision(s) on tensor values; the "
                   "multi-shape verification below shows whether they matter:")
        for line in report.tracer_warnings:
            yield note(f"  {line}")
    for artefact in report.artefacts:
        yield from parity_tables(artefact.parity, title=f"Verification: {Path(artefact.path).name} "
                                                        f"({artefact.parity.candidate_backend}) vs the eager model")
    for line in report.notes:
        yield note(line)
    written = [f"{a.path} ({fmt_bytes(a.file_bytes)})" for a in report.artefacts if a.written]
    if written:
        yield note(f"wrote {', '.join(written)}")
    if len(report.artefacts) > 1:  # one artefact: its parity verdict above is the verdict
        yield verdict(report.passed, report.verdict)


def _call_line(report: TorchExportReport) -> str:
    names = ", ".join(i.name for i in report.inputs)
    if report.exporter == "torch.export":
        keywords = ", ".join(f"{i.name}=..." for i in report.inputs)
        return f"program.module()({keywords}); AOTInductor C++ takes the flat list ({names})"
    return f"module.forward({names}) (positional)"


def _range(dim: DynamicDim) -> str:
    if not dim.dynamic:
        return f"fixed at {dim.export_size}"
    low = "?" if dim.min is None else str(dim.min)
    high = "∞" if dim.max is None else str(dim.max)
    return f"{low}..{high}"
