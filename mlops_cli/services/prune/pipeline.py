"""One prune run: the reference model, its inputs (planned once) and baseline figures, then per amount a pruned
copy, its drift, latency, sizes and, when asked, the artefact written and loaded back."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

from mlops_cli.core.contract import ModelRef
from mlops_cli.core.errors import InputError
from mlops_cli.core.inputs import InputPlan
from mlops_cli.core.loading import LoadedModel
from mlops_cli.core.parity import Tolerances
from mlops_cli.services.perplexity import probe_for, torch_logits_fn
from mlops_cli.services.prune import artefact, verdict
from mlops_cli.services.prune.options import PruneOptions
from mlops_cli.services.prune.report import AmountResult, LatencyFigures, LayerChange, PruneReport, SizeFigures
from mlops_cli.services.prune.shrink import shrink_module
from mlops_cli.services.prune.sizes import file_dtypes, state_for_saving, weight_sizes
from mlops_cli.services.prune.targets import head_modules, select_targets
from mlops_cli.services.prune.unstructured import apply_pruning, count_zeros, parameter_counts


class Pruner:
    """Everything one run shares between its amounts."""

    def __init__(self, ref: ModelRef, loaded: LoadedModel, plan: InputPlan, options: PruneOptions, device: str):
        from mlops_cli.core.runtimes import runner_for

        self.ref, self.loaded, self.plan, self.options, self.device = ref, loaded, plan, options, device
        self.example = plan.example
        self.dtypes = file_dtypes(loaded, options.load)
        self.reference = runner_for(loaded, device)  # moves the module to the device
        heads = head_modules(loaded, loaded.module, self.example.tensors)
        self.targets, self.skipped = select_targets(loaded.module, heads, options.include, options.exclude)
        self.probe, unmeasured = probe_for(options.evaluation, loaded, on_step=options.on_step)
        self.warnings = (*loaded.warnings, *([unmeasured] if unmeasured else []))

    def run(self, outputs: dict[float, Path]) -> PruneReport:
        options, module = self.options, self.loaded.module
        parameters, zeros = parameter_counts(module)
        size_before = self._sizes(state_for_saving(module, self.dtypes), "of the input")
        macs_before = self._macs(module) if options.structured_shrink else None
        results = [self._one_amount(amount, outputs.get(amount)) for amount in options.amounts]
        passed = all(r.passed for r in results)
        return PruneReport(
            model=self.ref.text, model_kind=artefact.output_kind(self.ref, self.loaded, options),
            method=options.method, n=options.n, dim=self._dim(), structured_shrink=options.structured_shrink,
            seed=options.seed, device=self.device, targets=tuple(self.targets), skipped=tuple(self.skipped),
            parameters_before=parameters, model_zeros_before=zeros, size_before=size_before,
            macs_before=macs_before, results=tuple(results), enforced=options.enforced,
            thresholds=verdict.thresholds(options), passed=passed, verdict=verdict.verdict(options, results, passed),
            notes=tuple(verdict.notes(self.loaded, options.load, options, self.targets, results)),
            warnings=self.warnings)

    def _dim(self) -> int | None:
        if self.options.method == "ln-structured" and not self.options.structured_shrink:
            return self.options.dim or 0
        return None

    def _one_amount(self, amount: float, output: Path | None) -> AmountResult:
        from mlops_cli.core.parity import check_parity
        from mlops_cli.core.runtimes import runner_for

        options, step = self.options, self.options.on_step
        step(f"pruning {amount:g}")
        candidate, layers = self._pruned_copy(amount)
        pruned = dataclasses.replace(self.loaded, module=candidate, reference=f"pruned {amount:g}", warnings=[])
        cand_runner = runner_for(pruned, self.device)
        step(f"measuring drift {amount:g}")
        parity = check_parity(self.reference, cand_runner, list(self.plan.sets), options.tolerances or Tolerances(),
                              time_runs=False)
        broken = next((s.error for s in parity.shapes if (s.error or "").startswith("candidate failed")), None)
        if broken:
            raise InputError(f"the pruned model no longer runs: {broken}",
                             hint="Its forward probably hard-codes a layer size; --exclude the layers around it.")
        drift = verdict.summarize_drift(parity)
        failure = verdict.failure(options, parity, drift)
        parameters, zeros = parameter_counts(candidate)
        state = state_for_saving(candidate, self.dtypes)
        written: dict[str, int] = {}
        reloaded = None
        if output is not None:
            step(f"writing {output.name}")
            written = artefact.save(self.ref, self.loaded, options, candidate, state, output, amount)
            step(f"reload check {output.name}")
            reloaded = artefact.reload_check(self.loaded, options.load, output, cand_runner, self.example.tensors,
                                             self.device)
        latency = self._latency(cand_runner, amount)
        perplexity = None
        if self.probe is not None:
            step(f"measuring perplexity {amount:g}")
            perplexity = self.probe.compare(torch_logits_fn(candidate))
        size = self._sizes(state, f"at {amount:g}")
        return AmountResult(
            amount=amount, layers=tuple(layers),
            target_zeros=sum(layer.zeros for layer in layers), target_elements=sum(layer.elements for layer in layers),
            model_zeros=zeros, parameters=parameters, size=size, drift=drift, parity=parity,
            latency=latency, macs=self._macs(candidate) if options.structured_shrink else None,
            passed=failure is None, failure=failure, output=str(output) if output else None, output_files=written,
            reloaded=reloaded, perplexity=perplexity)

    def _pruned_copy(self, amount: float) -> tuple[Any, list[LayerChange]]:
        """A pruned (or shrunk) copy of the model, and what changed in it; the original stays the reference."""
        options = self.options
        candidate = copy.deepcopy(self.loaded.module)
        if options.structured_shrink:
            layers = shrink_module(self.loaded, candidate, self.targets, self.example.tensors, options, amount)
        else:
            apply_pruning(candidate, self.targets, options.method, amount, options.n, self._dim(), options.seed)
            layers = count_zeros(candidate, self.targets)
        return candidate.eval(), layers

    def _latency(self, candidate: Any, amount: float) -> LatencyFigures | None:
        from mlops_cli.core.timing import measure_interleaved

        if self.options.repeats == 0:
            return None
        self.options.on_step(f"timing {amount:g}")
        feed = self.example.tensors
        timings = measure_interleaved({"before": lambda: self.reference(feed), "after": lambda: candidate(feed)},
                                      warmup=self.options.warmup, repeats=self.options.repeats, device=self.device)
        return LatencyFigures(self.example.label, timings["before"], timings["after"])

    def _sizes(self, state: dict[str, Any], which: str) -> SizeFigures:
        if self.options.size_estimate:
            self.options.on_step(f"estimating the compressed size {which}")
        return weight_sizes(state, estimate=self.options.size_estimate)

    def _macs(self, module: Any) -> int:
        from mlops_cli.core.flops import count_macs

        return count_macs(module, self.example.tensors, by_module=False).macs
