"""`mlops verify-parity REFERENCE CANDIDATE`.

No `from __future__ import annotations`: `@model_options` rebuilds the signature and typer must see the
Annotated option types as objects, not strings.
"""

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from mlops_cli.commands.common import (
    AtolOpt,
    BatchSizeOpt,
    Device,
    DeviceOpt,
    EvalOpt,
    EvalTextOpt,
    IncludePaddingOpt,
    InputOpt,
    JsonOpt,
    Preset,
    PresetOpt,
    QuietOpt,
    RepeatsOpt,
    RtolOpt,
    SeedOpt,
    SeqLenOpt,
    TextOpt,
    ThreadsOpt,
    evaluation_text,
    model_options,
    progress_steps,
)

if TYPE_CHECKING:
    from mlops_cli.core.loading import LoadOptions
    from mlops_cli.core.parity import ToleranceRequest
    from mlops_cli.services.perplexity import EvaluationText

__all__ = ["IncludePaddingOpt", "Preset", "PresetOpt", "RepeatsOpt", "register"]  # still imported from here

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
    batch_size: BatchSizeOpt = None,
    seq_len: SeqLenOpt = None,
    samples: Annotated[int, typer.Option("--samples", min=1, help="Random draws of every shape set.")] = 1,
    seed: SeedOpt = 0,
    atol: AtolOpt = None,
    rtol: RtolOpt = None,
    preset: PresetOpt = Preset.auto,  # type: ignore[attr-defined]
    include_padding: IncludePaddingOpt = False,
    device: DeviceOpt = Device.auto,
    repeats: RepeatsOpt = 10,
    threads: ThreadsOpt = None,
    timing: Annotated[bool, typer.Option(
        "--timing/--no-timing", help="Time both sides on every input set (--no-timing is --repeats 0).")] = True,
    generate: Annotated[bool, typer.Option(
        "--generate", rich_help_panel="Causal LMs",
        help="REFERENCE an HF causal LM, CANDIDATE its ONNX export with KV cache (or its ONNX Runtime GenAI folder, "
             "run by that runtime; or an encoder-decoder LM and its exported folder): greedy generation from several "
             "prompts on both, tokens compared (the first divergence named: prompt, step, both tokens, their logit "
             "gap), and the logits of the prompt pass and of every cached step.")] = False,
    prompts: Annotated[list[str] | None, typer.Option(
        "--prompt", "-p", rich_help_panel="Causal LMs", show_default=False,
        help="A prompt for --generate (repeatable; default: a few built-in prompts).")] = None,
    prompts_file: Annotated[Path | None, typer.Option(
        "--prompts", rich_help_panel="Causal LMs", show_default=False,
        help="A file of prompts for --generate, one per line.")] = None,
    max_new_tokens: Annotated[int, typer.Option(
        "--max-new-tokens", rich_help_panel="Causal LMs", min=1, help="Greedy tokens per prompt for --generate.")] = 16,
    eval_text: EvalTextOpt = None,
    evaluate: EvalOpt = True,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    *,
    load: "LoadOptions",
) -> None:
    """Check that CANDIDATE computes what REFERENCE computes (PyTorch, TorchScript, .pt2, ONNX Runtime; any pair)
    on several shapes: your sizes (--batch-size/--seq-len or the --input dims) first, then batch 1 with a shorter
    sequence and a larger batch with a longer one. The preset (auto: from the models' precision: fp16/bf16
    weights, int8 layers, else fp32) scales atol with each output's magnitude and adds criteria: cosine, top-1
    and greedy next-token agreement of logits, each shown with its threshold; --atol/--rtol are used as given.
    Latency of both sides. Exit 6 on mismatch, NaN/inf or a non-deterministic side, naming the worst output and
    the failing criterion. Loading options apply to both sides. When both are causal LMs (HF, or ONNX decoders
    with KV cache), the perplexity of both on --eval-text and their greedy next-token agreement are reported too.
    A decoder with a KV cache is compared with --generate (without it: exit 2).

    Example: mlops verify-parity builtin:tiny-bert bert.onnx --atol logits=1e-4 --json
    """
    from mlops_cli import render
    from mlops_cli.core.contract import ModelRef
    from mlops_cli.core.errors import ValidationFailed
    from mlops_cli.core.inputs import InputRequest
    from mlops_cli.core.parity import ToleranceRequest
    from mlops_cli.render.parity import verify_parity_tables
    from mlops_cli.services.verify_parity import VerifyOptions, run

    if generate:
        _verify_generation(reference, candidate, prompts, prompts_file, max_new_tokens,
                           ToleranceRequest.parse(atol, rtol, preset.value), load, as_json, quiet,
                           evaluation_text(eval_text, evaluate))
        return
    request = InputRequest(specs=tuple(inputs or ()), texts=tuple(texts or ()),
                           file=str(inputs_file) if inputs_file else None, batch_size=batch_size, seq_len=seq_len,
                           samples=samples, seed=seed)
    with progress_steps(f"comparing {candidate} with {reference}", quiet=quiet) as on_step:
        options = VerifyOptions(threads=threads,
            candidate=ModelRef.parse(candidate), inputs=request,
            tolerances=ToleranceRequest.parse(atol, rtol, preset.value),
            include_padding=include_padding, device=device.value, repeats=repeats if timing else 0, load=load,
            on_step=on_step, evaluation=evaluation_text(eval_text, evaluate))
        report = run(ModelRef.parse(reference), options)
    render.emit(report, as_json, verify_parity_tables, quiet)
    if not report.passed:
        worst = f" (worst: {report.worst_output})" if report.worst_output else ""
        raise ValidationFailed(f"parity check failed{worst}: {report.verdict}", hint=report.hint)


