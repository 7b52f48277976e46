"""`mlops verify-parity REFERENCE CANDIDATE`: do two runnable models compute the same thing?

Any two model references work: PyTorch vs ONNX Runtime, vs TorchScript or .pt2, vs a compressed or
pruned checkpoint, ONNX vs ONNX. Inputs come from one input plan (several shape sets, the user's sizes
first), from `--input` specs, real texts, or a file of real inputs; the comparison itself is the shared
parity engine (`core/parity.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mlops_cli.core.contract import ModelRef, Report, ServiceOptions
from mlops_cli.core.errors import UsageError
from mlops_cli.core.inputs import InputPlan, InputRequest
from mlops_cli.core.loading import LoadedModel, ModelKind
from mlops_cli.core.parity import ParityReport, ToleranceRequest, Tolerances
from mlops_cli.services.perplexity import EvaluationText, PerplexityComparison


@dataclass(frozen=True, kw_only=True)
class VerifyOptions(ServiceOptions):
    """The options of `verify-parity`; the reference is the MODEL given to `run`."""

    candidate: ModelRef
    inputs: InputRequest = field(default_factory=InputRequest)
    tolerances: ToleranceRequest = field(default_factory=ToleranceRequest)  # --preset (auto), --atol, --rtol
    include_padding: bool = False
    device: str = "auto"
    repeats: int = 10  # 0 skips timing
    evaluation: EvaluationText | None = field(default_factory=EvaluationText)  # two causal LMs; None: skip


@dataclass(frozen=True, kw_only=True)
class VerifyParityReport(Report):
    reference: str
    candidate: str
    preset: str  # the precision preset applied (resolved from the models for auto)
    preset_source: str  # why: "auto: <candidate> has float16 weights", "--preset"
    tolerances: str  # what the verdict checked, in words
    input_source: str  # where the inputs came from
    input_sets: int
    parity: ParityReport
    passed: bool
    verdict: str
    worst_output: str | None  # the output (and input set) furthest from passing, named for CI logs
    hint: str | None = None  # what to do about a failure
    perplexity: PerplexityComparison | None = None  # both sides causal LMs: the candidate's perplexity change


def run(ref: ModelRef, options: VerifyOptions) -> VerifyParityReport:
    """Load both sides, plan the inputs once, and run the parity engine."""
    from mlops_cli.core.loading import load_model, placement_for
    from mlops_cli.core.parity import check_parity
    from mlops_cli.core.runtimes import device_for, runner_for, use_threads

    if options.repeats < 0:
        raise UsageError("--repeats must be 0 (no timing) or more")
    use_threads(options.threads)
    if options.evaluation is not None:
        options.evaluation.read()  # a bad --eval-text fails before any model is loaded
    options.on_step("loading both models")
    ref_model = load_model(ref, options.load)
    cand_model = load_model(options.candidate, placement_for(options.candidate, options.load))
    refuse_kv_decoders(ref_model, cand_model, options.inputs)
    plan = plan_for(ref_model, cand_model, options.inputs)
    preset, preset_source = choose_preset(options.tolerances, ref_model, cand_model)
    tolerances = options.tolerances.resolve(preset)
    ref_runner = runner_for(ref_model, device_for(ref_model, options.device))
    cand_runner = runner_for(cand_model, device_for(cand_model, options.device))
    options.on_step("comparing")
    report = check_parity(ref_runner, cand_runner, list(plan.sets), tolerances,
                          include_masked=options.include_padding, time_runs=options.repeats > 0,
                          repeats=options.repeats)
    perplexity, unmeasured = compare_perplexity(ref_model, cand_model, options)
    return VerifyParityReport(
        reference=str(ref), candidate=str(options.candidate), preset=preset, preset_source=preset_source,
        tolerances=describe_tolerances(tolerances), input_source=plan.source,
        input_sets=len(plan.sets), parity=report, passed=report.passed, verdict=report.verdict,
        worst_output=None if report.passed else worst_output(report), hint=failure_hint(report),
        warnings=tuple(dict.fromkeys((*ref_model.warnings, *cand_model.warnings,  # two placed sides: said once
                                      *([unmeasured] if unmeasured else [])))),
        perplexity=perplexity)


def refuse_kv_decoders(ref_model: LoadedModel, cand_model: LoadedModel, request: InputRequest) -> None:
    """A decoder with a KV cache cannot be driven by planned inputs (its attention mask must cover the past and
    the new tokens; ONNX Runtime fails in Gather or the sides take different inputs): it is compared by
    generation, `--generate`. Inputs the user gives (--input, --inputs-file) are used as given."""
    from mlops_cli.services.perplexity import is_kv_decoder

    decoder = next((m for m in (cand_model, ref_model) if is_kv_decoder(m)), None)
    if decoder is None or request.specs or request.file:
        return
    raise UsageError(f"{decoder.reference} is a decoder with a KV cache: generated inputs cannot drive it (its "
                     "attention mask must cover the past and the new tokens)",
                     hint="Compare generation instead: mlops verify-parity HF_FOLDER MODEL.onnx --generate (greedy "
                          "tokens, the logits of every cached pass, and perplexity).")


def compare_perplexity(ref_model: LoadedModel, cand_model: LoadedModel, options: VerifyOptions
                       ) -> tuple[PerplexityComparison | None, str | None]:
    """Two causal LMs (PyTorch or ONNX decoders with a KV cache) scored on the evaluation text (services/
    perplexity.py); (None, why not) when there is no tokenizer; nothing for other models."""
    from mlops_cli.services.perplexity import is_causal_lm, probe_for

    if options.evaluation is None or not is_causal_lm(cand_model):
        return None, None
    probe, unmeasured = probe_for(options.evaluation, ref_model, cand_model, on_step=options.on_step)
    return (probe.compare(cand_model) if probe is not None else None), unmeasured


def choose_preset(request: ToleranceRequest, ref_model: LoadedModel, cand_model: LoadedModel) -> tuple[str, str]:
    """The preset asked for, or for auto the one the models' precision calls for (the candidate's first)."""
    from mlops_cli.core.precision import auto_precision

    if request.preset != "auto":
        return request.preset, "--preset"
    return auto_precision(cand_model, ref_model)


def describe_tolerances(tolerances: Tolerances) -> str:
    """`|diff| <= max(atol 1e-4, 5e-5 x max|ref|) + rtol 1e-3 x |ref|; cosine >= 0.99999; ...` in one line."""
    overrides = f"; per output: {', '.join(tolerances.per_output)}" if tolerances.per_output else ""
    agreement = tolerances.agreement
    if agreement is None:
        return (f"|diff| <= atol {tolerances.atol:g} + rtol {tolerances.rtol:g} x |ref| (as given, no other "
                f"criteria){overrides}")
    return (f"|diff| <= max(atol {tolerances.atol:g}, {agreement.scale:g} x max|ref|) + rtol {tolerances.rtol:g} x "
            f"|ref|; cosine >= {agreement.cosine:g}; top-1 and next-token agreement >= {agreement.top1:.0%} "
            f"(logits){overrides}")


def plan_for(ref_model: LoadedModel, cand_model: LoadedModel, request: InputRequest) -> InputPlan:
    """One input plan for both sides, from the side that knows most: for texts the side with a tokenizer,
    else a PyTorch side (it knows its config and vocabulary; an ONNX graph only its input names)."""
    from mlops_cli.core.inputs import plan_inputs

    if request.texts:
        side = next((m for m in (ref_model, cand_model) if m.tokenizer is not None), ref_model)
    elif ref_model.kind == ModelKind.ONNX and cand_model.kind != ModelKind.ONNX:
        side = cand_model
    else:
        side = ref_model
    return plan_inputs(side, request)


def failure_hint(report: ParityReport) -> str | None:
    """Tolerances only help when the outputs are close; structural failures need the candidate fixed."""
    if report.passed:
        return None
    structural = any(s.error for s in report.shapes) or any(d.problem for s in report.shapes for d in s.outputs)
    if structural:
        return ("The candidate does not behave like the reference (see the failing rows): fix or re-export it; "
                "no tolerance makes this pass.")
    return ("If the difference is expected (an fp16/bf16/int8 candidate the auto preset did not recognise), use "
            "--preset, or --atol/--rtol (used as given); the criteria table shows each check and its threshold.")


def worst_output(report: ParityReport) -> str | None:
    """`logits at batch=3,sequence=8` for the failing output furthest from its tolerance."""
    worst: tuple[float, str] | None = None
    for shape in report.shapes:
        if shape.error and not shape.outputs:
            return f"(all outputs) at {shape.label}"
        for diff in shape.outputs:
            if diff.passed:
                continue
            allowed = diff.effective_atol if diff.effective_atol is not None else diff.atol
            score = float("inf") if diff.problem or diff.min_atol_to_pass is None else diff.min_atol_to_pass / \
                max(allowed, 1e-30)
            if worst is None or score > worst[0]:
                worst = (score, f"{diff.name} at {shape.label}")
    if worst is None:
        failing = next((s for s in report.shapes if not s.passed), None)
        if failing:
            return f"(all outputs) at {failing.label}"
        decision = next((c for c in report.criteria if not c.criterion.passed), None)  # pooled top-1/next token
        return f"{decision.output} over {decision.input_set}" if decision else None
    return worst[1]
