"""The parity engine: does a candidate model compute the same thing as a reference?

Used by `verify-parity` and by every command that produces an artefact (exports, compression, pruning)
to check its result. Runs both sides on several input sets, compares every output with tolerances,
excludes padded positions, times both sides, and guards against the usual traps: shape-specialised
traces, dropout left on, output mismatches, NaN/inf.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from mlops_cli.core.compare import (
    AGREEMENT,
    COSINE,
    ELEMENTWISE,
    NEXT_TOKEN,
    PRESETS,
    TOP1,
    Agreement,
    Criterion,
    OutputDiff,
    agreement_criteria,
    compare_arrays,
)
from mlops_cli.core.errors import InputError, MlopsError, UsageError
from mlops_cli.core.inputs import InputSet
from mlops_cli.core.runtimes import Runner
from mlops_cli.core.timing import SpeedRatio, Timing, measure_interleaved, speed_ratio, speedup, trust_warnings


@dataclass(frozen=True)
class Tolerances:
    """Default atol/rtol plus per-output overrides (`--atol logits=1e-4`).

    With a `preset` (fp32, fp16, bf16, int8) the bound is scale-aware and the preset's agreement criteria apply
    (core/compare.py); without one, and for outputs with their own override, atol/rtol are used as given.
    """

    atol: float = 1e-4
    rtol: float = 1e-3
    per_output: dict[str, tuple[float | None, float | None]] = field(default_factory=dict)
    preset: str | None = None

    @classmethod
    def for_preset(cls, name: str, per_output: dict[str, tuple[float | None, float | None]] | None = None
                   ) -> Tolerances:
        """A preset's tolerances: its atol/rtol, scale-aware, with its criteria."""
        return cls(*PRESETS[name], per_output=dict(per_output or {}), preset=name)

    @property
    def agreement(self) -> Agreement | None:
        return AGREEMENT[self.preset] if self.preset else None

    def for_output(self, name: str, other_name: str | None = None) -> tuple[float, float]:
        """The tolerances of output `name` (`other_name`: its name on the other side, when they differ)."""
        atol, rtol = self.per_output.get(name, self.per_output.get(other_name or name, (None, None)))
        return (self.atol if atol is None else atol, self.rtol if rtol is None else rtol)

    def agreement_for(self, name: str, other_name: str | None = None) -> Agreement | None:
        """The preset's criteria, except for an output the user gave its own tolerances (used as given)."""
        overridden = name in self.per_output or (other_name or name) in self.per_output
        return None if overridden else self.agreement

    def check_names(self, *outputs: dict[str, np.ndarray]) -> None:
        """A per-output override whose name matches no output would silently do nothing: a usage error."""
        known = [name for side in outputs for name in side]
        unknown = [name for name in self.per_output if name not in known]
        if unknown:
            real = ", ".join(dict.fromkeys(known)) or "(none)"
            which = "override for" if len(unknown) == 1 else "overrides for"
            raise UsageError(f"--atol/--rtol {which} {', '.join(map(repr, unknown))} "
                             f"match{'es' if len(unknown) == 1 else ''} no output; the outputs are: {real}",
                             hint=f"Use NAME=VALUE with one of: {real} (or a bare VALUE for every output).")


@dataclass(frozen=True)
class ToleranceRequest:
    """`--preset`, `--atol`, `--rtol` as the user gave them; `resolve` turns them into Tolerances once the
    precision is known (`auto` needs the candidate). Given --atol/--rtol are used as given, without scaling
    or criteria: the user is in control."""

    preset: str = "auto"
    atol: float | None = None
    rtol: float | None = None
    per_output: dict[str, tuple[float | None, float | None]] = field(default_factory=dict)

    @classmethod
    def parse(cls, atol: Sequence[str] | None, rtol: Sequence[str] | None, preset: str = "auto"
              ) -> ToleranceRequest:
        """`--atol 1e-4 --atol logits=1e-3` -> a global value plus per-output overrides."""
        if preset != "auto" and preset not in PRESETS:
            raise UsageError(f"unknown --preset {preset!r}", hint=f"Use auto or one of: {', '.join(PRESETS)}.")
        base: dict[str, float | None] = {"atol": None, "rtol": None}
        per_output: dict[str, list[float | None]] = {}
        for kind, values in (("atol", atol or []), ("rtol", rtol or [])):
            for value in values:
                name, sep, number = value.rpartition("=")
                try:
                    parsed = float(number)
                except ValueError as exc:
                    raise UsageError(f"--{kind} {value!r} is not a number or NAME=NUMBER") from exc
                if parsed < 0:
                    raise UsageError(f"--{kind} must not be negative")
                if sep:
                    per_output.setdefault(name, [None, None])[0 if kind == "atol" else 1] = parsed
                else:
                    base[kind] = parsed
        return cls(preset, base["atol"], base["rtol"], {k: (v[0], v[1]) for k, v in per_output.items()})

    @property
    def explicit(self) -> bool:
        """Whether the user set a global --atol or --rtol."""
        return self.atol is not None or self.rtol is not None

    def resolve(self, precision: str | tuple[float, float]) -> Tolerances:
        """Tolerances for a candidate of `precision` (a preset name; used when the request says auto).

        A pair of numbers is a caller's default (atol, rtol): a preset's own pair means that preset."""
        name = preset_named(precision) if isinstance(precision, tuple) else precision
        name = name if self.preset == "auto" else self.preset
        default: tuple[float, float] = PRESETS[name] if name else (float(precision[0]), float(precision[1]))
        if name and not self.explicit:
            return Tolerances.for_preset(name, self.per_output)
        return Tolerances(default[0] if self.atol is None else self.atol,
                          default[1] if self.rtol is None else self.rtol, dict(self.per_output))


