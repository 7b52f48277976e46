"""`mlops verify-parity REFERENCE CANDIDATE`: do two runnable models compute the same thing?

Any two model references work: PyTorch vs ONNX Runtime, vs TorchScript or .pt2, vs a compressed or
pruned checkpoint, ONNX vs ONNX. Inputs come from the models (several shape sets: batch 1 and >1, short
and long padded sequences), from `--input` specs, or from a file of real inputs; the comparison itself
is the shared parity engine (`services/parity.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mlops_cli.core.errors import UsageError
from mlops_cli.core.inputs import InputSet
from mlops_cli.core.loading import LoadedModel, LoadOptions, ModelKind
from mlops_cli.core.parity import ParityReport, Tolerances


@dataclass(frozen=True)
class VerifySettings:
    """The options of `verify-parity`."""

    inputs: tuple[str, ...] = ()  # --input specs
    inputs_file: str | None = None  # --inputs FILE (npz/safetensors) of real inputs
    texts: tuple[str, ...] = ()  # --text: real texts, tokenized with a side's tokenizer
    samples: int = 1  # random draws per shape set
    seed: int = 0
    tolerances: Tolerances = field(default_factory=Tolerances)
    preset: str = "fp32"
    include_padding: bool = False
    device: str = "auto"
    repeats: int = 10  # 0 skips timing, like timing=False
    timing: bool = True
    load: LoadOptions = field(default_factory=LoadOptions)


@dataclass(frozen=True)
class VerifyParityReport:
    reference: str
    candidate: str
    preset: str
    input_source: str  # where the inputs came from
    input_sets: int
    parity: ParityReport
    passed: bool
    verdict: str
    worst_output: str | None  # the output (and input set) furthest from passing, named for CI logs
    hint: str | None = None  # what to do about a failure


def verify_parity(reference: str, candidate: str, settings: VerifySettings) -> VerifyParityReport:
    """Load both sides, build the input sets, and run the parity engine."""
    from mlops_cli.core.loading import load_model
    from mlops_cli.core.parity import check_parity
    from mlops_cli.core.runtimes import device_for, runner_for

    if settings.samples < 1:
        raise UsageError("--samples must be at least 1")
    if settings.repeats < 0:
        raise UsageError("--repeats must be 0 (no timing) or more")
    if sum(map(bool, (settings.inputs_file, settings.inputs, settings.texts))) > 1:
        raise UsageError("--inputs FILE, --input specs and --text cannot be combined", hint="Use one of them.")
    ref_model = load_model(reference, settings.load)
    cand_model = load_model(candidate, settings.load)
    input_sets, source = build_input_sets(ref_model, cand_model, settings)
    ref_runner = runner_for(ref_model, device_for(ref_model, settings.device))
    cand_runner = runner_for(cand_model, device_for(cand_model, settings.device))
    report = check_parity(ref_runner, cand_runner, input_sets,
                          settings.tolerances, include_masked=settings.include_padding,
                          time_runs=settings.timing and settings.repeats > 0, repeats=settings.repeats)
    return VerifyParityReport(reference, candidate, settings.preset, source, len(input_sets), report, report.passed,
                              report.verdict, None if report.passed else worst_output(report), failure_hint(report))


def failure_hint(report: ParityReport) -> str | None:
    """Tolerances only help when the outputs are close; structural failures need the candidate fixed."""
    if report.passed:
        return None
    structural = any(s.error for s in report.shapes) or any(d.problem for s in report.shapes for d in s.outputs)
    if structural:
        return ("The candidate does not behave like the reference (see the failing rows): fix or re-export it; "
                "no tolerance makes this pass.")
    return ("If the difference is expected (fp16/bf16/int8 candidates), use --preset or --atol/--rtol; "
            "the 'min atol' column shows what would pass.")


def build_input_sets(ref_model: LoadedModel, cand_model: LoadedModel,
                     settings: VerifySettings) -> tuple[list[InputSet], str]:
    """Real inputs from a file, or `samples` random draws of every shape set of the model's inputs."""
    from mlops_cli.core.inputs import from_texts, load_inputs_file, model_shape_sets

    if settings.inputs_file:
        return [load_inputs_file(settings.inputs_file)], f"file {Path(settings.inputs_file).name}"
    if settings.texts:
        side = next((m for m in (ref_model, cand_model) if m.tokenizer is not None), ref_model)
        return [from_texts(side, list(settings.texts))], f"{len(settings.texts)} text(s), tokenizer of {side.reference}"
    # Specs and vocabulary from a PyTorch side when there is one: it knows its config and tokenizer.
    source_model = cand_model if ref_model.kind == ModelKind.ONNX and cand_model.kind != ModelKind.ONNX \
        else ref_model
    explicit = list(settings.inputs) or None
    sets: list[InputSet] = []
    for sample in range(settings.samples):
        drawn = model_shape_sets(source_model, explicit, seed=settings.seed + 1000 * sample)
        for input_set in drawn:
            label = input_set.label if settings.samples == 1 else f"{input_set.label} #{sample + 1}"
            sets.append(InputSet(label, input_set.tensors, input_set.sizes))
    origin = "--input specs" if explicit else f"shapes of {source_model.reference}"
    return sets, f"{origin}, {settings.samples} random draw(s), seed {settings.seed}"


def worst_output(report: ParityReport) -> str | None:
    """`logits at batch=3,sequence=8` for the failing output furthest from its tolerance."""
    worst: tuple[float, str] | None = None
    for shape in report.shapes:
        if shape.error and not shape.outputs:
            return f"(all outputs) at {shape.label}"
        for diff in shape.outputs:
            if diff.passed:
                continue
            score = float("inf") if diff.problem or diff.min_atol_to_pass is None else diff.min_atol_to_pass / \
                max(diff.atol, 1e-30)
            if worst is None or score > worst[0]:
                worst = (score, f"{diff.name} at {shape.label}")
    if worst is None:
        failing = next((s for s in report.shapes if not s.passed), None)
        return f"(all outputs) at {failing.label}" if failing else None
    return worst[1]
