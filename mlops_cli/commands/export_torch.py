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
    BatchSizeOpt,
    Device,
    DeviceOpt,
    ForceOpt,
    InputOpt,
    JsonOpt,
    ModelArg,
    OutputOpt,
    QuietOpt,
    RepeatsOpt,
    RtolOpt,
    SeedOpt,
    SeqLenOpt,
    model_options,
    progress_steps,
)
from mlops_cli.commands.export import export_app

if TYPE_CHECKING:
    from mlops_cli.core.loading import LoadOptions

DEPRECATION_NOTE = ("note: TorchScript is deprecated in PyTorch 2.x; for new deployments prefer "
                    "`mlops export pt2` (torch.export, with --aoti for C++).")


class JitMode(str, Enum):
    trace = "trace"
    script = "script"


KeepFailedOpt = Annotated[bool, typer.Option(
    "--keep-failed/--discard-failed",
    help="Keep an artefact that fails verification beside the verdict, for inspection (exit code 6 either way), "
         "as `export onnx` does; --discard-failed writes nothing then.")]


def _export(model: str, quiet: bool, *, input_specs: list[str] | None, batch_size: int | None,
            seq_len: int | None, seed: int, atol: list[str] | None, rtol: list[str] | None, device: Device,
            **fields: Any) -> Any:
    """Build the options (the input request, fp32 tolerances with --atol/--rtol overrides; `fields` are the
    options' own) and run the service, showing its steps as progress."""
    from mlops_cli.commands.common import parse_tolerances
    from mlops_cli.core.compare import PRESETS
    from mlops_cli.core.contract import ModelRef
    from mlops_cli.core.inputs import InputRequest
    from mlops_cli.services.export_torch import TorchExportOptions, run

    request = InputRequest(specs=tuple(input_specs or ()), batch_size=batch_size, seq_len=seq_len, seed=seed)
    tolerances = parse_tolerances(atol, rtol, PRESETS["fp32"])
    with progress_steps(f"exporting {model}", quiet) as on_step:
        options = TorchExportOptions(inputs=request, tolerances=tolerances, device=device.value, on_step=on_step,
                                     **fields)
        return run(ModelRef.parse(model), options)


def _finish(report: Any, as_json: bool, quiet: bool, hint: str) -> None:
    """The report (its warnings included); a failed verification is exit 6 after the report."""
    from mlops_cli import render
    from mlops_cli.core.errors import ValidationFailed
    from mlops_cli.render.export_torch import export_tables

    render.emit(report, as_json, export_tables, quiet)
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
    batch_size: BatchSizeOpt = None,
    seq_len: SeqLenOpt = None,
    seed: SeedOpt = 0,
    atol: AtolOpt = None,
    rtol: RtolOpt = None,
    device: DeviceOpt = Device.auto,
    repeats: RepeatsOpt = 0,
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

    if not quiet:
        render.hint(DEPRECATION_NOTE)
    report = _export(model, quiet, load=load, output=output, force=force, mode=mode.value, input_specs=input_specs,
                     batch_size=batch_size, seq_len=seq_len, seed=seed, atol=atol, rtol=rtol, device=device,
                     repeats=repeats, keep_failed=keep_failed)
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
    batch_size: BatchSizeOpt = None,
    seq_len: SeqLenOpt = None,
    seed: SeedOpt = 0,
    atol: AtolOpt = None,
    rtol: RtolOpt = None,
    device: DeviceOpt = Device.auto,
    repeats: RepeatsOpt = 0,
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
    torch.export kept. A size-1 example dim (--batch-size 1) is exported at 2, since torch.export would fix it,
    and verified at 1 too. Each artefact is loaded back and compared with the eager model at the export shape and
    at other sizes, and written only if all match (exit 6 names the shape that broke). The program takes keyword
    inputs (program.module()(input_ids=..., ...)); it is device-specific: exported and verified on --device.

    Example: mlops export pt2 builtin:tiny-gpt2 -o gpt2.pt2 --aoti
    """
    if aoti_output is not None and not aoti:
        from mlops_cli.core.errors import UsageError

        raise UsageError("--aoti-output was given without --aoti", hint="Add --aoti.")
    package = (aoti_output or default_aoti_path(output)) if aoti else None
    report = _export(model, quiet, load=load, output=output, force=force, mode="export", aoti_output=package,
                     input_specs=input_specs, batch_size=batch_size, seq_len=seq_len, seed=seed, atol=atol,
                     rtol=rtol, device=device, repeats=repeats, keep_failed=keep_failed)
    fixed = [d for d in report.dynamic_dims if not d.dynamic]
    _finish(report, as_json, quiet,
            "torch.export fixed a size the model's Python code depends on (see Dynamic dims); remove that control "
            "flow or use torch.cond." if fixed else "See the verification tables for the shape that broke.")


def default_aoti_path(output: Path) -> Path:
    """model.pt2 -> model.aoti.pt2 (beside the program)."""
    return output.with_name(f"{output.name.removesuffix('.pt2')}.aoti.pt2")


def register(app: typer.Typer) -> None:
    export_app.command("jit")(jit_command)
    export_app.command("pt2")(pt2_command)
