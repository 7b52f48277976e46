"""The words of a prune report: drift summarised, thresholds checked, the verdict, and the notes that say what
the figures mean (zeros do not shrink a dense file, noisy timings, what was kept or dropped)."""

from __future__ import annotations

from collections.abc import Callable

from mlops_cli.core.contract import LoadOptions
from mlops_cli.core.loading import LoadedModel, ModelKind
from mlops_cli.core.parity import ParityReport
from mlops_cli.core.pruned import REBUILD_ARCH
from mlops_cli.services.prune.options import PruneOptions
from mlops_cli.services.prune.report import AmountResult, Drift
from mlops_cli.services.prune.targets import tied_targets

UNSTRUCTURED_NOTE = ("Unstructured pruning writes zeros into dense tensors: the raw file keeps its size and dense "
                     "kernels do not get faster. The saving shows in the compressed size (or with sparse kernels); "
                     "use --structured-shrink to remove whole channels instead.")


def summarize_drift(parity: ParityReport) -> Drift:
    """Worst max |diff| and mean |diff|, lowest cosine and top-1 agreement across the parity run."""
    errors = [shape.error for shape in parity.shapes if shape.error]
    diffs = [d for shape in parity.shapes for d in shape.outputs]
    problems = [d.problem for d in diffs if d.problem]
    if errors or problems or not diffs:
        return Drift(None, None, None, None, error=(errors + problems or ["no outputs to compare"])[0])

    def worst(values: list[float | None], pick: Callable[[list[float]], float]) -> float | None:
        present = [v for v in values if v is not None]
        return pick(present) if present else None

    return Drift(max_abs=worst([d.max_abs for d in diffs], max), mean_abs=worst([d.mean_abs for d in diffs], max),
                 cosine=worst([d.cosine for d in diffs], min),
                 top1_agreement=worst([d.top1_agreement for d in diffs], min))


def failure(options: PruneOptions, parity: ParityReport, drift: Drift) -> str | None:
    """Why this amount fails the user's thresholds (None when no threshold is given or all hold)."""
    if drift.error:
        return drift.error
    if options.tolerances is not None and not parity.passed:
        return parity.verdict
    if options.max_drift is not None and (drift.max_abs is None or drift.max_abs > options.max_drift):
        return f"max |diff| {_fmt(drift.max_abs)} exceeds --max-drift {options.max_drift:g}"
    if options.min_top1 is not None:
        if drift.top1_agreement is None:
            return "--min-top1: no output has classes to compare (no logits-like output)"
        if drift.top1_agreement < options.min_top1:
            return f"top-1 agreement {drift.top1_agreement:.1%} is below --min-top1 {options.min_top1:.1%}"
    return None


def thresholds(options: PruneOptions) -> dict[str, float]:
    result: dict[str, float] = {}
    if options.tolerances is not None:
        result.update(atol=options.tolerances.atol, rtol=options.tolerances.rtol)
    if options.max_drift is not None:
        result["max_drift"] = options.max_drift
    if options.min_top1 is not None:
        result["min_top1"] = options.min_top1
    return result


def verdict(options: PruneOptions, results: list[AmountResult], passed: bool) -> str:
    if not options.enforced:
        worst = max(results, key=lambda r: r.drift.max_abs or 0.0)
        return (f"drift reported, not checked (no threshold given): worst max |diff| "
                f"{_fmt(worst.drift.max_abs)} at amount {worst.amount:g}")
    if passed:
        limits = ", ".join(f"{name} {value:g}" for name, value in thresholds(options).items())
        return f"every amount within the thresholds ({limits})"
    failing = [r for r in results if not r.passed]
    return "; ".join(f"amount {r.amount:g}: {r.failure}" for r in failing)


def notes(loaded: LoadedModel, load: LoadOptions, options: PruneOptions, targets: list[str],
          results: list[AmountResult]) -> list[str]:
    """What the figures mean, and what happened to what was not pruned."""
    lines = _method_notes(loaded, options) + _checkpoint_notes(loaded, load, options, results)
    timings = [t for r in results if r.latency for t in (r.latency.before, r.latency.after)]
    if any(t.p90_ms > 1.5 * t.median_ms for t in timings):
        lines.append("latency was noisy (p90 over 1.5x p50 in some runs): treat small speed-ups or "
                     "slow-downs as noise, or rerun with more --repeats on an idle machine")
    foreign = options.structured_shrink and loaded.kind == ModelKind.MODULE \
        and not str(loaded.arch).startswith("mlops_cli.")
    written = next((r.output for r in results if r.output), None)
    if foreign and written:
        lines.append(f"{written} is built on your architecture {loaded.arch}, which mlops never imports unasked: "
                     f"load it with --arch {REBUILD_ARCH} --arch-kwargs "
                     f"\"$(jq -c '.arch_kwargs + {{trust_code: true}}' {written}/mlops.json)\"")
    tied = tied_targets(loaded.module, targets)
    if tied:
        lines.append(f"tied weights pruned together: {', '.join(tied)}")
    return lines


def _method_notes(loaded: LoadedModel, options: PruneOptions) -> list[str]:
    if not options.structured_shrink:
        return [UNSTRUCTURED_NOTE]
    if loaded.kind == ModelKind.HF:
        return ["Hugging Face models: feed-forward neurons are removed (config intermediate size updated); "
                "attention heads are kept, as transformers 5 configs cannot describe pruned heads."]
    return []


def _checkpoint_notes(loaded: LoadedModel, load: LoadOptions, options: PruneOptions,
                      results: list[AmountResult]) -> list[str]:
    if not any(r.output for r in results):
        return []
    lines = []
    if loaded.checkpoint_extras:
        extras = ", ".join(loaded.checkpoint_extras)
        lines.append(f"training-checkpoint entries ({extras}) were dropped: their optimizer state does not fit "
                     "the new shapes" if options.structured_shrink else
                     f"training-checkpoint entries ({extras}) were kept as they were; optimizer state still "
                     "refers to the unpruned weights")
    if load.strip_prefix:
        lines.append(f"weights were written without the prefix {load.strip_prefix!r}")
    return lines


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"
