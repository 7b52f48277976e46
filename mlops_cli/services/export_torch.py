"""`mlops export jit` and `mlops export pt2`: TorchScript and torch.export artefacts, verified at several shapes.

A trace records one run of the model: Python control flow that depends on a shape (`if x.shape[0] > 2`,
a loop over `x.size(1)`) is frozen at the traced shape, and torch.export specialises such dims the same
way. So every artefact is written, loaded back through the MODEL reference rules, and compared with the
eager model by the parity engine on the export shape AND on other batch/sequence sizes. A shape-specialised
export fails with exit 6 naming the shape that broke instead of passing at the one shape it was made with;
the failing artefact is kept beside the verdict for inspection, as `export onnx` does (`keep_failed=False`
writes nothing then).

Models are wrapped (`PositionalModel`) so the artefact takes positional tensors in the order of the input
specs (input_ids, attention_mask, token_type_ids for BERT) and returns a dict of named tensors when the
model returns a dict or a Hugging Face ModelOutput; that order is stored in the archive as `mlops.json`.
"""

from __future__ import annotations

import contextlib
import json
import keyword
import logging
import os
import shutil
import tempfile
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mlops_cli import __version__
from mlops_cli.core.contract import ModelRef, OutputOptions, Report
from mlops_cli.core.errors import InputError, UsageError
from mlops_cli.core.formats import Format, detect_format
from mlops_cli.core.inputs import InputRequest, InputSet, InputSpec, plan_inputs
from mlops_cli.core.io import atomic_file, check_output
from mlops_cli.core.loading import LoadedModel, LoadOptions, ModelKind, load_model
from mlops_cli.core.parity import ParityReport, Tolerances, check_parity
from mlops_cli.core.runtimes import (
    Runner,
    flatten_outputs,
    forward_parameter_names,
    gather_on_cpu,
    run_device,
    runner_for,
)
from mlops_cli.core.timing import Stopwatch

METADATA_FILE = "mlops.json"  # stored inside both archives: input order, dtypes, dims, output names
SKIPPED_OUTPUTS = ("past_key_values", "cache")  # caches are not results (same rule as core/runtimes)
JIT_MODES = ("trace", "script")
MODES = (*JIT_MODES, "export")  # export: torch.export


@dataclass(frozen=True, kw_only=True)
class TorchExportOptions(OutputOptions):
    """`export jit` (mode trace or script: TorchScript) and `export pt2` (mode export: torch.export, and an
    AOTInductor package at `aoti_output` when given): inputs, verification and output handling."""

    mode: str = "trace"
    aoti_output: Path | None = None
    inputs: InputRequest = field(default_factory=InputRequest)  # --input specs, --batch-size, --seq-len, --seed
    tolerances: Tolerances = field(default_factory=Tolerances)
    device: str = "cpu"
    repeats: int = 0  # timed runs per shape in the verification; 0 (default) = no timing
    keep_failed: bool = True  # keep an artefact that fails verification (exit 6 either way), as export onnx does


@dataclass(frozen=True)
class ArtefactInput:
    """One positional argument of the artefact, in order."""

    position: int
    name: str
    dtype: str
    example_shape: tuple[int, ...]
    dims: tuple[str, ...]  # per axis: a named dim ('batch', 'sequence') or its fixed size


@dataclass(frozen=True)
class DynamicDim:
    """What torch.export made of a named (varied) dim: dynamic with a range, or fixed at the export size."""

    input: str
    axis: int
    name: str
    export_size: int
    dynamic: bool
    min: int | None = None
    max: int | None = None  # None: unbounded


@dataclass(frozen=True)
class Artefact:
    """One written (or rejected) file and its verification against the eager model."""

    path: str
    format: str
    written: bool
    file_bytes: int | None
    parity: ParityReport


@dataclass(frozen=True, kw_only=True)
class TorchExportReport(Report):
    exporter: str  # "torchscript" or "torch.export"
    mode: str  # trace, script, export
    source: str
    source_kind: str
    device: str
    inputs: tuple[ArtefactInput, ...]
    outputs: tuple[str, ...]
    output_structure: str  # tensor, dict or tuple
    wrapped: bool  # positional wrapper around a keyword/ModelOutput model
    artefacts: tuple[Artefact, ...]
    stages: dict[str, float]  # seconds per stage
    passed: bool
    verdict: str
    dynamic_dims: tuple[DynamicDim, ...] = ()
    tracer_warnings: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    export_sizes: dict[str, int] = field(default_factory=dict)  # sizes of the example the artefact was made with


