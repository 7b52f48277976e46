"""`mlops export onnx MODEL -o model.onnx`.

No `from __future__ import annotations`: `@model_options` rebuilds the signature and typer must see the
Annotated option types as objects, not strings.
"""

from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from mlops_cli.commands.common import (
    AtolOpt,
    BatchSizeOpt,
    Device,
    DeviceOpt,
    ForceOpt,
    IncludePaddingOpt,
    InputOpt,
    JsonOpt,
    ModelArg,
    OutputOpt,
    Preset,
    QuietOpt,
    RepeatsOpt,
    RtolOpt,
    SeedOpt,
    SeqLenOpt,
    WeightPrecision,
    model_options,
    parse_tolerances,
    progress_steps,
)
from mlops_cli.commands.export import export_app

if TYPE_CHECKING:
    from mlops_cli.core.loading import LoadOptions


PLAIN_OPSET = 20  # the plain graph's default opset (the KV-cache export's is 17)


class Exporter(str, Enum):
    auto = "auto"
    dynamo = "dynamo"
    legacy = "legacy"


class LmEngine(str, Enum):
    auto = "auto"
    torch = "torch"
    genai = "genai"


class Optimize(str, Enum):
    auto = "auto"
    none = "none"
    fusion = "fusion"
    slim = "slim"
    ort = "ort"
    all = "all"