def preset_named(values: tuple[float, float] | Sequence[float]) -> str | None:
    """The preset whose (atol, rtol) these are, if any."""
    return next((name for name, pair in PRESETS.items() if tuple(values) == pair), None)


@dataclass(frozen=True)
class ShapeResult:
    """Comparison of all outputs on one input set."""

    label: str
    input_shapes: dict[str, tuple[int, ...]]
    outputs: tuple[OutputDiff, ...]
    passed: bool
    error: str | None = None
    reference_latency: Timing | None = None
    candidate_latency: Timing | None = None
    speed_ratio: float | None = None  # reference median / candidate median (> 1: the candidate is faster)
    speed: SpeedRatio | None = None  # the same ratio with its bootstrap interval

    @property
    def speedup(self) -> float | None:
        return speedup(self.reference_latency, self.candidate_latency)


@dataclass(frozen=True)
class ParityReport:
    reference: str
    candidate: str
    reference_backend: str
    candidate_backend: str
    device: str
    atol: float
    rtol: float
    shapes: tuple[ShapeResult, ...]
    passed: bool
    verdict: str
    notes: tuple[str, ...] = ()
    masked_positions_excluded: bool = True
    preset: str | None = None  # whose scale-aware bound and criteria applied; None: plain atol/rtol
    criteria: tuple[OutputCriterion, ...] = ()  # every check of every output, at its worst input set
    threads: int | None = None  # torch's CPU threads while timing (None: nothing was timed)


@dataclass(frozen=True)
class OutputCriterion:
    """One criterion of one output at the input set where it came closest to failing (or failed worst)."""

    output: str
    input_set: str
    criterion: Criterion


def check_parity(reference: Runner, candidate: Runner, input_sets: list[InputSet],
                 tolerances: Tolerances | None = None, *, include_masked: bool = False,
                 time_runs: bool = True, repeats: int = 10, check_determinism: bool = True) -> ParityReport:
    """Run both sides on every input set and compare every output."""
    tolerances = tolerances or Tolerances.for_preset("fp32")
    notes: list[str] = []
    results: list[ShapeResult] = []
    for index, input_set in enumerate(input_sets):
        _check_inputs(reference, candidate, input_set)
        result = _compare_on(reference, candidate, input_set, tolerances, include_masked, time_runs, repeats)
        if index == 0 and check_determinism and result.error is None:
            problem = _nondeterminism(reference, candidate, input_set)
            if problem:
                notes.append(problem)
                result = ShapeResult(result.label, result.input_shapes, result.outputs, False, problem,
                                     result.reference_latency, result.candidate_latency, result.speed_ratio,
                                     result.speed)
        results.append(result)
    dropped = sorted(set(candidate.dropped_inputs) | set(reference.dropped_inputs))
    if dropped:
        notes.append(f"inputs not taken by one side (not fed to it): {', '.join(dropped)}")
    if reference.device != candidate.device:
        notes.append(f"the reference runs on {reference.device}, the candidate on {candidate.device}: "
                     "latencies are not like for like")
    paired = sorted({d.name for r in results for d in r.outputs if " ~ " in d.name})
    if paired:
        notes.append(f"outputs named differently, paired by position: {', '.join(paired)}")
    timings = [t for r in results for t in (r.reference_latency, r.candidate_latency) if t is not None]
    threads = _torch_threads() if timings else None
    if timings:
        notes.extend(trust_warnings(threads, timings))
    decisions = pooled_criteria(results, tolerances)
    failed_decision = next((c for c in decisions if not c.criterion.passed), None)
    sets_passed = all(r.passed for r in results) and bool(results)
    passed = sets_passed and failed_decision is None
    if sets_passed and failed_decision is not None:
        verdict = f"{failed_decision.output} over {failed_decision.input_set}: {describe_decision(failed_decision)}"
    else:
        verdict = _verdict(results, passed, tolerances.preset)
    return ParityReport(
        reference=reference.name, candidate=candidate.name,
        reference_backend=reference.backend, candidate_backend=candidate.backend,
        device=candidate.device, atol=tolerances.atol, rtol=tolerances.rtol,
        shapes=tuple(results), passed=passed, verdict=verdict,
        notes=tuple(notes), masked_positions_excluded=not include_masked, preset=tolerances.preset,
        criteria=(*worst_criteria(results), *decisions), threads=threads,
    )


