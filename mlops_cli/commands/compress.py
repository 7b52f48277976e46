"""`mlops compress half`, `mlops compress int8` and `mlops compress int4`.

No `from __future__ import annotations`: `@model_options` rebuilds the signature, and typer must see the
Annotated option types as types, not strings.
"""

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from mlops_cli.commands.common import (
    AtolOpt,
    DeviceOpt,
    EvalOpt,
    EvalTextOpt,
    ForceOpt,
    HalfPrecision,
    InputOpt,
    JsonOpt,
    ModelArg,
    OutputOpt,
    Preset,
    PresetOpt,
    QuietOpt,
    RepeatsOpt,
    RtolOpt,
    SeedOpt,
    ThreadsOpt,
    evaluation_text,
    model_options,
    parse_tolerances,
    progress_steps,
)
from mlops_cli.commands.common import Device as DeviceChoice

if TYPE_CHECKING:
    from mlops_cli.core.contract import LoadOptions
    from mlops_cli.core.parity import Tolerances
    from mlops_cli.services.perplexity import EvaluationText

compress_app = typer.Typer(help="Make checkpoints smaller (fp16/bf16, dynamic int8, int4 for ONNX LMs), with "
                                "the drift or perplexity measured.",
                           no_args_is_help=True)


CheckOpt = Annotated[bool, typer.Option(
    "--check/--no-check", help="Measure the drift of the result against the original (loads both models; causal "
                               "LMs: also the perplexity, see --eval; --no-check skips both).")]
TokenizerOpt = Annotated[Path | None, typer.Option(
    "--tokenizer", rich_help_panel="Causal LMs", show_default=False,
    help="Folder with the tokenizer for the perplexity of an ONNX decoder (default: the .onnx file's folder).")]


def _tolerances(atol: list[str] | None, rtol: list[str] | None, preset: str) -> "Tolerances | None":
    """--atol/--rtol over the preset's values; None (the service's preset alone) when neither is given."""
    from mlops_cli.core.compare import PRESETS

    return parse_tolerances(atol, rtol, PRESETS[preset]) if atol or rtol else None


def _chosen(preset: Preset) -> str | None:
    """The preset the user named, or None for auto (the service picks it from what it produced)."""
    return None if preset == Preset("auto") else preset.value