# ---------------------------------------------------------------- entry points


def run(ref: ModelRef, options: TorchExportOptions) -> TorchExportReport:
    """Export `ref` as `options.mode` asks (TorchScript trace/script, or torch.export), load the artefact back and
    verify it against the eager model at the export shape and at the plan's other sizes."""
    if options.mode not in MODES:
        raise UsageError(f"unknown mode {options.mode!r}", hint=f"Use one of: {', '.join(MODES)}.")
    if options.aoti_output is not None and options.mode != "export":
        raise UsageError("an AOTInductor package is compiled from a torch.export program", hint="Use export pt2.")
    return _export_program(ref, options) if options.mode == "export" else _export_torchscript(ref, options)


def _export_torchscript(ref: ModelRef, options: TorchExportOptions) -> TorchExportReport:
    """Trace (or script) a model to TorchScript, save it, load it back and verify it at several shapes."""
    import torch

    output = check_output(options.output, options.force, ref.sources)
    watch = Stopwatch()
    job = _prepare(ref, options, watch)
    recorded: list[warnings.WarningMessage] = []
    mode = options.mode
    options.on_step("exporting")
    with watch.stage(mode), _quiet_torch(recorded):
        program = _script(job) if mode == "script" else _trace(job)
    metadata = _metadata("torchscript", job, mode)

    def save(path: Path) -> None:
        with open(path, "wb") as handle:
            torch.jit.save(program, handle, _extra_files={METADATA_FILE: metadata})

    artefact = _write_verified(output, Format.TORCHSCRIPT, ("save", save), lambda path: _reloaded_runner(path, job),
                               job, options, watch)
    return _report(job, "torchscript", mode, (artefact,), watch, tracer_warnings=_tracer_warnings(recorded))


def _export_program(ref: ModelRef, options: TorchExportOptions) -> TorchExportReport:
    """torch.export with dynamic batch/sequence dims, saved, loaded back and verified at several shapes;
    with `aoti_output`, also an AOTInductor package (compiled C++), verified the same way."""
    import torch

    output = check_output(options.output, options.force, ref.sources)
    aoti_path = None if options.aoti_output is None else check_output(options.aoti_output, options.force,
                                                                      ref.sources)
    if aoti_path is not None:
        if aoti_path.resolve() == output.resolve():
            raise UsageError("the AOTInductor package path must differ from --output")
        find_cxx_compiler()
    watch = Stopwatch()
    job = _prepare(ref, options, watch)
    options.on_step("exporting")
    with watch.stage("torch.export"), _quiet_torch():
        program = _export(job)
    metadata = _metadata("torch-export-pt2", job, "export")

    def save(path: Path) -> None:
        with open(path, "wb") as handle:
            torch.export.save(program, handle, extra_files={METADATA_FILE: metadata})

    artefacts = [_write_verified(output, Format.EXPORTED_PROGRAM, ("save", save),
                                 lambda path: _reloaded_runner(path, job), job, options, watch)]
    if aoti_path is not None and artefacts[0].parity.passed:
        options.on_step("compiling")
        compile_package = ("AOTInductor compile", lambda path: _compile_aoti(program, path, aoti_path.name))
        artefacts.append(_write_verified(aoti_path, Format.AOTI_PACKAGE, compile_package,
                                         lambda path: aoti_runner(path, str(aoti_path), job.names, job.device),
                                         job, options, watch, prefix="AOTI "))
    dynamic_dims = _dynamic_dims(program, job)
    notes = [f"torch.export fixed {d.input}[{d.axis}] ({d.name}) at {d.export_size}: the model's code depends on "
             "that size, so the program refuses others" for d in dynamic_dims if not d.dynamic]
    if aoti_path is not None and len(artefacts) == 1:
        notes.append("the AOTInductor package was not compiled: the torch.export program failed its verification")
    return _report(job, "torch.export", "export", tuple(artefacts), watch, dynamic_dims=dynamic_dims, notes=notes)


# ---------------------------------------------------------------- preparing the model and its inputs


@dataclass
class _Job:
    """Everything the export steps share once the model is loaded."""

    loaded: LoadedModel
    device: str
    specs: list[InputSpec]
    names: list[str]  # positional order of the artefact's inputs
    example: InputSet
    input_sets: list[InputSet]
    reference: Runner
    wrapper: Any  # PositionalModel
    output_names: list[str]
    output_structure: str
    notes: list[str]  # what the preparation changed, e.g. an example raised off size 1
    sources: list[Path]  # what an artefact must never overwrite

    def example_args(self) -> tuple[Any, ...]:
        import torch

        return tuple(torch.from_numpy(np.ascontiguousarray(self.example.tensors[name])).to(self.device)
                     for name in self.names)


