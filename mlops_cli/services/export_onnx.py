"""`mlops export onnx`: export a model to ONNX and prove the file computes what the model computes.

The service orchestrates; the writing engine (exporters, dynamic dims, metadata, external data, checker,
graph facts) is `core/onnx_export.py`. `run` resolves the input plan once, writes into a temporary folder
beside the output, runs `onnx.checker`, verifies the file with the parity engine on the plan's input sets
(the user's sizes first, then others), optionally optimises the graph (each pass re-verified, rejected when
it changes the outputs), and then moves the file(s) into place, so a re-export never leaves a stale `.data`
file behind. A file that fails verification is still moved into place: the report says so (exit 6).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mlops_cli.core.contract import ModelRef, OutputOptions, Report
from mlops_cli.core.errors import OutputError, UsageError
from mlops_cli.core.inputs import InputPlan, InputRequest, InputSet
from mlops_cli.core.loading import LoadedModel, ModelKind
from mlops_cli.core.onnx_export import (
    DYNAMIC_DIM_NAMES,
    EXPORTERS,
    OPSETS,
    GraphValue,
    OnnxWriteResult,
    check_exportable,
    data_file,
    exporter_failure,
    graph_info,
    move_into_place,
    quiet_exporters,
    run_checker,
    save_model_proto,
    write_onnx,
)
from mlops_cli.core.parity import ParityReport, Tolerances

OPTIMIZERS = ("none", "slim", "ort", "all")

__all__ = ["ExportOnnxOptions", "ExportOnnxReport", "OptimizePass", "run", "write_onnx"]  # write_onnx: for `view`


@dataclass(frozen=True)
class OptimizePass:
    """One optimisation pass: node counts before/after and whether its result was kept."""

    name: str
    nodes_before: int
    nodes_after: int | None
    accepted: bool
    reason: str
    seconds: float


@dataclass(frozen=True, kw_only=True)
class ExportOnnxOptions(OutputOptions):
    """Everything `export onnx` can be asked to do (the command's options)."""

    inputs: InputRequest = field(default_factory=InputRequest)  # --input specs, --batch-size, --seq-len, --seed
    opset: int = 20
    static: bool = False
    exporter: str = "auto"
    external_data: bool = False
    verify: bool = True
    optimize: str = "none"
    tolerances: Tolerances = field(default_factory=Tolerances)
    include_padding: bool = False
    device: str = "auto"
    repeats: int = 10  # timed runs per side and shape in the verification; 0 skips timing
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
    from mlops_cli.core.loading import load_model
    from mlops_cli.core.timing import Stopwatch

    _check_options(options)
    target = _checked_output(ref, options)
    watch = Stopwatch()
    with watch.stage("load"):
        loaded = load_model(ref, options.load)
        check_exportable(loaded, options.exporter, options.opset)
        plan = plan_inputs(loaded, options.inputs)
    warnings = list(loaded.warnings)
    workdir = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        current = workdir / target.name
        example = plan.example if options.static else plan.export_example(tuple(DYNAMIC_DIM_NAMES))
        options.on_step("exporting")
        with watch.stage("export"):
            written = write_onnx(loaded, current, example, dynamic=not options.static, opset=options.opset,
                                 exporter=options.exporter, external_data=options.external_data,
                                 specs=plan.specs, keep_metadata=options.keep_metadata)
        options.on_step("checking")
        with watch.stage("check"):
            checker = run_checker(current)
        verification: ParityReport | None = None
        passes: list[_Pass] = []
        notes: list[str] = []
        if options.verify and checker.startswith("passed"):  # ONNX Runtime may not even load a rejected graph
            verify = _verifier(loaded, plan, options, notes)
            options.on_step("verifying")
            with watch.stage("verify"):
                verification = verify(current)
            if options.optimize != "none":
                options.on_step("optimising")
                with watch.stage("optimize"):
                    current, passes = _optimize(current, workdir, options.optimize, verify, verification)
                verification = next((p.report for p in reversed(passes) if p.accepted), verification)
        with watch.stage("write"):
            files = move_into_place(current, target)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return _report(ref, target, files, written, example, checker, passes, verification, watch.stages,
                   warnings, notes)


def _checked_output(ref: ModelRef, options: ExportOnnxOptions) -> Path:
    """The output path, refused before any work when it is a folder, exists (without --force), or would
    overwrite the input; the same rules for the `.data` file the export may write or remove beside it."""
    from mlops_cli.core.io import check_output

    target = Path(options.output)
    if target.is_dir():
        raise OutputError(f"output {target} is a folder", hint="Give a file path such as model.onnx.")
    check_output(target, options.force, ref.sources)
    data = data_file(target)
    # Beside an output being overwritten (--force) the .data is that model's weights; beside a new output it
    # belongs to something else: not ours to delete.
    if not options.force and (data.exists() or data.is_symlink()):
        raise OutputError(f"{data} already exists beside the new output {target.name}: the export would "
                          "replace or delete it", hint="Move it away, choose another output name, or pass --force.")
    check_output(data, True, ref.sources)
    return target


def _check_options(options: ExportOnnxOptions) -> None:
    if options.optimize not in OPTIMIZERS:
        raise UsageError(f"unknown --optimize {options.optimize!r}", hint=f"Use one of: {', '.join(OPTIMIZERS)}.")
    if options.repeats < 0:
        raise UsageError("--repeats must be 0 (no timing) or more")
    if options.optimize != "none" and not options.verify:
        raise UsageError("--optimize needs verification (a pass that changes the outputs must be rejected)",
                         hint="Drop --no-verify.")
    if options.exporter not in EXPORTERS:
        raise UsageError(f"unknown --exporter {options.exporter!r}", hint=f"Use one of: {', '.join(EXPORTERS)}.")
    if options.opset not in OPSETS:
        raise UsageError(f"--opset {options.opset} is not supported",
                         hint=f"Use one of: {', '.join(map(str, OPSETS))}.")


def _verifier(loaded: LoadedModel, plan: InputPlan, options: ExportOnnxOptions, notes: list[str]) -> Verify:
    """A function `path -> ParityReport` comparing an ONNX file with the loaded model on the plan's input sets."""
    from mlops_cli.core.parity import check_parity
    from mlops_cli.core.runtimes import device_for, onnx_runner, runner_for

    input_sets = list(plan.sets)
    if options.static:
        example = plan.example
        input_sets = [InputSet(f"example (static) {example.label}", example.tensors, example.sizes)]
        notes.append("static export: verified at the example shape only (other shapes are rejected by design)")
    reference = runner_for(loaded, device_for(loaded, options.device))

    def verify(path: Path) -> ParityReport:
        onnx_model = LoadedModel(str(path), ModelKind.ONNX, None, path=path)
        candidate = onnx_runner(onnx_model, device_for(onnx_model, options.device))
        candidate.name = str(path.name)
        return check_parity(reference, candidate, input_sets, options.tolerances,
                            include_masked=options.include_padding, time_runs=options.repeats > 0,
                            repeats=options.repeats)

    return verify


# ---------------------------------------------------------------- optimisation passes


@dataclass(frozen=True)
class _Pass:
    name: str
    nodes_before: int
    nodes_after: int | None
    accepted: bool
    reason: str
    seconds: float
    report: ParityReport | None

    def public(self) -> OptimizePass:
        return OptimizePass(self.name, self.nodes_before, self.nodes_after, self.accepted, self.reason, self.seconds)


def _optimize(current: Path, workdir: Path, which: str, verify: Verify,
              baseline: ParityReport) -> tuple[Path, list[_Pass]]:
    """Run the asked passes in order; keep each one only if the result still passes verification."""
    passes: list[_Pass] = []
    steps = {"slim": ["onnxslim"], "ort": ["onnxruntime"], "all": ["onnxslim", "onnxruntime"]}[which]
    for name in steps:
        started = time.perf_counter()
        out_dir = workdir / f"pass-{name}"
        out_dir.mkdir()
        candidate = out_dir / current.name
        before = graph_info(current).nodes
        try:
            (_slim if name == "onnxslim" else _ort_offline)(current, candidate)
            report = verify(candidate)
        except Exception as exc:
            passes.append(_Pass(name, before, None, False, f"pass failed: {exporter_failure(exc)}",
                                time.perf_counter() - started, None))
            continue
        after = graph_info(candidate).nodes
        if report.passed:
            reason = "outputs unchanged within tolerance"
        elif not baseline.passed:
            reason = "not kept: the export itself fails verification"
        else:
            reason = f"rejected, changes the outputs: {report.verdict}"
        passes.append(_Pass(name, before, after, report.passed, reason, time.perf_counter() - started, report))
        if report.passed:
            current = candidate
    return current, passes


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


def _report(ref: ModelRef, target: Path, files: dict[str, int], written: OnnxWriteResult, example: InputSet,
            checker: str, passes: list[_Pass], verification: ParityReport | None, stages: dict[str, float],
            warnings: list[str], notes: list[str]) -> ExportOnnxReport:
    info = graph_info(target)
    passed, verdict = _verdict(ref, target, checker, verification)
    if written.fallback_reason:
        warnings.insert(0, f"dynamo exporter failed, used the legacy exporter: {written.fallback_reason}")
    if written.fixed_dims:
        warnings.insert(0, f"the exporter fixed dims asked to be dynamic: {', '.join(written.fixed_dims)} "
                           "(the model's code depends on them; other sizes will fail)")
    custom = [domain for domain in info.op_domains if domain not in ("ai.onnx", "ai.onnx.ml")]
    if custom:
        notes.append(f"the graph uses {', '.join(custom)} operators: it runs on ONNX Runtime only")
    dims = sorted({name for axes in written.dynamic_axes.values() for name in axes.values()})
    return ExportOnnxReport(
        model=str(ref), output=str(target), files=files, exporter_used=written.exporter_used,
        fallback_reason=written.fallback_reason, opset=info.opset, dynamic_dims=tuple(dims),
        external_data=data_file(target).name in files, inputs=info.inputs, outputs=info.outputs, nodes=info.nodes,
        checker=checker, optimize_passes=tuple(p.public() for p in passes), verification=verification,
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