@model_options
def export_onnx_command(
    model: ModelArg,
    output: OutputOpt,
    opset: Annotated[int | None, typer.Option(
        "--opset", show_default=False,
        help="ONNX opset: 20 (default), 18-21 (legacy: <= 20); the KV-cache export: 17 (default) or lower.")
    ] = None,
    static: Annotated[bool, typer.Option("--static", help="Fix every dim to the example's shape.")] = False,
    exporter: Annotated[Exporter, typer.Option(
        "--exporter", help="dynamo (torch.export), legacy (TorchScript tracing), or auto: for Hugging Face "
                           "models legacy (fast, and the graph ONNX Runtime fuses), then dynamo if its graph does "
                           "not verify; for other models dynamo, then legacy if it fails (the reason is shown).")
    ] = Exporter.auto,
    external_data: Annotated[bool, typer.Option(
        "--external-data", help="Write the weights to MODEL.onnx.data beside the graph (automatic above 1.5 GiB).")
    ] = False,
    verify: Annotated[bool, typer.Option(
        "--verify/--no-verify", help="Verify the export against the model at several shapes (exit 6 on mismatch).")
    ] = True,
    optimize: Annotated[Optimize, typer.Option(
        "--optimize", help="Graph optimisation; each pass is re-verified and timed against the graph before it "
                           "(one thread, on the export example), and kept only if the outputs still match AND it "
                           "is faster. fusion: ONNX Runtime's transformer fusions (BERT-, GPT-2-, ViT-like models); "
                           "slim: onnxslim (portable); ort: ONNX Runtime offline, extended; all: the three; auto: "
                           "fusion where the model type is known, else nothing; a pass measured no faster for the "
                           "same architecture on this machine is remembered, not rerun (needs ONNX Runtime to run).")
    ] = Optimize.auto,
    inputs: InputOpt = None,
    batch_size: BatchSizeOpt = None,
    seq_len: SeqLenOpt = None,
    seed: SeedOpt = 0,
    atol: AtolOpt = None,
    rtol: RtolOpt = None,
    preset: Annotated[Preset, typer.Option(
        "--preset", help="Tolerances of the verification: auto and fp32 (an export computes in float32) scale atol "
                         "with each output's magnitude and add cosine/top-1 criteria; fp16, bf16, int8 for "
                         "half or quantised models; --atol/--rtol override them.")] = Preset("auto"),
    include_padding: IncludePaddingOpt = False,
    device: DeviceOpt = Device.auto,
    repeats: RepeatsOpt = 0,
    keep_metadata: Annotated[bool, typer.Option(
        "--keep-metadata", help="Keep the dynamo exporter's per-node debugging metadata (source stack traces with "
                                "local paths, module names): about twice the file size.")] = False,
    kv_cache: Annotated[bool, typer.Option(
        "--kv-cache/--no-kv-cache", rich_help_panel="Causal LMs (--task causal-lm)",
        help="A causal LM (an HF decoder-only LM, or the built-in tiny-gpt2 and tiny-llama) is exported with its "
             "KV cache by default, as with --task causal-lm; --no-kv-cache exports the plain graph instead (logits "
             "for the whole sequence, re-run for every generated token), also for an encoder-decoder LM exported to "
             "a folder. No effect on other models.")] = True,
    engine: Annotated[LmEngine, typer.Option(
        "--engine", rich_help_panel="Causal LMs (--task causal-lm)",
        help="torch: our KV-cache export, one .onnx file; genai: ONNX Runtime GenAI's model builder, a folder "
             "(model.onnx, genai_config.json, tokenizer) for Llama, Mistral, Qwen, Phi, Gemma... families; auto: "
             "genai when -o names a folder, the family is supported and the build verifies (it decodes faster), "
             "else torch. The report says which ran and why.")] = LmEngine.auto,
    precision: Annotated[WeightPrecision, typer.Option(
        "--precision", rich_help_panel="Causal LMs (--task causal-lm)",
        help="Weights of a genai build: fp32, or the builder's weight-only int8/int4 (CPU). For a .onnx file use "
             "`mlops compress int4`.")] = WeightPrecision("fp32"),
    force: ForceOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    *,
    load: "LoadOptions",
) -> None:
    """Export a model to ONNX with named inputs/outputs and dynamic batch/sequence dims, run onnx.checker, and
    verify the file with ONNX Runtime at shapes other than the example's. Exit 6 (file kept) when it does not match.

    A causal LM (an HF decoder-only LM, or any model with --task causal-lm; --no-kv-cache: the plain graph) is
    exported as a decoder with its KV cache (inputs past_key_values.N.key/value, outputs logits and
    present.N.key/value, dynamic batch/sequence/past dims, Optimum's names): one file for the prompt and every next
    token, run at other sizes (the empty past included) and compared with the model before it is written (opset at
    most 17). Then `mlops generate model.onnx --tokenizer MODEL` and
    `mlops verify-parity MODEL model.onnx --generate`. --engine genai writes ONNX Runtime GenAI's folder instead
    (its model builder; model.onnx, genai_config.json, tokenizer), verified the same way; --engine auto (default)
    does so when -o names a folder and the builder supports the family.

    With --task seq2seq-lm (the default for an encoder-decoder LM such as T5, BART or Marian when -o names a
    folder, not a .onnx file) OUTPUT is a folder in Optimum's layout: encoder_model.onnx, decoder_model.onnx (first
    pass) and decoder_with_past_model.onnx (past_key_values.N.decoder/encoder.key/value), with the config and
    tokenizer, each graph checked against the model at several sizes; `mlops generate FOLDER` runs it.

    Example: mlops export onnx builtin:tiny-bert -o bert.onnx --optimize all --json
    """
    from mlops_cli import render
    from mlops_cli.core.compare import PRESETS
    from mlops_cli.core.contract import ModelRef
    from mlops_cli.core.errors import UsageError, ValidationFailed
    from mlops_cli.core.inputs import InputRequest
    from mlops_cli.render.export_onnx import export_onnx_tables
    from mlops_cli.services.export_onnx import ExportOnnxOptions, run

    seq2seq = kv_cache and (load.task == "seq2seq-lm" or (load.task is None and output.suffix != ".onnx"
                                                          and _is_seq2seq_lm(model)))
    causal = kv_cache and (load.task == "causal-lm" or (load.task is None and _is_causal_lm(model)))
    if causal or seq2seq:
        ignored = [name for name, value, default in (
            ("--static", static, False), ("--exporter", exporter, Exporter.auto), ("--no-verify", verify, True),
            ("--optimize", optimize, Optimize.auto), ("--input", inputs, None), ("--batch-size", batch_size, None),
            ("--seq-len", seq_len, None), ("--atol", atol, None), ("--rtol", rtol, None),
            ("--preset", preset.value, "auto"), ("--include-padding", include_padding, False),
            ("--repeats", repeats, 0), ("--keep-metadata", keep_metadata, False), ("--device", device, Device.auto),
            ("--seed", seed, 0)) if value != default]
        task = "seq2seq-lm" if seq2seq else "causal-lm"
        if ignored:
            raise UsageError(f"{', '.join(ignored)} do(es) not apply to --task {task} (the KV-cache export is "
                             "traced on the CPU and checked against the model at its own sizes)",
                             hint="Drop them" + ("." if seq2seq else ", or add --no-kv-cache for the plain graph."))
        _check_lm_opset(opset, engine)
        if seq2seq:
            if engine != LmEngine.auto or precision.value != "fp32":
                raise UsageError("--engine and --precision apply to --task causal-lm",
                                 hint="An encoder-decoder is exported by the torch exporter, in fp32.")
            _export_seq2seq(model, output, force, opset, external_data, load, as_json, quiet)
        else:
            _export_lm(model, output, force, opset, external_data, engine, precision.value, load, as_json, quiet)
        return
    if engine != LmEngine.auto or precision.value != "fp32":
        raise UsageError("--engine and --precision apply to the KV-cache export of a causal LM",
                         hint="Drop them, or drop --no-kv-cache." if not kv_cache else
                         "Drop them (add --task causal-lm if the model is a causal LM).")
    opset = PLAIN_OPSET if opset is None else opset
    tolerances = parse_tolerances(atol, rtol, PRESETS["fp32" if preset.value == "auto" else preset.value])
    request = InputRequest(specs=tuple(inputs or ()), batch_size=batch_size, seq_len=seq_len, seed=seed)
    with progress_steps(f"exporting {model} to ONNX", quiet) as on_step:
        options = ExportOnnxOptions(
            load=load, on_step=on_step, output=output, force=force, inputs=request, opset=opset, static=static,
            exporter=exporter.value, external_data=external_data, verify=verify, optimize=optimize.value,
            tolerances=tolerances, include_padding=include_padding, device=device.value, repeats=repeats,
            keep_metadata=keep_metadata)
        report = run(ModelRef.parse(model), options)
    render.emit(report, as_json, export_onnx_tables, quiet)
    if not report.passed:
        raise ValidationFailed(report.verdict, hint=f"{report.output} was kept for inspection.")