def _prepare(ref: ModelRef, options: TorchExportOptions, watch: Stopwatch) -> _Job:
    import torch

    with watch.stage("load"), _quiet_torch():
        loaded = load_model(ref, options.load)
    gather_on_cpu(loaded, "export")
    reference = loaded.reference
    if loaded.kind == ModelKind.ONNX or not loaded.is_torch:
        raise InputError(f"{reference} is an ONNX model: there is no PyTorch code to export",
                         hint="Pass the PyTorch model (a folder, weights + --arch, or builtin:NAME).")
    device = run_device(loaded, options.device)  # a gathered model stays on CPU for --device auto
    plan = plan_inputs(loaded, options.inputs)
    specs = _in_forward_order(list(plan.specs), forward_parameter_names(loaded.module) or [])
    example = plan.export_example(tuple(dim.name for spec in specs for dim in spec.dims if dim.name))
    notes = [] if example is plan.example else [_raised_note(plan.example, example)]
    reference_runner = runner_for(loaded, device)  # also moves the model to `device`
    names = [spec.name for spec in specs]
    wrapper = PositionalModel.build(loaded, names)
    try:
        with torch.inference_mode(), _quiet_torch():
            sample = wrapper(*(torch.from_numpy(example.tensors[name]).to(device) for name in names))
    except Exception as exc:
        shapes = ", ".join(f"{name}{list(example.tensors[name].shape)}" for name in names)
        raise InputError(f"{reference} fails on the example inputs ({shapes}): {_describe(exc)}",
                         hint="Describe the model's inputs with --input name:dtype[dims].") from exc
    structure = "tensor" if isinstance(sample, torch.Tensor) else "dict" if isinstance(sample, dict) else "tuple"
    return _Job(loaded, device, specs, names, example, _verification_sets(example, list(plan.sets)),
                reference_runner, wrapper, list(flatten_outputs(sample)), structure, notes, ref.sources)


def _raised_note(asked: InputSet, example: InputSet) -> str:
    """Why the artefact was made at other sizes than the user's: exporters fix size-1 dims."""
    changed = [name for name, size in example.sizes.items() if asked.sizes.get(name) != size]
    raised = ", ".join(f"{name}={example.sizes[name]}" for name in changed)
    kept = ", ".join(f"{name}={asked.sizes[name]}" for name in changed)
    return (f"exported at {raised}, not {kept}: exporters fix size-1 dims (torch.export specialises them, a trace "
            f"may bake them in), so the example was regenerated at size 2; verified at {kept} too")


def _in_forward_order(specs: list[InputSpec], parameters: list[str]) -> list[InputSpec]:
    """The artefact's positional order: the model's own argument order when the specs name its arguments."""
    if not {spec.name for spec in specs} <= set(parameters):
        return specs
    return sorted(specs, key=lambda spec: parameters.index(spec.name))


def _verification_sets(example: InputSet, shape_sets: list[InputSet]) -> list[InputSet]:
    """The export shape first (a failure there is a plain bug), then the other shapes (specialisation)."""
    exported = InputSet(f"{example.label} (export shape)", example.tensors, example.sizes)
    return [exported, *(s for s in shape_sets if s.sizes != example.sizes)]


class _Lazy:
    """The wrapper class needs torch.nn.Module, so it is defined on first use (not at import)."""

    base: type | None = None


def _wrapper_base() -> type:
    if _Lazy.base is not None:
        return _Lazy.base
    import torch

    class PositionalBase(torch.nn.Module):
        """Calls the model with named inputs and turns dict/ModelOutput results into a dict of tensors."""

        def __init__(self, model: Any, names: list[str], by_name: bool, extra: dict[str, Any]) -> None:
            super().__init__()
            self.model = model
            self.input_names = names
            self.by_name = by_name
            self.extra = extra

        def run(self, tensors: tuple[Any, ...]) -> Any:
            if self.by_name:
                output = self.model(**dict(zip(self.input_names, tensors, strict=True)), **self.extra)
            else:
                output = self.model(*tensors)
            return named_outputs(output)

    _Lazy.base = PositionalBase
    return PositionalBase


