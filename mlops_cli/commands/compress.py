"""`mlops compress half` and `mlops compress int8`.

No `from __future__ import annotations`: `@model_options` rebuilds the signature, and typer must see the
Annotated option types as types, not strings.
"""

from enum import Enum
from typing import TYPE_CHECKING, Annotated

import typer

from mlops_cli.commands.common import (
    AtolOpt,
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
    parse_tolerances,
)
from mlops_cli.commands.common import Device as DeviceChoice

if TYPE_CHECKING:
    from mlops_cli.core.loading import LoadOptions

compress_app = typer.Typer(help="Make checkpoints smaller (fp16/bf16, dynamic int8), with their drift measured.",
                           no_args_is_help=True)


class HalfDtype(str, Enum):
    fp16 = "fp16"
    bf16 = "bf16"


CheckOpt = Annotated[bool, typer.Option(
    "--check/--no-check", help="Measure the drift of the result against the original (loads both models).")]
RepeatsOpt = Annotated[int, typer.Option("--repeats", min=1, help="Timed repeats per input set.")]


@compress_app.command("half")
@model_options
def half_command(
    model: ModelArg,
    output: OutputOpt,
    dtype: Annotated[HalfDtype, typer.Option("--dtype", help="Target dtype: fp16 or bf16 (ONNX: fp16).")]
    = HalfDtype.fp16,
    keep_fp32: Annotated[list[str] | None, typer.Option(
        "--keep-fp32", metavar="REGEX", show_default=False,
        help="Leave tensors whose name matches this regular expression as they are (repeatable). ONNX: nodes "
             "whose name or weight matches stay float32.")] = None,
    default_keep: Annotated[bool, typer.Option(
        "--default-keep/--no-default-keep",
        help="Also keep normalisation layers (LayerNorm, ln_*, *norm*, bn*) as they are.")] = True,
    allow_overflow: Annotated[bool, typer.Option(
        "--allow-overflow", help="Write the output even when values overflow the target dtype.")] = False,
    keep_io_types: Annotated[bool, typer.Option(
        "--keep-io-types/--no-keep-io-types", help="ONNX: keep float32 graph inputs and outputs.")] = True,
    per_layer: Annotated[bool, typer.Option(
        "--per-layer", help="Compare every module's output (forward hooks) and name the first layer whose "
                            "error jumps.")] = False,
    check: CheckOpt = True,
    device: DeviceOpt = DeviceChoice.auto,
    inputs: InputOpt = None,
    seed: SeedOpt = 0,
    atol: AtolOpt = None,
    rtol: RtolOpt = None,
    repeats: RepeatsOpt = 10,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    *,
    load: "LoadOptions",
) -> None:
    """fp16/bf16 copy of a checkpoint (same kind of artefact), with overflow, size and drift reported.

    Writes the same kind of artefact it reads: HF folder, safetensors (streamed tensor by tensor), torch
    state_dict or training checkpoint (other entries kept), ONNX. Integer tensors never change. Reports
    per tensor the values that overflow, flush to zero or become subnormal (overflow fails, exit 6, unless
    --allow-overflow), the size before/after, and the drift against the original.

    Example: mlops compress half tiny-bert/ -o tiny-bert-fp16/ --per-layer
    """
    from mlops_cli import render
    from mlops_cli.core.compare import PRESETS
    from mlops_cli.core.errors import ValidationFailed
    from mlops_cli.render.compress import half_failure_hint, half_tables
    from mlops_cli.services.compress_half import HalfOptions, compress_half

    options = HalfOptions(
        dtype=dtype.value, keep_fp32=tuple(keep_fp32 or ()), default_keep=default_keep,
        allow_overflow=allow_overflow, keep_io_types=keep_io_types, check=check, per_layer=per_layer,
        device=device.value, inputs=tuple(inputs or ()), seed=seed, repeats=repeats, force=force,
        tolerances=parse_tolerances(atol, rtol, PRESETS[dtype.value]))
    with render.progress(f"compressing {model} to {dtype.value}", quiet=quiet or as_json):
        report = compress_half(model, output, load, options)
    render.emit(report, as_json, half_tables)
    if not report.passed:
        raise ValidationFailed(report.verdict, hint=half_failure_hint(report))


@compress_app.command("int8")
@model_options
def int8_command(
    model: ModelArg,
    output: OutputOpt,
    quantize_embeddings: Annotated[bool, typer.Option(
        "--quantize-embeddings", help="Also quantise embedding tables (ONNX Gather, torch Embedding; weight-only). "
                                      "Off by default: they hold most of a small model's accuracy.")] = False,
    per_channel: Annotated[bool, typer.Option(
        "--per-channel/--per-tensor", help="One int8 scale per output channel, or one per weight.")] = True,
    exclude: Annotated[list[str] | None, typer.Option(
        "--exclude", metavar="REGEX", show_default=False,
        help="Leave layers (torch module names, ONNX node or weight names) matching this in float (repeatable).")]
    = None,
    op_types: Annotated[str, typer.Option(
        "--op-types", help="ONNX: comma-separated op types to quantise (Conv is possible: ConvInteger is often "
                           "slower than float on CPU).")] = "MatMul,Gemm,Attention,LSTM",
    check: CheckOpt = True,
    inputs: InputOpt = None,
    seed: SeedOpt = 0,
    atol: AtolOpt = None,
    rtol: RtolOpt = None,
    repeats: RepeatsOpt = 20,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    *,
    load: "LoadOptions",
) -> None:
    """Dynamic int8 quantisation, with size, CPU latency before/after and drift reported.

    int8 weights, activations quantised per call: ONNX files through ONNX Runtime, torch models through
    torch.ao (written as a torch file of the quantised state_dict). Drift beyond tolerance fails (exit 6).

    Example: mlops compress int8 model.onnx -o model-int8.onnx --quantize-embeddings
    """
    from mlops_cli import render
    from mlops_cli.core.compare import PRESETS
    from mlops_cli.core.errors import ValidationFailed
    from mlops_cli.render.compress import int8_failure_hint, int8_tables
    from mlops_cli.services.compress_int8 import Int8Options, compress_int8

    options = Int8Options(
        quantize_embeddings=quantize_embeddings, per_channel=per_channel, exclude=tuple(exclude or ()),
        op_types=tuple(op.strip() for op in op_types.split(",") if op.strip()), inputs=tuple(inputs or ()),
        seed=seed, repeats=repeats, check=check, force=force, tolerances=parse_tolerances(atol, rtol, PRESETS["int8"]))
    with render.progress(f"quantising {model} to int8", quiet=quiet or as_json):
        report = compress_int8(model, output, load, options)
    render.emit(report, as_json, int8_tables)
    if not report.passed:
        raise ValidationFailed(report.verdict, hint=int8_failure_hint(report))


def register(app: typer.Typer) -> None:
    app.add_typer(compress_app, name="compress")