def _check_lm_opset(opset: int | None, engine: LmEngine) -> None:
    """The KV-cache exports trace with the legacy exporter at opset 17 at most; the genai builder picks its own."""
    from mlops_cli.core.errors import UsageError
    from mlops_cli.services.onnx_lm.export_with_past import DEFAULT_OPSET

    if opset is not None and opset > DEFAULT_OPSET:
        raise UsageError(f"--opset {opset}: the KV-cache export takes opset {DEFAULT_OPSET} at most",
                         hint=f"Use --opset {DEFAULT_OPSET} or lower (the default), or --no-kv-cache for the plain "
                              "graph.")
    if engine == LmEngine.genai and opset is not None:
        raise UsageError("--opset applies to --engine torch: the genai builder picks its own opset",
                         hint="Drop --opset, or use --engine torch.")


def _export_lm(model: str, output: Path, force: bool, opset: int | None, external_data: bool, engine: LmEngine,
               precision: str, load: "LoadOptions", as_json: bool, quiet: bool) -> None:
    """`--task causal-lm`: the decoder with its KV cache (torch), or ONNX Runtime GenAI's folder (genai)."""
    from mlops_cli import render
    from mlops_cli.core.contract import ModelRef
    from mlops_cli.core.errors import UsageError, ValidationFailed
    from mlops_cli.render.export_onnx import export_with_past_tables
    from mlops_cli.render.genai import genai_export_tables
    from mlops_cli.services.onnx_lm import ExportWithPastOptions, ExportWithPastReport, export_run
    from mlops_cli.services.onnx_lm.export_with_past import DEFAULT_OPSET
    from mlops_cli.services.onnx_lm.genai_export import GenaiExportOptions, GenaiExportReport, run_auto
    from mlops_cli.services.onnx_lm.genai_export import run as genai_run

    if engine == LmEngine.genai and external_data:
        raise UsageError("--external-data applies to --engine torch: the genai builder writes model.onnx.data "
                         "itself", hint="Drop --external-data, or use --engine torch.")
    if engine == LmEngine.torch and precision != "fp32":
        raise UsageError(f"--precision {precision} is the genai builder's; --engine torch exports fp32",
                         hint="Use --engine genai, or quantise the .onnx file with `mlops compress int4`.")
    ref = ModelRef.parse(model)
    with progress_steps(f"exporting {model} to ONNX with its KV cache", quiet) as on_step:
        torch_options = ExportWithPastOptions(load=load, on_step=on_step, output=output, force=force,
                                              opset=DEFAULT_OPSET if opset is None else opset,
                                              external_data=external_data or None)
        genai_options = GenaiExportOptions(load=load, on_step=on_step, output=output, force=force,
                                           precision=precision)
        report: GenaiExportReport | ExportWithPastReport
        if engine == LmEngine.torch:
            report = export_run(ref, torch_options)
        else:
            torch_only = tuple(name for name, given in (("--opset", opset is not None),
                                                        ("--external-data", external_data)) if given)
            report = genai_run(ref, genai_options) if engine == LmEngine.genai else run_auto(
                ref, genai_options, torch_options, torch_only=torch_only)
    if not isinstance(report, GenaiExportReport):
        render.emit(report, as_json, export_with_past_tables, quiet)
        return
    render.emit(report, as_json, genai_export_tables, quiet)
    if not report.passed:
        raise ValidationFailed(f"the genai build does not match the model: {report.verdict}",
                               hint=f"{report.output} was kept for inspection; --engine torch exports the model "
                                    "with our exporter.")