class PositionalModel:
    """Builds the module that is traced/exported: `forward(input_ids, attention_mask, ...)` with real
    parameter names, so TorchScript schemas, torch.export signatures and C++ callers see them."""

    @staticmethod
    def build(loaded: LoadedModel, names: list[str]) -> Any:
        model = loaded.module
        parameters = forward_parameter_names(model) or []
        by_name = set(names) <= set(parameters)
        extra: dict[str, Any] = {}
        if loaded.kind == ModelKind.HF:
            extra = {k: v for k, v in (("use_cache", False), ("return_dict", True)) if k in parameters}
        bad = [n for n in names if not n.isidentifier() or keyword.iskeyword(n) or n in ("self", "run")]
        if bad:
            raise UsageError(f"input name(s) {', '.join(map(repr, bad))} cannot be argument names of an exported model",
                             hint="Name the inputs with --input using Python identifiers (letters, digits, _).")
        arguments = ", ".join(names)
        # A generated forward is the only way to give the traced/exported signature the inputs' real names.
        source = f"def forward(self, {arguments}):\n    return self.run(({arguments},))\n"
        namespace: dict[str, Any] = {}
        exec(compile(source, "<mlops positional forward>", "exec"), namespace)
        cls = type("PositionalModel", (_wrapper_base(),), {"forward": namespace["forward"]})
        return cls(model, names, by_name, extra).eval()


def named_outputs(output: Any) -> Any:
    """A dict/ModelOutput becomes a flat dict of tensors named like core/runtimes.flatten_outputs names them
    (so parity pairs outputs by name); tensors and tuples pass through."""
    import torch

    if isinstance(output, torch.Tensor) or not hasattr(output, "keys"):
        return output
    result: dict[str, torch.Tensor] = {}
    for key in output.keys():  # noqa: SIM118 - ModelOutput and dict alike
        value = output[key]
        if key in SKIPPED_OUTPUTS:
            continue
        if isinstance(value, torch.Tensor):
            result[str(key)] = value
        elif isinstance(value, (tuple, list)) and value and all(isinstance(v, torch.Tensor) for v in value):
            result.update({f"{key}.{i}": v for i, v in enumerate(value)})
    return result


# ---------------------------------------------------------------- the three exporters


def _trace(job: _Job) -> Any:
    import torch

    try:
        return torch.jit.trace(job.wrapper, job.example_args(), strict=False, check_trace=False)
    except Exception as exc:
        raise InputError(f"torch.jit.trace failed on {job.loaded.reference}: {_describe(exc)}",
                         hint="Check --input (names, dtypes, shapes); rerun with MLOPS_DEBUG=1 for the torch "
                              "error. `mlops export pt2` (torch.export) may handle the model.") from exc


def _script(job: _Job) -> Any:
    import torch

    try:
        return torch.jit.script(job.loaded.module)
    except Exception as exc:
        raise InputError(f"torch.jit.script cannot compile {job.loaded.reference}: {_describe(exc)}",
                         hint="Scripting needs TorchScript-compatible Python (most Hugging Face models are not). "
                              "Use --mode trace (the default): mlops verifies the trace at several shapes.") from exc


def _export(job: _Job) -> Any:
    import torch

    dynamic = {spec.name: {axis: torch.export.Dim.AUTO for axis, dim in enumerate(spec.dims) if dim.name}
               for spec in job.specs}
    # Keyword inputs: the program is then called by name (core/runtimes' runner, AOTInductor's Python API);
    # the flat order C++ AOTI callers use is still the documented one.
    kwargs = dict(zip(job.names, job.example_args(), strict=True))
    try:
        return torch.export.export(job.wrapper, (), kwargs=kwargs, dynamic_shapes=dynamic, strict=False)
    except Exception as exc:
        data_dependent = "data-dependent" in str(exc) or "DataDependent" in type(exc).__name__
        hint = ("The model branches on tensor VALUES: torch.export needs torch.cond (or torch._check) there; "
                "`mlops export jit --mode script` keeps Python control flow."
                if data_dependent else "Rerun with MLOPS_DEBUG=1 for the torch error; check --input.")
        raise InputError(f"torch.export failed on {job.loaded.reference}: {_describe(exc)}", hint=hint) from exc


def find_cxx_compiler() -> str:
    """The C++ compiler AOTInductor will use ($CXX, c++, g++ or clang++); UsageError when there is none."""
    for candidate in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if candidate and shutil.which(candidate):
            return str(shutil.which(candidate))
    raise UsageError("--aoti needs a C++ compiler (g++ or clang++) and none was found on PATH",
                     hint="Install one (e.g. apt-get install g++), set CXX, or drop --aoti.")


