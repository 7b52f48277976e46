"""`mlops export jit` (TorchScript) and `mlops export pt2` (torch.export, optionally AOTInductor).

No `from __future__ import annotations`: `@model_options` rebuilds the signature and typer must see the
Annotated option types as objects, not strings.
"""

from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from mlops_cli.commands.common import (
    AtolOpt,
    Device,
    DeviceOpt,
    ForceOpt,
    InputOpt,
    JsonOpt,
    ModelArg,
    OutputOpt,
    QuietOpt,
    RtolOpt,
    SeedOpt,
    model_options,
)
from mlops_cli.commands.export import export_app

if TYPE_CHECKING:
    from mlops_cli.core.loading import LoadOptions

DEPRECATION_NOTE = ("note: TorchScript is deprecated in PyTorch 2.x; for new deployments prefer "
                    "`mlops export pt2` (torch.export, with --aoti for C++).")


class JitMode(str, Enum):
    trace = "trace"
    script = "script"


RepeatsOpt = Annotated[int, typer.Option("--repeats", min=0, help="Timed runs per shape in the verification "
                                                                  "(0: compare only, no latency table).")]
KeepFailedOpt = Annotated[bool, typer.Option(
    "--keep-failed/--discard-failed",
    help="Keep an artefact that fails verification beside the verdict, for inspection (exit code 6 either way), "
         "as `export onnx` does; --discard-failed writes nothing then.")]


def _settings(input_specs: list[str] | None, seed: int, atol: list[str] | None, rtol: list[str] | None,
              device: Device, repeats: int, force: bool, keep_failed: bool) -> Any:
    from mlops_cli.commands.common import parse_tolerances
    from mlops_cli.core.compare import PRESETS
    from mlops_cli.services.export_torch import ExportSettings

    return ExportSettings(tuple(input_specs or ()), seed, parse_tolerances(atol, rtol, PRESETS["fp32"]),
                          device.value, repeats, force, keep_failed)


def _finish(report: Any, as_json: bool, quiet: bool, hint: str) -> None:
    """Loader warnings as hints, then the report; a failed verification is exit 6 after the report."""
    from mlops_cli import render
    from mlops_cli.core.errors import ValidationFailed
    from mlops_cli.render.export_torch import export_tables

    if not quiet:
        for message in report.load_warnings:
            render.hint(f"warning: {message}")
    render.emit(report, as_json, export_tables)
    if not report.passed:
        raise ValidationFailed(report.verdict, hint=hint)


@model_options
def jit_command(
    model: ModelArg,
    output: OutputOpt,
    mode: Annotated[JitMode, typer.Option("--mode", help="trace: record one run (works on most models, Hugging "
                                                         "Face included); script: compile the Python code (keeps "
                                                         "control flow, fails on most HF models).")] = JitMode.trace,
    input_specs: InputOpt = None,
    seed: SeedOpt = 0,
    atol: AtolOpt = None,
    rtol: RtolOpt = None,
    device: DeviceOpt = Device.auto,
    repeats: RepeatsOpt = 10,
    keep_failed: KeepFailedOpt = True,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    *,
    load: "LoadOptions",
) -> None:
    """Export to TorchScript (a .pt archive for libtorch/C++), verified at several shapes.

    The archive is loaded back and compared with the eager model at the export shape and at other batch/sequence
    sizes, and written only if all match: a trace frozen at one shape fails with exit 6 naming the shape that
    broke. It takes positional tensors in the order of the Inputs table (also stored in the archive as
    extra/mlops.json); models returning dicts or Hugging Face ModelOutputs return a dict of named tensors.
    Loading it back needs --trust-code (it is code). The model is traced and verified on --device.

    Example: mlops export jit builtin:tiny-bert -o bert.pt
    """
    from mlops_cli import render
    from mlops_cli.services.export_torch import export_torchscript

    if not quiet:
        render.hint(DEPRECATION_NOTE)
    settings = _settings(input_specs, seed, atol, rtol, device, repeats, force, keep_failed)
    report = export_torchscript(model, output, load, mode.value, settings)
    _finish(report, as_json, quiet, "The trace is frozen at the traced shape where the model's Python code depends "
                                    "on a size: try --mode script, or remove that control flow.")


@model_options
def pt2_command(
    model: ModelArg,
    output: OutputOpt,
    aoti: Annotated[bool, typer.Option("--aoti", help="Also compile an AOTInductor package (a .pt2 with a shared "
                                                      "library, runnable from C++ without Python); needs a C++ "
                                                      "compiler and takes a minute or more.")] = False,
    aoti_output: Annotated[Path | None, typer.Option(
        "--aoti-output", show_default=False,
        help="Where to write the AOTInductor package (default: OUTPUT with .aoti.pt2).")] = None,
    input_specs: InputOpt = None,
    seed: SeedOpt = 0,
    atol: AtolOpt = None,
    rtol: RtolOpt = None,
    device: DeviceOpt = Device.auto,
    repeats: RepeatsOpt = 10,
    keep_failed: KeepFailedOpt = True,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    *,
    load: "LoadOptions",
) -> None:
    """Export with torch.export (a .pt2 ExportedProgram) with dynamic batch/sequence dims, verified at several
    shapes; --aoti also compiles and verifies an AOTInductor package.

    Named dims of the inputs (batch, sequence) are exported as dynamic; the Dynamic dims table shows what
    torch.export kept. Each artefact is loaded back and compared with the eager model at the export shape and at
    other sizes, and written only if all match (exit 6 names the shape that broke). The program takes keyword
    inputs (program.module()(input_ids=..., ...)); it is device-specific: exported and verified on --device.

    Example: mlops export pt2 builtin:tiny-gpt2 -o gpt2.pt2 --aoti
    """
    from mlops_cli.services.export_torch import export_program

    if aoti_output is not None and not aoti:
        from mlops_cli.core.errors import UsageError

        raise UsageError("--aoti-output was given without --aoti", hint="Add --aoti.")
    package = (aoti_output or default_aoti_path(output)) if aoti else None
    settings = _settings(input_specs, seed, atol, rtol, device, repeats, force, keep_failed)
    report = export_program(model, output, load, settings, package)
    _finish(report, as_json, quiet, "torch.export fixed a size the model's Python code depends on (see Dynamic "
                                    "dims); remove that control flow or use torch.cond.")


def default_aoti_path(output: Path) -> Path:
    """model.pt2 -> model.aoti.pt2 (beside the program)."""
    return output.with_name(f"{output.name.removesuffix('.pt2')}.aoti.pt2")


def register(app: typer.Typer) -> None:
    export_app.command("jit")(jit_command)
    export_app.command("pt2")(pt2_command)
