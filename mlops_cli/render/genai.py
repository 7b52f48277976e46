"""Tables of the ONNX Runtime GenAI engine: `export onnx --task causal-lm --engine genai`."""

from __future__ import annotations

from collections.abc import Iterator

from rich.console import RenderableType

from mlops_cli.render import fmt_bytes, key_values, verdict
from mlops_cli.render.parity import prompt_parity_table
from mlops_cli.services.onnx_lm.genai_export import GenaiExportReport


def genai_export_tables(report: GenaiExportReport) -> Iterator[RenderableType]:
    """The folder written, which engine built it and why, and its verification against the PyTorch model."""
    yield key_values(f"ONNX Runtime GenAI build: {report.model}", [
        ("output", f"{report.output} (folder)"),
        ("engine", f"genai: ONNX Runtime GenAI's model builder ({report.engine_reason})"),
        ("family", f"{report.family} ({report.architecture})"),
        ("precision", report.precision),
        ("build", f"{report.build_seconds:.1f} s"),
        *((f"file {name}", fmt_bytes(size)) for name, size in report.files.items()),
    ])
    yield prompt_parity_table(report.prompts)
    judged = "" if report.precision == "fp32" else f" (a {report.precision} build: reported, not judged)"
    yield verdict(report.passed, f"verified against the model: {report.verdict}{judged}")