@compress_app.command("half")
@model_options
def half_command(
    model: ModelArg,
    output: OutputOpt,
    dtype: Annotated[HalfPrecision, typer.Option("--dtype", help="Target dtype: fp16 or bf16 (ONNX: fp16).")]
    = HalfPrecision("fp16"),
    keep_fp32: Annotated[list[str] | None, typer.Option(
        "--keep-fp32", metavar="REGEX", show_default=False,
        help="Leave tensors whose name matches this regular expression as they are (repeatable). ONNX: nodes "
             "whose name or weight matches stay float32.")] = None,
    default_keep: Annotated[bool, typer.Option(
        "--default-keep/--no-default-keep",
        help="Also keep normalisation layers as they are: by module type (BatchNorm, LayerNorm, GroupNorm, "
             "RMSNorm, *Norm classes) when the model can be built, else by name (*norm*, ln_*, bn*).")] = True,
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
    preset: PresetOpt = Preset("auto"),
    atol: AtolOpt = None,
    rtol: RtolOpt = None,
    repeats: RepeatsOpt = 10,
    threads: ThreadsOpt = None,
    eval_text: EvalTextOpt = None,
    evaluate: EvalOpt = True,
    tokenizer: TokenizerOpt = None,
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
    --allow-overflow), the size before/after, and the drift against the original (tolerances of the fp16/bf16
    preset unless --preset/--atol/--rtol say otherwise). A causal LM (HF, or ONNX decoder with KV cache) also gets
    its perplexity before/after on --eval-text and the greedy next-token agreement (on CPU: fp16 weights computed
    in float32, as the drift check runs them).

    Example: mlops compress half tiny-bert/ -o tiny-bert-fp16/ --per-layer
    """
    from mlops_cli import render
    from mlops_cli.core.contract import ModelRef
    from mlops_cli.core.errors import ValidationFailed
    from mlops_cli.core.inputs import InputRequest
    from mlops_cli.render.compress import half_failure_hint, half_tables
    from mlops_cli.services.compress import half

    chosen = _chosen(preset)
    with progress_steps(f"compress half {model}", quiet=quiet or as_json) as on_step:
        report = half.run(ModelRef.parse(model), half.HalfOptions(threads=threads,
            load=load, output=output, force=force, on_step=on_step, dtype=dtype.value,
            keep_fp32=tuple(keep_fp32 or ()), default_keep=default_keep, allow_overflow=allow_overflow,
            keep_io_types=keep_io_types, check=check, per_layer=per_layer, device=device.value,
            inputs=InputRequest(specs=tuple(inputs or ()), seed=seed), preset=chosen,
            tolerances=_tolerances(atol, rtol, chosen or dtype.value), repeats=repeats,
            evaluation=_checked_evaluation(eval_text, evaluate, check), tokenizer=tokenizer))
    render.emit(report, as_json, half_tables, quiet)
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
    weight_only: Annotated[bool, typer.Option(
        "--weight-only", rich_help_panel="Causal LMs",
        help="ONNX decoder with KV cache: int8 weights only (ONNX Runtime's MatMulNBits, 8 bits, blocks of 32, "
             "accuracy level 4), activations in float; reports size and perplexity like `compress int4`.")] = False,
    check: CheckOpt = True,
    inputs: InputOpt = None,
    seed: SeedOpt = 0,
    preset: PresetOpt = Preset("auto"),
    atol: AtolOpt = None,
    rtol: RtolOpt = None,
    repeats: RepeatsOpt = 20,
    threads: ThreadsOpt = None,
    eval_text: EvalTextOpt = None,
    evaluate: EvalOpt = True,
    tokenizer: TokenizerOpt = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    *,
    load: "LoadOptions",
) -> None:
    """Dynamic int8 quantisation, with size, CPU latency before/after and drift reported.

    int8 weights, activations quantised per call: ONNX files through ONNX Runtime, torch models through
    torch.ao (written as a torch file of the quantised state_dict). Drift beyond the int8 preset's tolerances
    (or --preset/--atol/--rtol) fails (exit 6); the output is kept to inspect. A causal LM also gets its
    perplexity before/after on --eval-text and the greedy next-token agreement.

    --weight-only (ONNX decoders exported with `export onnx --task causal-lm`): int8 weights in MatMulNBits
    blocks, float activations, the LLM recipe (as `compress int4`, 8 bits); size and perplexity reported.

    Example: mlops compress int8 model.onnx -o model-int8.onnx --quantize-embeddings
    """
    from mlops_cli import render
    from mlops_cli.core.contract import ModelRef
    from mlops_cli.core.errors import ValidationFailed
    from mlops_cli.core.inputs import InputRequest
    from mlops_cli.render.compress import int8_failure_hint, int8_tables
    from mlops_cli.services.compress import int8

    evaluation = _checked_evaluation(eval_text, evaluate, check)
    if weight_only:
        _refuse_dynamic_options(quantize_embeddings=quantize_embeddings, per_channel=per_channel, exclude=exclude,
                                op_types=op_types, inputs=inputs, seed=seed, preset=preset, atol=atol, rtol=rtol,
                                repeats=repeats, threads=threads)
        _weight_only(model, output, tokenizer, evaluation, force, as_json, quiet, bits=8)
        return
    chosen = _chosen(preset)
    with progress_steps(f"compress int8 {model}", quiet=quiet or as_json) as on_step:
        report = int8.run(ModelRef.parse(model), int8.Int8Options(threads=threads,
            load=load, output=output, force=force, on_step=on_step, quantize_embeddings=quantize_embeddings,
            per_channel=per_channel, exclude=tuple(exclude or ()),
            op_types=tuple(op.strip() for op in op_types.split(",") if op.strip()),
            inputs=InputRequest(specs=tuple(inputs or ()), seed=seed), preset=chosen,
            tolerances=_tolerances(atol, rtol, chosen or "int8"), repeats=repeats, check=check,
            evaluation=evaluation, tokenizer=tokenizer))
    render.emit(report, as_json, int8_tables, quiet)
    if not report.passed:
        raise ValidationFailed(report.verdict, hint=int8_failure_hint(report))


@compress_app.command("int4")
def int4_command(
    model: Annotated[str, typer.Argument(
        metavar="MODEL", show_default=False,
        help="An .onnx decoder exported with its KV cache (`mlops export onnx MODEL --task causal-lm`).")],
    output: OutputOpt,
    block_size: Annotated[int, typer.Option(
        "--block-size", help="Weights per int4 scale (a power of two >= 16): smaller blocks, better quality, "
                             "larger file.")] = 32,
    symmetric: Annotated[bool, typer.Option(
        "--symmetric/--asymmetric", help="Symmetric int4 (no zero point) or with a zero point per block.")] = True,
    accuracy_level: Annotated[int, typer.Option(
        "--accuracy-level", min=0, max=4,
        help="ONNX Runtime's MatMulNBits compute type on CPU: 4 (int8 activations inside the kernel) is the "
             "fastest, at practically the same perplexity; 0: ONNX Runtime's default (float compute).")] = 4,
    tokenizer: TokenizerOpt = None,
    eval_text: EvalTextOpt = None,
    evaluate: EvalOpt = True,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Weight-only int4 of an ONNX causal-LM decoder (ONNX Runtime's MatMulNBits), with its size before/after,
    the perplexity before/after on a text, and the share of greedy next-token predictions that agree.

    The input is a decoder exported with its KV cache (`mlops export onnx MODEL --task causal-lm`).

    Example: mlops compress int4 lm.onnx -o lm-int4.onnx --block-size 32 --accuracy-level 4
    """
    _weight_only(model, output, tokenizer, evaluation_text(eval_text, evaluate), force, as_json, quiet, bits=4,
                 block_size=block_size, symmetric=symmetric, accuracy_level=accuracy_level)


