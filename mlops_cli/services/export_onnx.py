"""`mlops export onnx`: export a model to ONNX and prove the file computes what the model computes.

The service orchestrates; the writing engine (exporters, dynamic dims, metadata, external data, checker,
graph facts) is `core/onnx_export.py`. `run` resolves the input plan once, writes into a temporary folder
beside the output, runs `onnx.checker`, verifies the file with the parity engine on the plan's input sets
(the user's sizes first, then others; with `--exporter auto` the next exporter of `exporter_order` takes over
when a graph fails), runs the optimisation passes (each timed against the graph before it and kept only if
faster AND still verified), and then moves the file(s) into place, so a re-export never leaves a stale `.data`
file behind. A file that fails verification is still moved into place: the report says so (exit 6).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlops_cli.core.contract import ModelRef, OutputOptions, Report
from mlops_cli.core.errors import InputError, MlopsError, UsageError
from mlops_cli.core.inputs import InputPlan, InputRequest, InputSet
from mlops_cli.core.loading import LoadedModel, ModelKind, lm_task
from mlops_cli.core.onnx_export import (
    DYNAMIC_DIM_NAMES,
    EXPORTERS,
    OPSETS,
    GraphValue,
    OnnxWriteResult,
    check_exportable,
    check_onnx_output,
    data_file,
    exporter_failure,
    exporter_order,
    graph_info,
    move_into_place,
    quiet_exporters,
    run_checker,
    save_model_proto,
    write_onnx,
)
from mlops_cli.core.parity import ParityReport, Tolerances

if TYPE_CHECKING:
    from mlops_cli.core.timing import Stopwatch

OPTIMIZERS = ("auto", "none", "fusion", "slim", "ort", "all")
# Hugging Face model type -> the model type ONNX Runtime's transformer optimizer fuses it as.
ORT_TRANSFORMER_TYPES = {
    **dict.fromkeys(("bert", "roberta", "xlm-roberta", "camembert", "distilbert", "albert", "electra", "mpnet"),
                    "bert"),
    "gpt2": "gpt2", "vit": "vit", "deit": "vit", "swin": "swin", "bart": "bart", "t5": "t5",
}
MIN_PASS_SPEEDUP = 1.02  # a pass must make the graph at least this much faster to be kept (timing noise below)
PASS_TIMING_SECONDS = 0.3  # about how long each pass's before/after timing runs

__all__ = ["ExportOnnxOptions", "ExportOnnxReport", "OptimizePass", "run"]


@dataclass(frozen=True)
class OptimizePass:
    """One optimisation pass: node counts before/after and whether its result was kept."""

    name: str
    nodes_before: int
    nodes_after: int | None
    accepted: bool
    reason: str
    seconds: float
    latency_before_ms: float | None = None  # median on the export example, one thread, before the pass
    latency_after_ms: float | None = None  # ... and after it (None when the pass failed or changed the outputs)
    # The verification of the pass's graph: the export's verdict when it is the last pass kept (not in the JSON,
    # which shows the export's one verification).
    report: ParityReport | None = field(default=None, compare=False, repr=False, metadata={"json": False})

    @classmethod
    def measured(cls, name: str, nodes_before: int, nodes_after: int | None, accepted: bool, reason: str,
                 started: float, report: ParityReport | None = None,
                 latency: tuple[float, float] | None = None) -> OptimizePass:
        """A pass that began at `started` (perf_counter) and ends now, with its (before, after) median ms."""
        before, after = latency or (None, None)
        return cls(name, nodes_before, nodes_after, accepted, reason, time.perf_counter() - started, before, after,
                   report)


@dataclass(frozen=True, kw_only=True)
class ExportOnnxOptions(OutputOptions):
    """Everything `export onnx` can be asked to do (the command's options)."""

    inputs: InputRequest = field(default_factory=InputRequest)  # --input specs, --batch-size, --seq-len, --seed
    opset: int = 20
    static: bool = False
    exporter: str = "auto"
    external_data: bool = False
    verify: bool = True
    optimize: str = "auto"  # auto: transformer fusions where ONNX Runtime knows the model type, kept if faster
    tolerances: Tolerances = field(default_factory=Tolerances)
    include_padding: bool = False
    device: str = "auto"
    repeats: int = 0  # timed runs per side and shape in the verification; 0 (default) skips timing
    keep_metadata: bool = False  # keep the exporter's per-node stack traces and module paths


@dataclass(frozen=True, kw_only=True)
class ExportOnnxReport(Report):
    model: str
    output: str
    files: dict[str, int]  # file name -> bytes (the .onnx and its .data when external)
    exporter_used: str
    fallback_reason: str | None
    opset: int
    dynamic_dims: tuple[str, ...]
    external_data: bool
    inputs: tuple[GraphValue, ...]
    outputs: tuple[GraphValue, ...]
    nodes: int
    checker: str
    optimize_passes: tuple[OptimizePass, ...]
    verification: ParityReport | None  # None with --no-verify, or when the checker rejected the graph
    stages: dict[str, float]  # stage -> seconds
    passed: bool
    verdict: str
    export_sizes: dict[str, int] = field(default_factory=dict)  # sizes of the example the graph was exported with
    notes: tuple[str, ...] = ()


Verify = Callable[[Path], ParityReport]


def run(ref: ModelRef, options: ExportOnnxOptions) -> ExportOnnxReport:
    """Export, check, verify, optionally optimise, then move the result into place (even when it fails
    verification: the caller reports the verdict and exits 6, and the file is there to inspect)."""
    from mlops_cli.core.inputs import plan_inputs
    from mlops_cli.core.io import scratch_dir_beside
    from mlops_cli.core.loading import load_model
    from mlops_cli.core.runtimes import gather_on_cpu
    from mlops_cli.core.timing import Stopwatch

    _check_options(options)
    target = check_onnx_output(options.output, options.force, ref.sources)
    watch = Stopwatch()
    with watch.stage("load"):
        loaded = load_model(ref, options.load)
        gather_on_cpu(loaded, "export")
        check_exportable(loaded, options.exporter, options.opset)
        plan = plan_inputs(loaded, options.inputs)
    steps = _pass_steps(loaded, options.optimize) if options.verify else []
    notes: list[str] = []
    verify = _verifier(loaded, plan, options, notes) if options.verify else None
    example = plan.example if options.static else plan.export_example(tuple(DYNAMIC_DIM_NAMES))
    workdir = scratch_dir_beside(target)
    try:
        attempt = _first_good_export(loaded, plan, example, options, workdir / target.name, verify, watch)
        current, verification = attempt.path, attempt.verification
        passes: list[OptimizePass] = []
        if verify is not None and verification is not None and steps:
            options.on_step("optimising")
            memory = _PassMemory.for_export(loaded, attempt, example) if options.optimize == "auto" else None
            with watch.stage("optimize"):
                current, passes = _optimize(current, steps, verify, verification, example, memory)
            verification = next((p.report for p in reversed(passes) if p.accepted), verification)
        with watch.stage("write"):
            files = move_into_place(current, target)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return _report(ref, target, files, attempt, example, passes, verification, watch.stages,
                   [*loaded.warnings, *_generation_advice(loaded)], notes)


def _generation_advice(loaded: LoadedModel) -> list[str]:
    """A causal LM exported without its KV cache re-runs the whole sequence for every generated token."""
    task = lm_task(getattr(loaded.config, "architectures", None), getattr(loaded.config, "is_encoder_decoder", False))
    if task == "causal-lm":
        return ["this graph has no KV cache: generating with it re-runs the whole sequence for every token; "
                "the default export (without --no-kv-cache) writes the decoder with its cache (past_key_values in, "
                "present out) for generation"]
    if task == "seq2seq-lm":
        return ["this graph has no KV cache: generating with it re-runs the encoder and the whole decoder sequence "
                "for every token; export to a folder (-o DIR, or --task seq2seq-lm) for Optimum's encoder + "
                "decoders with their caches"]
    return []


@dataclass(frozen=True)
class _Attempt:
    """One exporter's graph: where it is, how it was written, what the checker and the verification said."""

    path: Path
    written: OnnxWriteResult
    checker: str
    verification: ParityReport | None
    passed_over: str | None = None  # why the exporters tried before this one were not kept

    @property
    def good(self) -> bool:
        return self.checker.startswith("passed") and (self.verification is None or self.verification.passed)

    def failure(self) -> str:
        if not self.checker.startswith("passed"):
            return f"onnx.checker rejected it ({self.checker.removeprefix('failed: ')})"
        return f"it failed verification ({self.verification.verdict if self.verification else '?'})"


def _first_good_export(loaded: LoadedModel, plan: InputPlan, example: InputSet, options: ExportOnnxOptions,
                       path: Path, verify: Verify | None, watch: Stopwatch) -> _Attempt:
    """Try the exporters of `exporter_order` in turn; keep the first whose graph passes the checker and the
    verification, or else the last one tried (its failure is then the verdict)."""
    order = exporter_order(loaded, options.exporter, options.opset)
    passed_over: list[str] = []
    for index, exporter in enumerate(order):
        last = index == len(order) - 1
        folder = path.parent / exporter
        folder.mkdir()
        try:
            attempt = _export_once(loaded, plan, example, options, folder / path.name, exporter, verify, watch)
        except InputError as exc:
            if last:
                raise
            passed_over.append(exc.message)
            continue
        if attempt.good or last:
            return replace(attempt, passed_over="; ".join(passed_over) or None)
        passed_over.append(f"its graph was not kept: {attempt.failure()}")
    raise AssertionError("exporter_order returned no exporter")  # pragma: no cover


def _export_once(loaded: LoadedModel, plan: InputPlan, example: InputSet, options: ExportOnnxOptions, path: Path,
                 exporter: str, verify: Verify | None, watch: Stopwatch) -> _Attempt:
    options.on_step("exporting")
    with watch.stage("export"):
        written = write_onnx(loaded, path, example, dynamic=not options.static, opset=options.opset,
                             exporter=exporter, external_data=options.external_data, specs=plan.specs,
                             keep_metadata=options.keep_metadata)
    options.on_step("checking")
    with watch.stage("check"):
        checker = run_checker(path)
    verification = None
    if verify is not None and checker.startswith("passed"):  # ONNX Runtime may not even load a rejected graph
        options.on_step("verifying")
        with watch.stage("verify"):
            verification = verify(path)
    return _Attempt(path, written, checker, verification)


def _check_options(options: ExportOnnxOptions) -> None:
    if options.optimize not in OPTIMIZERS:
        raise UsageError(f"unknown --optimize {options.optimize!r}", hint=f"Use one of: {', '.join(OPTIMIZERS)}.")
    if options.repeats < 0:
        raise UsageError("--repeats must be 0 (no timing) or more")
    if options.optimize not in ("none", "auto") and not options.verify:
        raise UsageError("--optimize needs verification (a pass that changes the outputs must be rejected)",
                         hint="Drop --no-verify.")
    if options.exporter not in EXPORTERS:
        raise UsageError(f"unknown --exporter {options.exporter!r}", hint=f"Use one of: {', '.join(EXPORTERS)}.")
    if options.opset not in OPSETS:
        raise UsageError(f"--opset {options.opset} is not supported",
                         hint=f"Use one of: {', '.join(map(str, OPSETS))}.")


def _verifier(loaded: LoadedModel, plan: InputPlan, options: ExportOnnxOptions, notes: list[str]) -> Verify:
    """A function `path -> ParityReport` comparing an ONNX file with the loaded model on the plan's input sets.

    The model's outputs on those sets are computed by the first verification and replayed by the later ones (a
    fallback exporter's graph, each optimisation pass): the model does not change in between. Not when timing
    (--repeats): the reference's latency must be measured each time."""
    from mlops_cli.core.parity import check_parity
    from mlops_cli.core.runtimes import device_for, onnx_runner, runner_for

    input_sets = list(plan.sets)
    if options.static:
        example = plan.example
        input_sets = [InputSet(f"example (static) {example.label}", example.tensors, example.sizes)]
        notes.append("static export: verified at the example shape only (other shapes are rejected by design)")
    reference = runner_for(loaded, device_for(loaded, options.device))
    remembered: dict[tuple[tuple[str, int], ...], dict[str, Any]] = {}
    replaying = replace(reference, call=lambda inputs: remembered.get(_identity(inputs)) or reference(inputs))
    verified = False

    def remember(inputs: dict[str, Any]) -> dict[str, Any]:
        outputs = reference.call(inputs)
        remembered.setdefault(_identity(inputs), outputs)  # the first run's: the determinism check's second differs
        return outputs

    recording = replace(reference, call=remember)

    def verify(path: Path) -> ParityReport:
        nonlocal verified
        onnx_model = LoadedModel(str(path), ModelKind.ONNX, None, path=path)
        candidate = onnx_runner(onnx_model, device_for(onnx_model, options.device))
        candidate.name = str(path.name)
        side = reference if options.repeats > 0 else replaying if verified else recording
        report = check_parity(side, candidate, input_sets, options.tolerances, include_masked=options.include_padding,
                              time_runs=options.repeats > 0, repeats=options.repeats)
        verified = True
        return report

    return verify


def _identity(inputs: dict[str, Any]) -> tuple[tuple[str, int], ...]:
    """Which input set this is: the plan's arrays live for the whole run, so their ids name them."""
    return tuple((name, id(array)) for name, array in inputs.items())


# ---------------------------------------------------------------- optimisation passes


PassFunction = Callable[[Path, Path], None]  # (source, destination)


def _pass_steps(loaded: LoadedModel, optimize: str) -> list[tuple[str, PassFunction]]:
    """The passes `--optimize` names, in order. `auto`: ONNX Runtime's transformer fusions for the model types
    it knows, nothing otherwise; `all`: those fusions (where known), onnxslim, ONNX Runtime's offline pass."""
    model_type = getattr(loaded.config, "model_type", None)
    fusion = ORT_TRANSFORMER_TYPES.get(model_type) if isinstance(model_type, str) else None
    fuse: list[tuple[str, PassFunction]] = [] if fusion is None else [
        ("transformer-fusion", lambda source, destination: _fuse(source, destination, fusion, loaded.config))]
    slim, ort = ("onnxslim", _slim), ("onnxruntime", _ort_offline)
    steps: dict[str, list[tuple[str, PassFunction]]] = {
        "none": [], "auto": fuse, "fusion": fuse, "slim": [slim], "ort": [ort], "all": [*fuse, slim, ort]}
    if optimize == "fusion" and fusion is None:
        raise UsageError(f"--optimize fusion: ONNX Runtime's transformer fusions do not know {loaded.reference} "
                         f"(model type {model_type or 'unknown'})",
                         hint=f"They know the model types {', '.join(sorted(ORT_TRANSFORMER_TYPES))}; "
                              "try --optimize slim or ort.")
    return steps[optimize]


def _optimize(current: Path, steps: list[tuple[str, PassFunction]], verify: Verify, baseline: ParityReport,
              example: InputSet, memory: _PassMemory | None) -> tuple[Path, list[OptimizePass]]:
    """Run the passes in order; keep each one only if its graph runs faster than the graph before it on the export
    example AND still passes verification (a pass that does not speed the model up is reported, not applied; it
    is timed first, so a pass that is not faster costs no verification). With a `memory` (--optimize auto), a
    pass measured no faster on an earlier export of the same architecture is not run again."""
    passes: list[OptimizePass] = []
    for name, function in steps:
        started = time.perf_counter()
        before = graph_info(current).nodes
        recalled = memory.recall(name) if memory is not None else None
        if recalled is not None:
            passes.append(OptimizePass.measured(
                name, before, None, False, f"{_judge(None, baseline, recalled, example)[1]}, measured on an earlier "
                f"export of this architecture (--optimize {_option(name)} measures again)", started, None, recalled))
            continue
        candidate = current.parent / f"pass-{name}" / current.name
        candidate.parent.mkdir()
        report = None
        try:
            function(current, candidate)
            latency = _latencies(current, candidate, example)
            if latency[0] >= latency[1] * MIN_PASS_SPEEDUP:
                report = verify(candidate)
            elif memory is not None:
                memory.store(name, latency)
        except Exception as exc:
            passes.append(OptimizePass.measured(name, before, None, False, f"pass failed: {exporter_failure(exc)}",
                                                started))
            continue
        accepted, reason = _judge(report, baseline, latency, example)
        passes.append(OptimizePass.measured(name, before, graph_info(candidate).nodes, accepted, reason, started,
                                            report, latency))
        if accepted:
            current = candidate
    return current, passes


def _option(pass_name: str) -> str:
    """The --optimize value that runs one pass."""
    return {"transformer-fusion": "fusion", "onnxslim": "slim", "onnxruntime": "ort"}.get(pass_name, pass_name)


@dataclass(frozen=True)
class _PassMemory:
    """Passes measured no faster for one architecture, exporter, opset and example size with this ONNX Runtime on
    this machine, kept in `<cache>/onnx-passes.json` (MLOPS_CACHE_DIR, else $XDG_CACHE_HOME/mlops or ~/.cache/mlops):
    re-exporting the same architecture (the usual CI job) does not pay for a pass known not to help. Only a pass
    that was not faster is remembered: one that is kept is always re-run and re-verified. Unreadable or unwritable
    caches are ignored."""

    path: Path
    key: str

    @classmethod
    def for_export(cls, loaded: LoadedModel, attempt: _Attempt, example: InputSet) -> _PassMemory | None:
        import hashlib
        import json
        import os
        import platform

        import onnxruntime

        to_json = getattr(loaded.config, "to_json_string", None)
        if to_json is None:  # no architecture to recognise the model by
            return None
        identity = [to_json(use_diff=False), attempt.written.exporter_used, attempt.written.opset, example.sizes,
                    onnxruntime.__version__, platform.machine(), platform.processor(), os.cpu_count()]
        key = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()
        from mlops_cli.core.io import cache_dir

        return cls(cache_dir() / "onnx-passes.json", key)

    def recall(self, name: str) -> tuple[float, float] | None:
        entry = self._entries().get(f"{self.key}:{name}")
        return (float(entry[0]), float(entry[1])) if isinstance(entry, list) and len(entry) == 2 else None

    def store(self, name: str, latency: tuple[float, float]) -> None:
        import json

        from mlops_cli.core.io import write_bytes

        entries = {**self._entries(), f"{self.key}:{name}": list(latency)}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_bytes(self.path, json.dumps(entries, indent=1).encode(), force=True)
        except (OSError, MlopsError):
            pass  # a cache that cannot be written only costs the next export the measurement

    def _entries(self) -> dict[str, Any]:
        import json

        try:
            entries = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return entries if isinstance(entries, dict) else {}


def _judge(report: ParityReport | None, baseline: ParityReport, latency: tuple[float, float],
           example: InputSet) -> tuple[bool, str]:
    """Whether a pass is kept, and why in one line (`report` is None when the pass was not faster)."""
    speedup = latency[0] / latency[1] if latency[1] else float("inf")
    where = f"{speedup:.2f}x at {example.label} ({latency[0]:.2f} -> {latency[1]:.2f} ms)"
    if report is None:
        return False, f"not kept: no faster, {where}"
    if report.passed:
        return True, f"kept: faster, {where}; outputs unchanged within tolerance"
    if not baseline.passed:
        return False, "not kept: the export itself fails verification"
    return False, f"rejected, changes the outputs: {report.verdict}"


def _latencies(first: Path, second: Path, example: InputSet) -> tuple[float, float]:
    """Median milliseconds of two ONNX files on the export example in ONNX Runtime: one thread each, runs
    interleaved (machine noise hits both alike), as many as fit in about PASS_TIMING_SECONDS."""
    import onnxruntime as ort

    from mlops_cli.core.runtimes import onnx_runner
    from mlops_cli.core.timing import measure_interleaved

    runners = []
    for path in (first, second):
        session_options = ort.SessionOptions()
        session_options.intra_op_num_threads = session_options.inter_op_num_threads = 1
        runners.append(onnx_runner(LoadedModel(str(path), ModelKind.ONNX, None, path=path), "cpu", session_options))
    feed = example.tensors
    started = time.perf_counter()
    for runner in runners:  # warm-up, and how long one round takes
        runner(feed)
    repeats = max(5, min(50, int(PASS_TIMING_SECONDS / max(time.perf_counter() - started, 1e-6))))
    timings = measure_interleaved({"before": lambda: runners[0](feed), "after": lambda: runners[1](feed)},
                                  warmup=1, repeats=repeats)
    return timings["before"].median_ms, timings["after"].median_ms


def _fuse(source: Path, destination: Path, model_type: str, config: Any) -> None:
    """ONNX Runtime's transformer optimizer (what Optimum applies): attention, layer norm, GELU and embedding
    fusions into ONNX Runtime's contrib operators. Its Python fusions only, without its symbolic shape inference:
    ONNX Runtime applies its own graph optimisations when it loads the file anyway, and the shape inference
    (for shape-subgraph clean-ups) is four fifths of the pass's time on a 22 M BERT, for the same fused operators."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    fusion_options = FusionOptions(model_type)
    fusion_options.enable_shape_inference = False
    with quiet_exporters():
        optimized = optimize_model(str(source), model_type=model_type, opt_level=0, optimization_options=fusion_options,
                                   num_heads=int(getattr(config, "num_attention_heads", 0) or 0),
                                   hidden_size=int(getattr(config, "hidden_size", 0) or 0))
    save_model_proto(optimized.model, destination, external=data_file(source).exists())


def _slim(source: Path, destination: Path) -> None:
    import onnx
    import onnxslim

    with quiet_exporters():
        model = onnxslim.slim(onnx.load(str(source)))
    save_model_proto(model, destination, external=data_file(source).exists())


def _ort_offline(source: Path, destination: Path) -> None:
    """ONNX Runtime's offline optimisation (extended level: fusions; the result needs ONNX Runtime)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(destination)
    if data_file(source).exists():
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                         data_file(destination).name)
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])


