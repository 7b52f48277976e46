"""Artefacts for the runtimes that need one (ONNX Runtime, TorchScript, torch.export), exported into a temporary
folder by the export services (`run(ref, options)`), which verify them against the eager model: an artefact whose
outputs differ is reported with the exporter's verdict and never timed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mlops_cli.core.contract import LoadOptions, ModelRef
from mlops_cli.core.inputs import InputRequest
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
    """Export `ref` for `runtime` into `folder` (the export services load it themselves, then verify it).

    The ONNX graph is exported and verified on CPU (ONNX Runtime picks its CUDA provider when it runs it); with its
    default optimisation (transformer fusions kept only where they are faster), as `mlops export onnx` writes it.
    """
    target = folder / SUFFIX[runtime]
    inputs = InputRequest(specs=specs)
    if runtime == ORT:
        from mlops_cli.services import export_onnx

        report = export_onnx.run(ref, export_onnx.ExportOnnxOptions(output=target, force=True, inputs=inputs,
                                                                    device="cpu", load=load))
        return Exported(target, report.passed, report.verdict)
    from mlops_cli.services import export_torch

    mode = "trace" if runtime == TORCHSCRIPT else "export"
    torch_report = export_torch.run(ref, export_torch.TorchExportOptions(output=target, force=True, mode=mode,
                                                                         inputs=inputs, device=device, load=load))
    return Exported(target, torch_report.passed, torch_report.verdict)
