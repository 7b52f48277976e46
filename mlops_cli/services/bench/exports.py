"""Artefacts for the runtimes that need one (ONNX Runtime, TorchScript, torch.export), exported into a temporary
folder by the export services, which verify them against the eager model: an artefact whose outputs differ is
reported with the exporter's verdict and never timed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mlops_cli.core.contract import LoadOptions, ModelRef
from mlops_cli.services.bench.candidates import ORT, PT2, TORCHSCRIPT

SUFFIX = {ORT: "model.onnx", TORCHSCRIPT: "model.torchscript.pt", PT2: "model.pt2"}


@dataclass(frozen=True)
class Exported:
    """An exported artefact and the export's own verification verdict."""

    path: Path
    passed: bool
    verdict: str


def export_artefact(runtime: str, ref: ModelRef, load: LoadOptions, specs: tuple[str, ...], device: str,
                    folder: Path) -> Exported:
    """Export `ref` for `runtime` into `folder` (the export services load it themselves, then verify it)."""
    target = folder / SUFFIX[runtime]
    if runtime == ORT:
        from mlops_cli.services.export_onnx import ExportOnnxSettings, export_onnx

        report = export_onnx(str(ref), target, ExportOnnxSettings(inputs=specs, device="cpu", repeats=0, force=True,
                                                                  load=load))
        return Exported(target, report.passed, report.verdict)
    from mlops_cli.services.export_torch import ExportSettings, export_program, export_torchscript

    settings = ExportSettings(input_specs=specs, device=device, repeats=0, force=True)
    torch_report = (export_torchscript(str(ref), target, load, "trace", settings) if runtime == TORCHSCRIPT
                    else export_program(str(ref), target, load, settings))
    return Exported(target, torch_report.passed, torch_report.verdict)