def _verify_generation(reference: str, candidate: str, prompts: list[str] | None, prompts_file: Path | None,
                       max_new_tokens: int, tolerances: "ToleranceRequest", load: "LoadOptions", as_json: bool,
                       quiet: bool, evaluation: "EvaluationText | None") -> None:
    """`--generate`: greedy generation of an HF causal LM against its ONNX export with KV cache."""
    from mlops_cli import render
    from mlops_cli.core.contract import ModelRef
    from mlops_cli.core.errors import UsageError, ValidationFailed
    from mlops_cli.core.precision import onnx_precision
    from mlops_cli.render.parity import generation_parity_tables
    from mlops_cli.services.generate import read_prompts
    from mlops_cli.services.onnx_lm import GenerationParityOptions, parity_run
    from mlops_cli.services.onnx_lm.genai import looks_like_genai_folder, read_genai_folder
    from mlops_cli.services.onnx_lm.genai_parity import genai_parity_run
    from mlops_cli.services.onnx_lm.quality import DEFAULT_PROMPTS

    chosen = tuple(prompts or ()) + (read_prompts(prompts_file) if prompts_file else ()) or DEFAULT_PROMPTS
    from mlops_cli.services.onnx_lm.seq2seq_export import DECODER_FILE
    from mlops_cli.services.onnx_lm.seq2seq_generate import is_seq2seq_folder

    candidate_ref = ModelRef.parse(candidate)
    genai = looks_like_genai_folder(candidate_ref.path)  # ONNX Runtime GenAI's folder: run by its runtime
    seq2seq = is_seq2seq_folder(candidate_ref.path)  # an encoder-decoder exported with --task seq2seq-lm
    if candidate_ref.path is None or not (genai or seq2seq or candidate_ref.path.is_file()):
        raise UsageError("--generate compares with an ONNX file exported with --task causal-lm, a genai folder, or "
                         "a folder exported with --task seq2seq-lm",
                         hint="mlops export onnx MODEL --task causal-lm -o lm.onnx (seq2seq: -o FOLDER)")
    if genai:
        graph = read_genai_folder(candidate_ref.path).model_file
    else:
        graph = candidate_ref.path / DECODER_FILE if seq2seq else candidate_ref.path
    precision, described = ((tolerances.preset, tolerances.preset) if tolerances.preset != "auto"
                            else onnx_precision(graph))
    with progress_steps(f"generating with {reference} and {candidate}", quiet=quiet) as on_step:
        options = GenerationParityOptions(
            load=load, on_step=on_step, candidate=candidate_ref.path, max_new_tokens=max_new_tokens,
            tolerances=tolerances.resolve(precision), prompts=chosen, evaluation=evaluation)
        report = (genai_parity_run if genai else parity_run)(ModelRef.parse(reference), options)
    render.emit(report, as_json, generation_parity_tables, quiet)
    if not report.passed:
        hint = ("An fp32 export must generate what the model generates: re-export it." if precision == "fp32" else
                f"Some drift is expected of this candidate ({described}): --preset or --atol/--rtol set how "
                "much.")
        raise ValidationFailed(f"generation parity failed: {report.verdict}", hint=hint)


def register(app: typer.Typer) -> None:
    app.command("verify-parity")(verify_parity_command)
