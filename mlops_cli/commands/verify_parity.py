"""`mlops verify-parity REFERENCE CANDIDATE`.

No `from __future__ import annotations`: `@model_options` rebuilds the signature and typer must see the
Annotated option types as objects, not strings.
"""

from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from mlops_cli.commands.common import (
    AtolOpt,
    Device,
    DeviceOpt,
    InputOpt,
    JsonOpt,
    QuietOpt,
    RtolOpt,
    SeedOpt,
    TextOpt,
    model_options,
    parse_tolerances,
)

if TYPE_CHECKING:
    from mlops_cli.core.loading import LoadOptions


class Preset(str, Enum):
    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"
    int8 = "int8"


PresetOpt = Annotated[Preset, typer.Option(
    "--preset", help="Default tolerances for the kind of candidate: fp32 (atol 1e-4, rtol 1e-3), fp16 (1e-2, 1e-2), "
                     "bf16 (5e-2, 2e-2), int8 (1e-1, 5e-2); --atol/--rtol override them.")]
IncludePaddingOpt = Annotated[bool, typer.Option(
    "--include-padding", help="Also compare positions the attention mask marks as padding (excluded by default: "
                              "they legitimately differ).")]
RepeatsOpt = Annotated[int, typer.Option(
    "--repeats", min=0, help="Timed runs per side and input set (after warm-up); 0 skips timing.")]
ModelRefArg = "Model reference: HF folder, weights file (+ --arch), TorchScript/.pt2, .onnx, or builtin:NAME."


@model_options
def verify_parity_command(
    reference: Annotated[str, typer.Argument(metavar="REFERENCE", show_default=False,
                                             help=f"The model taken as correct. {ModelRefArg}")],
    candidate: Annotated[str, typer.Argument(metavar="CANDIDATE", show_default=False,
                                             help=f"The model checked against it. {ModelRefArg}")],
    inputs: InputOpt = None,
    inputs_file: Annotated[Path | None, typer.Option(
        "--inputs", show_default=False, help="Real inputs from an .npz or .safetensors file (name -> array).")] = None,
    texts: TextOpt = None,
    samples: Annotated[int, typer.Option("--samples", min=1, help="Random draws of every shape set.")] = 1,
    seed: SeedOpt = 0,
    atol: AtolOpt = None,
    rtol: RtolOpt = None,
    preset: PresetOpt = Preset.fp32,
    include_padding: IncludePaddingOpt = False,
    device: DeviceOpt = Device.auto,
    repeats: RepeatsOpt = 10,
    timing: Annotated[bool, typer.Option(
        "--timing/--no-timing", help="Time both sides on every input set (--no-timing is --repeats 0).")] = True,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    *,
    load: "LoadOptions",
) -> None:
    """Check that CANDIDATE computes what REFERENCE computes (PyTorch, TorchScript, .pt2, ONNX Runtime; any pair)
    on several shapes: batch 1 and >1, short and long padded sequences. Per output: max/mean/p99 |diff|, cosine,
    top-1 agreement, the smallest passing atol; latency of both sides. Exit 6 on mismatch, NaN/inf or a
    non-deterministic side, naming the worst output. Loading options apply to both sides.

    Example: mlops verify-parity builtin:tiny-bert bert.onnx --atol logits=1e-4 --json
    """
    from mlops_cli import render
    from mlops_cli.core.compare import PRESETS
    from mlops_cli.core.errors import ValidationFailed
    from mlops_cli.render.parity import verify_parity_tables
    from mlops_cli.services.verify_parity import VerifySettings, verify_parity

    settings = VerifySettings(
        inputs=tuple(inputs or ()), inputs_file=str(inputs_file) if inputs_file else None, texts=tuple(texts or ()),
        samples=samples, seed=seed,
        tolerances=parse_tolerances(atol, rtol, PRESETS[preset.value]), preset=preset.value,
        include_padding=include_padding, device=device.value, repeats=repeats, timing=timing and repeats > 0,
        load=load)
    with render.progress(f"comparing {candidate} with {reference}", quiet=quiet):
        report = verify_parity(reference, candidate, settings)
    render.emit(report, as_json, verify_parity_tables)
    if not report.passed:
        worst = f" (worst: {report.worst_output})" if report.worst_output else ""
        raise ValidationFailed(f"parity check failed{worst}: {report.verdict}", hint=report.hint)


def register(app: typer.Typer) -> None:
    app.command("verify-parity")(verify_parity_command)