def _weight_only(model: str, output: Path, tokenizer: Path | None, evaluation: "EvaluationText | None", force: bool,
                 as_json: bool, quiet: bool, bits: int, block_size: int = 32, symmetric: bool = True,
                 accuracy_level: int = 4) -> None:
    """`compress int4` and `compress int8 --weight-only`: one MatMulNBits service, 4 or 8 bits."""
    from mlops_cli import render
    from mlops_cli.core.contract import ModelRef
    from mlops_cli.render.compress import int4_tables
    from mlops_cli.services.onnx_lm import Int4Options, int4_run

    with progress_steps(f"compress int{bits} {model}", quiet=quiet or as_json) as on_step:
        options = Int4Options(output=output, force=force, on_step=on_step, bits=bits, block_size=block_size,
                              symmetric=symmetric, accuracy_level=accuracy_level, tokenizer=tokenizer,
                              evaluation=evaluation)
        report = int4_run(ModelRef.parse(model), options)
    render.emit(report, as_json, int4_tables, quiet)


def _refuse_dynamic_options(*, quantize_embeddings: bool, per_channel: bool, exclude: list[str] | None, op_types: str,
                            inputs: list[str] | None, seed: int, preset: Preset, atol: list[str] | None,
                            rtol: list[str] | None, repeats: int, threads: int | None) -> None:
    """Options of dynamic int8 and of its drift check that mean nothing to --weight-only (no drift check: the
    perplexity is the check, as for `compress int4`): refused rather than silently dropped."""
    from mlops_cli.core.errors import UsageError

    given = [name for name, used in (("--quantize-embeddings", quantize_embeddings), ("--per-tensor", not per_channel),
                                     ("--exclude", bool(exclude)),
                                     ("--op-types", op_types != "MatMul,Gemm,Attention,LSTM"),
                                     ("--input", bool(inputs)), ("--seed", seed != 0),
                                     ("--preset", preset.value != "auto"), ("--atol", bool(atol)),
                                     ("--rtol", bool(rtol)), ("--repeats", repeats != 20),
                                     ("--threads", threads is not None)) if used]
    if given:
        raise UsageError(f"{', '.join(given)}: dynamic int8 and drift-check options, not for --weight-only",
                         hint="--weight-only quantises every MatMul weight of the decoder in blocks and checks it by "
                              "its perplexity (like `compress int4`); drop them.")


def _checked_evaluation(eval_text: Path | None, evaluate: bool, check: bool) -> "EvaluationText | None":
    """The evaluation text, or None when --no-check (it skips the perplexity too); --no-check with --eval-text
    contradict each other (exit 2) rather than the text being read and not used."""
    from mlops_cli.core.errors import UsageError

    if not check and eval_text is not None:
        raise UsageError("--eval-text and --no-check contradict each other (--no-check skips the perplexity too)",
                         hint="Drop one of them.")
    return evaluation_text(eval_text, evaluate) if check else None


def register(app: typer.Typer) -> None:
    app.add_typer(compress_app, name="compress")