def pooled_criteria(results: list[ShapeResult], tolerances: Tolerances) -> tuple[OutputCriterion, ...]:
    """Top-1 and greedy next-token agreement of each logits-like output, over all input sets' positions."""
    agreement = tolerances.agreement
    if agreement is None:
        return ()
    by_output: dict[str, list[OutputDiff]] = {}
    for result in results:
        for diff in result.outputs:
            by_output.setdefault(diff.name, []).append(diff)
    pooled = []
    for name, diffs in by_output.items():
        ref_name, _, cand_name = name.partition(" ~ ")
        if tolerances.agreement_for(ref_name, cand_name or None) is None:
            continue  # the user's own --atol/--rtol for this output: used as given, no other criterion
        positions = sum(d.top1_counts[1] for d in diffs if d.top1_counts)
        where = f"all input sets ({positions} positions)"
        pooled += [OutputCriterion(name, where, criterion) for criterion in agreement_criteria(agreement, diffs)]
    return tuple(pooled)


def describe_decision(failed: OutputCriterion) -> str:
    what = {TOP1: "top-1 agreement", NEXT_TOKEN: "greedy next-token agreement"}[failed.criterion.name]
    return f"{what} {failed.criterion.value:.1%} is below {failed.criterion.threshold:.1%}"


def _torch_threads() -> int | None:
    """The CPU threads torch computes with (what a timing depends on), if torch is loaded."""
    import sys

    torch = sys.modules.get("torch")
    return int(torch.get_num_threads()) if torch is not None else None


def worst_criteria(results: list[ShapeResult]) -> tuple[OutputCriterion, ...]:
    """Per output and criterion, the input set where it did worst: what the criteria table shows."""
    worst: dict[tuple[str, str], OutputCriterion] = {}
    for result in results:
        for diff in result.outputs:
            for criterion in diff.criteria:
                key = (diff.name, criterion.name)
                if key not in worst or _shortfall(criterion) > _shortfall(worst[key].criterion):
                    worst[key] = OutputCriterion(diff.name, result.label, criterion)
    return tuple(worst.values())


def _shortfall(criterion: Criterion) -> float:
    """How far a criterion is from failing (> 0: failed); comparable across input sets of one output."""
    if criterion.rule == ">=":
        return criterion.threshold - criterion.value
    if criterion.threshold > 0:
        return criterion.value / criterion.threshold - 1.0
    return float("inf") if criterion.value > 0 else -1.0