def _compile_aoti(program: Any, path: Path, final_name: str) -> None:
    """Compile into a private folder under the final name (the archive is named after its file), then move
    the package onto `path` (the atomic writer's temporary file)."""
    from torch._inductor import aoti_compile_and_package

    staging = Path(tempfile.mkdtemp(prefix=".aoti-", dir=path.parent))
    try:
        package = staging / (final_name if final_name.endswith(".pt2") else f"{final_name}.pt2")
        aoti_compile_and_package(program, package_path=str(package))
        os.replace(package, path)
    except Exception as exc:
        raise InputError(f"AOTInductor compilation failed: {_describe(exc)}",
                         hint="Rerun with MLOPS_DEBUG=1 for the compiler output.") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# ---------------------------------------------------------------- writing and verifying


class _Rejected(Exception):
    """Raised inside atomic_file to abandon an artefact that failed verification."""

    def __init__(self, parity: ParityReport) -> None:
        super().__init__(parity.verdict)
        self.parity = parity


def _write_verified(output: Path, fmt: Format, write: tuple[str, Callable[[Path], None]],
                    open_runner: Callable[[Path], Runner], job: _Job, options: TorchExportOptions,
                    watch: Stopwatch, prefix: str = "") -> Artefact:
    """Write to a temporary file, load it back, verify it; move it into place only if it passed."""
    write_stage, write_file = write
    try:
        with atomic_file(output, options.force, job.sources) as temp, _quiet_torch():
            with watch.stage(write_stage):
                write_file(temp)
            with watch.stage(f"{prefix}reload"):
                detected = detect_format(temp)
                if detected != fmt:
                    raise InputError(f"the written file is detected as {detected.value}, not {fmt.value}")
                candidate = open_runner(temp)
                candidate.name = str(output)
            options.on_step(f"{prefix}verifying")
            with watch.stage(f"{prefix}verify"):
                parity = check_parity(job.reference, candidate, job.input_sets, options.tolerances,
                                      time_runs=options.repeats > 0, repeats=max(options.repeats, 1))
            if not (parity.passed or options.keep_failed):
                raise _Rejected(parity)
    except _Rejected as rejected:
        return Artefact(str(output), fmt.value, False, None, rejected.parity)
    return Artefact(str(output), fmt.value, True, output.stat().st_size, parity)


def _reloaded_runner(path: Path, job: _Job) -> Runner:
    """Load the written file back through the MODEL reference rules (we wrote it, so its code is trusted)."""
    return runner_for(load_model(str(path), LoadOptions(trust_code=True)), job.device)