# ---------------------------------------------------------------- the report


def _report(ref: ModelRef, target: Path, files: dict[str, int], attempt: _Attempt, example: InputSet,
            passes: list[OptimizePass], verification: ParityReport | None, stages: dict[str, float],
            warnings: list[str], notes: list[str]) -> ExportOnnxReport:
    info = graph_info(target)
    written = attempt.written
    passed, verdict = _verdict(ref, target, attempt.checker, verification)
    fallback = attempt.passed_over or written.fallback_reason
    if fallback:
        skipped = "dynamo" if written.exporter_used == "legacy" else "legacy"
        warnings.insert(0, f"{skipped} exporter failed, used the {written.exporter_used} exporter: {fallback}")
    if written.fixed_dims:
        warnings.insert(0, f"the exporter fixed dims asked to be dynamic: {', '.join(written.fixed_dims)} "
                           "(the model's code depends on them; other sizes will fail)")
    custom = [domain for domain in info.op_domains if domain not in ("ai.onnx", "ai.onnx.ml")]
    if custom:
        notes.append(f"the graph uses {', '.join(custom)} operators: it runs on ONNX Runtime only")
    dims = sorted({name for axes in written.dynamic_axes.values() for name in axes.values()})
    return ExportOnnxReport(
        model=str(ref), output=str(target), files=files, exporter_used=written.exporter_used,
        fallback_reason=fallback, opset=info.opset, dynamic_dims=tuple(dims),
        external_data=data_file(target).name in files, inputs=info.inputs, outputs=info.outputs, nodes=info.nodes,
        checker=attempt.checker, optimize_passes=tuple(passes), verification=verification,
        stages={k: round(v, 4) for k, v in stages.items()}, passed=passed, verdict=verdict,
        export_sizes=dict(example.sizes), notes=tuple(notes), warnings=tuple(warnings))


def _verdict(ref: ModelRef, target: Path, checker: str, verification: ParityReport | None) -> tuple[bool, str]:
    if not checker.startswith("passed"):
        return False, f"onnx.checker rejected {target.name}: {checker.removeprefix('failed: ')}"
    if verification is None:
        return True, f"exported {target.name} (checker passed; not verified: --no-verify)"
    if verification.passed:
        return True, f"{target.name} matches {ref}: {verification.verdict}"
    return False, f"{target.name} does not match {ref}: {verification.verdict}"