def _is_causal_lm(model: str) -> bool:
    from mlops_cli.core.contract import ModelRef
    from mlops_cli.core.loading import is_causal_lm

    return is_causal_lm(ModelRef.parse(model))


def _is_seq2seq_lm(model: str) -> bool:
    from mlops_cli.core.contract import ModelRef
    from mlops_cli.core.loading import is_seq2seq_lm_folder

    return is_seq2seq_lm_folder(ModelRef.parse(model).path)


def _export_seq2seq(model: str, output: Path, force: bool, opset: int | None, external_data: bool,
                    load: "LoadOptions",
                    as_json: bool, quiet: bool) -> None:
    """`--task seq2seq-lm` (or an encoder-decoder LM exported to a folder): Optimum's encoder + decoders layout."""
    from mlops_cli import render
    from mlops_cli.core.contract import ModelRef
    from mlops_cli.render.seq2seq_export import seq2seq_export_tables
    from mlops_cli.services.onnx_lm import Seq2SeqExportOptions, seq2seq_export_run
    from mlops_cli.services.onnx_lm.export_with_past import DEFAULT_OPSET

    with progress_steps(f"exporting {model} to ONNX (encoder, decoders with KV cache)", quiet) as on_step:
        options = Seq2SeqExportOptions(load=load, on_step=on_step, output=output, force=force,
                                       opset=DEFAULT_OPSET if opset is None else opset,
                                       external_data=external_data or None)
        report = seq2seq_export_run(ModelRef.parse(model), options)
    render.emit(report, as_json, seq2seq_export_tables, quiet)


def register(app: typer.Typer) -> None:
    export_app.command("onnx")(export_onnx_command)