def aoti_runner(path: str | Path, name: str, input_names: list[str], device: str = "cpu") -> Runner:
    """Run an AOTInductor package made by `export_program` (keyword inputs) through the Runner interface.

    core/loading does not load AOTI packages yet, so the export service carries this runner itself.
    """
    import torch
    from torch._inductor import aoti_load_package

    device_index = (torch.device(device).index or 0) if device.startswith("cuda") else -1
    try:
        compiled = aoti_load_package(str(path), device_index=device_index)
    except Exception as exc:
        raise InputError(f"{path} could not be loaded as an AOTInductor package: {_describe(exc)}") from exc

    def call(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [n for n in input_names if n not in inputs]
        if missing:
            raise InputError(f"{name} needs inputs that were not given: {', '.join(missing)}")
        tensors = {n: torch.from_numpy(np.ascontiguousarray(inputs[n])).to(device) for n in input_names}
        with torch.inference_mode():
            return flatten_outputs(compiled(**tensors))

    return Runner(name, "aotinductor", device, list(input_names), call)


# ---------------------------------------------------------------- report pieces


def _report(job: _Job, exporter: str, mode: str, artefacts: tuple[Artefact, ...], watch: Stopwatch,
            **extra: Any) -> TorchExportReport:
    passed = all(a.parity.passed for a in artefacts)
    failed = next((a for a in artefacts if not a.parity.passed), None)
    verdict = (f"{len(artefacts)} artefact(s) match the eager model on {len(job.input_sets)} input set(s)"
               if failed is None else f"{Path(failed.path).name}: {failed.parity.verdict}")
    notes = [*job.notes, *extra.pop("notes", [])]
    if failed is not None:
        notes.append(f"{failed.path} was kept for inspection; it failed verification (--discard-failed drops it)"
                     if failed.written else f"{failed.path} was not written (verification failed, --discard-failed)")
    return TorchExportReport(
        exporter=exporter, mode=mode, source=job.loaded.reference, source_kind=job.loaded.kind.value,
        device=job.device, inputs=_artefact_inputs(job), outputs=tuple(job.output_names),
        output_structure=job.output_structure, wrapped=mode != "script", artefacts=artefacts,
        stages={name: round(seconds, 4) for name, seconds in watch.stages.items()},
        passed=passed, verdict=verdict, notes=tuple(notes), warnings=tuple(job.loaded.warnings),
        export_sizes=dict(job.example.sizes), **extra)


def _artefact_inputs(job: _Job) -> tuple[ArtefactInput, ...]:
    return tuple(
        ArtefactInput(index, spec.name, spec.dtype, tuple(job.example.tensors[spec.name].shape),
                      tuple(dim.name or str(dim.size) for dim in spec.dims))
        for index, spec in enumerate(job.specs))


def _metadata(fmt: str, job: _Job, mode: str) -> str:
    """The archive's own description of its interface (read by examples/ and C++ callers)."""
    return json.dumps({
        "format": fmt, "mode": mode, "mlops_version": __version__, "source": job.loaded.reference,
        "inputs": [{"name": a.name, "dtype": a.dtype, "dims": list(a.dims), "example_shape": list(a.example_shape)}
                   for a in _artefact_inputs(job)],
        "outputs": job.output_names, "output_structure": job.output_structure, "device": job.device,
    }, indent=1)


def _dynamic_dims(program: Any, job: _Job) -> tuple[DynamicDim, ...]:
    """Which named dims torch.export kept dynamic (and their ranges) and which it fixed."""
    import torch

    user_inputs = list(program.graph_signature.user_inputs)
    placeholders = {node.name: node for node in program.graph.nodes if node.op == "placeholder"}
    result = []
    for spec, placeholder_name in zip(job.specs, user_inputs, strict=True):
        shape = placeholders[placeholder_name].meta["val"].shape
        for axis, dim in enumerate(spec.dims):
            if not dim.name:
                continue
            size = shape[axis]
            expression = size.node.expr if isinstance(size, torch.SymInt) else None
            if expression is None or not expression.free_symbols:  # a plain int or a constant SymInt: fixed
                result.append(DynamicDim(spec.name, axis, dim.name, int(size), False, int(size), int(size)))
                continue
            bounds = program.range_constraints.get(expression)
            lower = int(bounds.lower) if bounds is not None and bounds.lower.is_Integer else None
            upper = int(bounds.upper) if bounds is not None and bounds.upper.is_Integer else None  # int_oo: None
            result.append(DynamicDim(spec.name, axis, dim.name, job.example.tensors[spec.name].shape[axis],
                                     True, lower, upper))
    return tuple(result)


def _tracer_warnings(recorded: list[warnings.WarningMessage]) -> tuple[str, ...]:
    """TracerWarnings, one per source line: places where the trace may have frozen a Python decision."""
    seen: dict[str, str] = {}
    for warning in recorded:
        if warning.category.__name__ != "TracerWarning":
            continue
        where = f"{Path(warning.filename).name}:{warning.lineno}"
        seen.setdefault(where, f"{where}: {str(warning.message).split('. ')[0].strip()}")
    return tuple(seen.values())


# ---------------------------------------------------------------- helpers


@contextlib.contextmanager
def _quiet_torch(recorded: list[warnings.WarningMessage] | None = None) -> Iterator[None]:
    """Keep torch's deprecation warnings and log chatter out of the user's output (warnings are recorded
    when a list is given, so TracerWarnings can be reported properly)."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
        if recorded is not None:
            recorded.extend(caught)
    finally:
        logging.disable(previous)


def _describe(exc: BaseException) -> str:
    """First line of an exception plus the user-code line it came from (outside torch and mlops)."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    frame = _user_frame(exc)
    return f"{first} (at {frame})" if frame else first


def _user_frame(exc: BaseException) -> str | None:
    import torch

    skipped = (str(Path(torch.__file__).parent), str(Path(__file__).parents[1]), "<")
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith(skipped)]
    if not frames:
        return None
    frame = frames[-1]
    code = f": {frame.line.strip()}" if frame.line else ""
    return f"{Path(frame.filename).name}:{frame.lineno}{code}"