def _compare_on(reference: Runner, candidate: Runner, input_set: InputSet, tolerances: Tolerances,
                include_masked: bool, time_runs: bool, repeats: int) -> ShapeResult:
    shapes = {name: tuple(array.shape) for name, array in input_set.tensors.items()}
    try:
        ref_out = reference(reference.feed(input_set.tensors))
    except MlopsError:
        raise
    except Exception as exc:  # the inputs do not fit the reference: nothing to compare, and not the candidate's fault
        shown = ", ".join(f"{name}{list(shape)}" for name, shape in shapes.items())
        raise InputError(f"the reference {reference.name} fails on the inputs {input_set.label} ({shown}): "
                         f"{_first_line(exc)}",
                         hint="Describe the inputs the reference takes with --input, or give real ones with "
                              "--inputs FILE.") from exc
    try:
        cand_out = candidate(candidate.feed(input_set.tensors))
    except Exception as exc:
        return ShapeResult(input_set.label, shapes, (), False, _candidate_failure(input_set, exc))
    tolerances.check_names(ref_out, cand_out)
    mask = None if include_masked else input_set.tensors.get("attention_mask")
    diffs = _match_outputs(ref_out, cand_out, tolerances, mask)
    ref_time = cand_time = None
    if time_runs:
        ref_feed, cand_feed = reference.feed(input_set.tensors), candidate.feed(input_set.tensors)
        # A/B interleaved, so machine noise (other processes, clock changes) hits both sides alike.
        device = candidate.device if candidate.device.startswith("cuda") else reference.device
        sides = {"reference": lambda: reference(ref_feed), "candidate": lambda: candidate(cand_feed)}
        timings = measure_interleaved(sides, warmup=2, repeats=repeats, device=device)
        ref_time, cand_time = timings["reference"], timings["candidate"]
    return ShapeResult(input_set.label, shapes, tuple(diffs), all(d.passed for d in diffs) and bool(diffs),
                       None if diffs else "no outputs to compare", ref_time, cand_time, speedup(ref_time, cand_time),
                       speed_ratio(ref_time, cand_time))


# Errors that say a graph or trace was built for other sizes (ONNX Runtime, torch, TorchScript wordings).
_SHAPE_ERROR = re.compile(r"dimension|shape|size of tensor|of size|broadcast|\brank\b", re.IGNORECASE)


def _candidate_failure(input_set: InputSet, exc: BaseException) -> str:
    """One line for a candidate that raised; the fixed-shapes question only where the error is about sizes."""
    message = f"candidate failed at {input_set.label}: {_first_line(exc)}"
    if _SHAPE_ERROR.search(str(exc)):
        message += " (was it traced or exported with fixed shapes?)"
    return message


def _check_inputs(reference: Runner, candidate: Runner, input_set: InputSet) -> None:
    """A side whose every input is required (an ONNX graph) and that needs inputs the set lacks cannot
    be compared at all: that is the two models taking different inputs, not a parity failure."""
    given = list(input_set.tensors)
    for side, runner in (("reference", reference), ("candidate", candidate)):
        missing = [name for name in _required_inputs(runner) if name not in input_set.tensors]
        if missing:
            raise InputError(
                f"the models take different inputs: the {side} {runner.name} needs {', '.join(missing)}, which "
                f"the input sets do not have ({reference.name} takes {_takes(reference, given)}; "
                f"{candidate.name} takes {_takes(candidate, given)})",
                hint="Compare models that take the same inputs, or give every input both sides need with "
                     "--input NAME:DTYPE[DIMS] (once per input) or --inputs FILE.")


def _required_inputs(runner: Runner) -> list[str]:
    """Inputs a runner cannot run without: all of an ONNX graph's; unknown (none checked) for torch modules,
    whose forward arguments are mostly optional."""
    return list(runner.input_names or []) if runner.backend == "onnxruntime" else []


def _takes(runner: Runner, given: list[str]) -> str:
    """The inputs a side runs on: an ONNX graph's inputs, or the given ones a torch forward accepts."""
    if runner.backend == "onnxruntime":
        return ", ".join(runner.input_names or []) or "no inputs"
    accepted = [name for name in given if runner.input_names is None or name in runner.input_names]
    return ", ".join(accepted) or "none of the given inputs"


# Names exporters and plain modules give when they know no better: `output`, `output_0`, `linear_13`.
_GENERIC_OUTPUT = re.compile(r"^(output|out)?_?\d*$|^[a-z]+(_[a-z]+)*_\d+$")


def _match_outputs(ref_out: dict[str, np.ndarray], cand_out: dict[str, np.ndarray], tolerances: Tolerances,
                   mask: np.ndarray | None) -> list[OutputDiff]:
    """Pair outputs by name. Outputs whose names differ are paired by position only when one side's
    leftover names are generic (`output`, `linear_13`); descriptive names that differ are a mismatch."""
    atol, rtol = tolerances.atol, tolerances.rtol
    ref_rest = [name for name in ref_out if name not in cand_out]
    cand_rest = [name for name in cand_out if name not in ref_out]
    if len(ref_out) != len(cand_out):
        return [OutputDiff("(outputs)", (len(ref_out),), (len(cand_out),), atol, rtol, False,
                           problem=f"output count mismatch: reference has {len(ref_out)} ({_described(ref_out)}), "
                                   f"candidate has {len(cand_out)} ({_described(cand_out)})")]
    generic = all(_GENERIC_OUTPUT.match(n) for n in ref_rest) or all(_GENERIC_OUTPUT.match(n) for n in cand_rest)
    if ref_rest and not generic:
        return [OutputDiff("(outputs)", (len(ref_out),), (len(cand_out),), atol, rtol, False,
                           problem=f"output names differ: reference has {_described(ref_out, ref_rest)}, "
                                   f"candidate has {_described(cand_out, cand_rest)}")]
    pairs = [(name, name) for name in ref_out if name in cand_out]
    pairs += list(zip(ref_rest, cand_rest, strict=True))
    diffs = []
    for ref_name, cand_name in pairs:
        atol, rtol = tolerances.for_output(ref_name, cand_name)
        label = ref_name if ref_name == cand_name else f"{ref_name} ~ {cand_name}"
        diffs.append(compare_arrays(label, ref_out[ref_name], cand_out[cand_name], atol, rtol, mask,
                                    tolerances.agreement_for(ref_name, cand_name)))
    return diffs


def _described(outputs: dict[str, np.ndarray], names: list[str] | None = None) -> str:
    """`logits (2, 10), probs (2, 10)`: names with shapes, for mismatch messages."""
    return ", ".join(f"{name} {tuple(outputs[name].shape)}" for name in (outputs if names is None else names))


def _nondeterminism(reference: Runner, candidate: Runner, input_set: InputSet) -> str | None:
    """Run each side twice: different results mean dropout (train mode) or another random op is active."""
    for side, runner in (("reference", reference), ("candidate", candidate)):
        feed = runner.feed(input_set.tensors)
        first, second = runner(feed), runner(feed)
        for name, value in first.items():
            if name in second and value.shape == second[name].shape and not _same(value, second[name]):
                return (f"the {side} is non-deterministic: two runs on the same input differ in {name!r} "
                        "(dropout left on / model in train mode?)")
    return None


def _same(first: np.ndarray, second: np.ndarray) -> bool:
    """Bitwise-equal results; NaN equals NaN here (a NaN output is reported as such, not as randomness)."""
    return bool(np.array_equal(first, second, equal_nan=np.issubdtype(first.dtype, np.inexact)))


def _verdict(results: list[ShapeResult], passed: bool, preset: str | None) -> str:
    if passed:
        worst = max((d.max_abs or 0.0 for r in results for d in r.outputs), default=0.0)
        checks = f" and the {preset} criteria" if preset else ""
        return f"all outputs within tolerance{checks} on {len(results)} input set(s); worst max |diff| {worst:.3g}"
    for result in results:
        if result.error:
            return result.error
        for diff in result.outputs:
            if diff.problem:
                return f"{diff.name} at {result.label}: {diff.problem}"
    failing = [(d, r) for r in results for d in r.outputs if not d.passed]
    diff, result = max(failing, key=lambda pair: _shortfall(pair[0].failed_criterion) if pair[0].failed_criterion
                       else 0.0)
    return f"{diff.name} at {result.label}: {describe_failure(diff)}"


def describe_failure(diff: OutputDiff) -> str:
    """The failing criterion of an output, with its value and threshold."""
    failed = diff.failed_criterion
    if failed is None or failed.name == ELEMENTWISE:
        grown = (f" ({diff.effective_atol / diff.scale:.3g} x max|ref| {diff.scale:.3g})"
                 if diff.effective_atol and diff.scale and diff.effective_atol > diff.atol else "")
        return (f"max |diff| {diff.max_abs:.3g} exceeds atol {diff.effective_atol or diff.atol:.3g}{grown} + "
                f"rtol {diff.rtol:g}*|ref| (would pass with atol >= {diff.min_atol_to_pass:.3g})")
    shown = f"{failed.value:.6f}" if failed.name == COSINE else f"{failed.value:.1%}"
    wanted = f"{failed.threshold:g}" if failed.name == COSINE else f"{failed.threshold:.1%}"
    what = {TOP1: "top-1 agreement", NEXT_TOKEN: "greedy next-token agreement"}.get(failed.name, failed.name)
    return f"{what} {shown} is below {wanted} (max |diff| {diff.max_abs:.3g})"


_ORT_BOILERPLATE = re.compile(r"\[ONNXRuntimeError\] : \d+ : \w+ : "
                              r"|\s*Please fix either the inputs/outputs or the model\.")


def _first_line(exc: BaseException, limit: int = 300) -> str:
    """The gist of an error on one line (ONNX Runtime puts the useful part on its second line)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = _ORT_BOILERPLATE.sub("", " ".join(lines[:3])).strip() if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
