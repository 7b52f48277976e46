"""`mlops export onnx`: export a model to ONNX and prove the file computes what the model computes.

Two layers:
- `write_onnx` is the low-level writer other commands reuse (`view`, `compress`): it exports a loaded
  model with example inputs to one path, with input/output names taken from the model, named dynamic
  batch/sequence dims shared across the text inputs, HF models called without caches, and the dynamo
  exporter falling back to the legacy (TorchScript) one when asked to, with the reason in one line.
- `export_onnx` is the command's service: it writes into a temporary folder beside the output, runs
  `onnx.checker`, verifies the file with the parity engine at shapes other than the example's,
  optionally optimises the graph (each pass re-verified, rejected when it changes the outputs), and
  then moves the file(s) into place, so a re-export never leaves a stale `.data` file behind.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mlops_cli.core.errors import InputError, OutputError, UsageError
from mlops_cli.core.inputs import TEXT_INPUTS, InputSet, InputSpec, specs_for
from mlops_cli.core.io import default_mode
from mlops_cli.core.loading import LoadedModel, LoadOptions, ModelKind
from mlops_cli.core.parity import Tolerances

EXPORTERS = ("auto", "dynamo", "legacy")
OPSETS = (18, 19, 20, 21)
LEGACY_MAX_OPSET = 20  # torch's TorchScript-based exporter stops at opset 20
OPTIMIZERS = ("none", "slim", "ort", "all")
# Weights above this go to an external `.data` file: protobuf cannot hold a model over 2 GiB, and the
# graph needs room too. The same threshold torch's dynamo exporter uses.
EXTERNAL_DATA_THRESHOLD = 1536 * 1024 * 1024
DYNAMIC_DIM_NAMES = {"batch": "batch", "sequence": "sequence", "seq": "sequence", "sequence_length": "sequence"}
_QUIET_LOGGERS = ("torch.onnx", "torch.export", "torch._dynamo", "torch.fx.experimental.symbolic_shapes",
                  "torch._export", "onnxscript")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


@dataclass(frozen=True)
class OnnxWriteResult:
    """What `write_onnx` wrote and how."""

    path: str
    exporter_used: str  # "dynamo" or "legacy"
    fallback_reason: str | None  # why `auto` fell back to the legacy exporter
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    dynamic_axes: dict[str, dict[int, str]]  # input name -> {axis: dim name}; empty when static
    opset: int
    external_data: bool
    seconds: float
    data_file: str | None = None  # the external `.data` file beside `path`, when written
    fixed_dims: tuple[str, ...] = ()  # dims asked to be dynamic that the exporter fixed, e.g. "x[0] (batch) = 2"


# ---------------------------------------------------------------- low-level writer


def write_onnx(loaded: LoadedModel, path: str | Path, example: InputSet, *, dynamic: bool = True, opset: int = 20,
               exporter: str = "auto", external_data: bool | None = None,
               specs: list[InputSpec] | None = None, keep_metadata: bool = False) -> OnnxWriteResult:
    """Export `loaded` to `path` (a plain write: callers handle atomicity) using `example` as inputs.

    `dynamic`: batch and sequence dims (named as in the input specs, shared across inputs) stay
    symbolic. `exporter`: auto (dynamo, then legacy on failure), dynamo or legacy. `external_data`:
    True forces weights into `<path>.data`, None/False writes one file unless the weights are too big.
    `specs` tells which axes are batch/sequence; by default they come from the model.
    `keep_metadata`: keep the dynamo exporter's debugging metadata (see `strip_exporter_metadata`).
    """
    import torch

    started = time.perf_counter()
    target = Path(path)
    _check_exportable(loaded, exporter, opset)
    input_names = list(example.tensors)
    axes = dynamic_axes_for(example, _specs_or_none(loaded, specs)) if dynamic else {}
    args = tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in _grow_dynamic_dims(example, axes).values())
    wrapper, output_names = _named_io_module(loaded, input_names, args)
    use_external = bool(external_data) or _weight_bytes(loaded.module) > EXTERNAL_DATA_THRESHOLD
    _remove_stale_data(target)
    if loaded.kind == ModelKind.TORCHSCRIPT:  # already a TorchScript graph: only the legacy exporter reads it
        wrapper, exporter = loaded.module, "legacy"
    elif loaded.kind == ModelKind.EXPORTED:  # a torch.export graph: only dynamo reads it, no fallback
        exporter = "dynamo"
    fallback_reason: str | None = None
    fixed: list[str] = []
    if exporter != "legacy":
        fallback_reason, fixed = _dynamo_or_reason(
            wrapper, args, target, input_names, output_names, _dim_bounds(loaded, axes), opset, use_external,
            may_fall_back=exporter == "auto", keep_metadata=keep_metadata)
    used = "dynamo" if exporter != "legacy" and fallback_reason is None else "legacy"
    if used == "legacy":
        _legacy_or_fail(wrapper, args, target, input_names, output_names, axes, opset, use_external, fallback_reason)
    data_file = _data_file(target)
    return OnnxWriteResult(
        path=str(target), exporter_used=used, fallback_reason=fallback_reason, input_names=tuple(input_names),
        output_names=tuple(output_names), dynamic_axes=axes, opset=opset, external_data=data_file.exists(),
        seconds=time.perf_counter() - started, data_file=str(data_file) if data_file.exists() else None,
        fixed_dims=tuple(fixed))


def _dynamo_or_reason(wrapper: Any, args: tuple[Any, ...], target: Path, input_names: list[str],
                      output_names: list[str], bounded: dict[str, dict[int, tuple[str, int | None]]], opset: int,
                      external: bool, *, may_fall_back: bool, keep_metadata: bool) -> tuple[str | None, list[str]]:
    """Export with dynamo. Returns (why the legacy exporter should take over, dims dynamo had to fix)."""
    try:
        _export_dynamo(wrapper, args, target, input_names, output_names, bounded, opset, external, keep_metadata)
    except Exception as exc:
        if not may_fall_back:
            raise InputError(f"the dynamo exporter failed: {exporter_failure(exc)}",
                             hint="Try --exporter legacy, or --static if a dim cannot be dynamic.") from exc
        reason = exporter_failure(exc)
    else:
        fixed = fixed_dims(target, {n: {a: d for a, (d, _) in axes.items()} for n, axes in bounded.items()})
        if not fixed or not may_fall_back:
            return None, fixed
        reason = f"dynamo fixed {', '.join(fixed)}: the model's code depends on that size"
    target.unlink(missing_ok=True)
    _remove_stale_data(target)
    return reason, []


def _legacy_or_fail(wrapper: Any, args: tuple[Any, ...], target: Path, input_names: list[str],
                    output_names: list[str], axes: dict[str, dict[int, str]], opset: int, external: bool,
                    fallback_reason: str | None) -> None:
    before = f"dynamo failed: {fallback_reason}" if fallback_reason else ""
    if opset > LEGACY_MAX_OPSET:
        raise UsageError(f"the legacy exporter supports opset <= {LEGACY_MAX_OPSET}, not {opset}"
                         + (f" ({before})" if before else ""), hint=f"Use --opset {LEGACY_MAX_OPSET} or lower.")
    try:
        _export_legacy(wrapper, args, target, input_names, output_names, axes, opset, external)
    except Exception as exc:
        raise InputError(f"ONNX export failed ({before + '; ' if before else ''}legacy failed: "
                         f"{exporter_failure(exc)})",
                         hint="Check that the model runs on the example inputs (--input), or try --static.") from exc


def exporter_failure(exc: BaseException) -> str:
    """One line saying why an exporter failed (torch's messages are pages long and coloured)."""
    text = _ANSI.sub("", str(exc))
    summary = text.split("## Exception summary", 1)[-1]
    for line in summary.splitlines():
        line = line.strip()
        if line and not line.startswith(("(Refer", "For more information", "- ", "#")):
            return re.sub(r"^<class '([\w.]+)'>:\s*", r"\1: ", line)[:300]
    return type(exc).__name__


def fixed_dims(path: Path, axes: dict[str, dict[int, str]]) -> list[str]:
    """Dims that were asked to be dynamic but came out of the exporter as fixed sizes.

    torch.export specialises a dim when the model's code branches on its size; the graph then only
    accepts the example's size (or computes the example's branch), so this is worth saying out loud.
    """
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    found = []
    for value in graph.input:
        for axis, name in axes.get(value.name, {}).items():
            dims = value.type.tensor_type.shape.dim
            if axis < len(dims) and dims[axis].HasField("dim_value"):
                found.append(f"{value.name}[{axis}] ({name}) = {dims[axis].dim_value}")
    return found


def dynamic_axes_for(example: InputSet, specs: list[InputSpec] | None) -> dict[str, dict[int, str]]:
    """Which axes of each input are the batch and sequence dims (named alike across inputs).

    From the specs when known; otherwise axis 0 of every input is `batch` and axis 1 of 2-D text
    inputs (input_ids, attention_mask, ...) is `sequence`. Other named dims (image height/width)
    stay fixed: most vision models check them.
    """
    by_name = {spec.name: spec for spec in specs or []}
    axes: dict[str, dict[int, str]] = {}
    for name, array in example.tensors.items():
        spec = by_name.get(name)
        if spec is not None and len(spec.dims) == array.ndim:
            found = {i: DYNAMIC_DIM_NAMES[d.name] for i, d in enumerate(spec.dims) if d.name in DYNAMIC_DIM_NAMES}
        else:
            found = {0: "batch"} if array.ndim else {}
            if name in TEXT_INPUTS and array.ndim == 2:
                found[1] = "sequence"
        if found:
            axes[name] = found
    return axes


def _check_exportable(loaded: LoadedModel, exporter: str, opset: int) -> None:
    if loaded.kind == ModelKind.ONNX:
        raise UsageError(f"{loaded.reference} is already an ONNX model",
                         hint="Use `mlops verify-parity` to compare it, or export the PyTorch model it came from.")
    if exporter not in EXPORTERS:
        raise UsageError(f"unknown --exporter {exporter!r}", hint=f"Use one of: {', '.join(EXPORTERS)}.")
    if loaded.kind == ModelKind.TORCHSCRIPT and exporter == "dynamo":
        raise UsageError("a TorchScript archive can only be exported by the legacy exporter",
                         hint="Use --exporter legacy (or auto), or export the original PyTorch model.")
    if loaded.kind == ModelKind.EXPORTED and exporter == "legacy":
        raise UsageError("a torch.export (.pt2) program can only be exported by the dynamo exporter",
                         hint="Use --exporter dynamo (or auto).")
    if opset not in OPSETS:
        raise UsageError(f"--opset {opset} is not supported", hint=f"Use one of: {', '.join(map(str, OPSETS))}.")


def _specs_or_none(loaded: LoadedModel, specs: list[InputSpec] | None) -> list[InputSpec] | None:
    if specs is not None:
        return specs
    try:
        return specs_for(loaded)
    except UsageError:
        return None


def _grow_dynamic_dims(example: InputSet, axes: dict[str, dict[int, str]]) -> dict[str, np.ndarray]:
    """Repeat size-1 dynamic axes to size 2: exporters specialise dims of size 0/1 to constants."""
    tensors = {}
    for name, array in example.tensors.items():
        for axis in axes.get(name, {}):
            if array.shape[axis] == 1:
                array = np.concatenate([array, array], axis=axis)
        tensors[name] = array
    return tensors


def _weight_bytes(module: Any) -> int:
    tensors = list(module.parameters()) + list(module.buffers()) if hasattr(module, "parameters") else []
    return sum(t.numel() * t.element_size() for t in tensors)


def _data_file(path: Path) -> Path:
    return path.with_name(f"{path.name}.data")


def _remove_stale_data(path: Path) -> None:
    """A previous export's `.data` would be stale (and some writers append to it): remove it first."""
    data = _data_file(path)
    if data.is_file() or data.is_symlink():
        data.unlink()


def _named_io_module(loaded: LoadedModel, input_names: list[str], args: tuple[Any, ...]) -> tuple[Any, list[str]]:
    """Wrap the model so it takes its inputs positionally and returns a tuple of named tensors.

    The output names come from one eager run on the example (`logits` for HF heads; caches are left
    out), so exporters name graph outputs after the model instead of the last op (`linear_13`).
    """
    import torch

    from mlops_cli.core.runtimes import call_module, call_options, forward_parameter_names, named_tensors

    module = loaded.module
    names = forward_parameter_names(module)
    extra = call_options(loaded, names)
    with torch.inference_mode():
        probe = named_tensors(call_module(module, names, dict(zip(input_names, args, strict=True)), extra))
    if not probe:
        raise InputError(f"{loaded.reference} returned no tensors on the example inputs, nothing to export")
    output_names = list(probe)

    class NamedIO(torch.nn.Module):
        """Positional inputs in, a tuple of the model's named outputs out."""

        def __init__(self) -> None:
            super().__init__()
            self.model = module

        def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
            outputs = named_tensors(call_module(self.model, names, dict(zip(input_names, tensors, strict=True)),
                                                extra))
            return tuple(outputs[name] for name in output_names)

    wrapper = NamedIO()
    try:
        wrapper.eval()
    except NotImplementedError:  # torch.export modules refuse train()/eval(); they are inference graphs already
        wrapper.training = False
    return wrapper, output_names


@contextlib.contextmanager
def _quiet_exporters() -> Iterator[io.StringIO]:
    """Exporters print progress to stdout and warn a lot; keep stdout clean for --json."""
    captured = io.StringIO()
    loggers = [logging.getLogger(name) for name in _QUIET_LOGGERS]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(captured):
            warnings.simplefilter("ignore")
            yield captured
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _dim_bounds(loaded: LoadedModel, axes: dict[str, dict[int, str]]) -> dict[str, dict[int, tuple[str, int | None]]]:
    """Each dynamic axis with its upper bound: the sequence cannot exceed the model's position table.

    Without the bound torch.export rejects the dim (its guards say `sequence <= 128`) and the ONNX
    exporter retries slower strategies, doubling the export time.
    """
    from mlops_cli.core.inputs import text_properties

    max_positions = text_properties(loaded)[2] if loaded.config is not None else None
    return {name: {axis: (dim, max_positions if dim == "sequence" else None) for axis, dim in by_axis.items()}
            for name, by_axis in axes.items()}


def _export_dynamo(wrapper: Any, args: tuple[Any, ...], target: Path, input_names: list[str],
                   output_names: list[str], bounded: dict[str, dict[int, tuple[str, int | None]]], opset: int,
                   external: bool, keep_metadata: bool) -> None:
    import torch

    dims: dict[str, Any] = {}
    for by_axis in bounded.values():
        for name, upper in by_axis.values():
            dims.setdefault(name, torch.export.Dim(name, max=upper) if upper else torch.export.Dim(name))
    per_input = tuple({axis: dims[name] for axis, (name, _) in bounded.get(n, {}).items()} or None
                      for n in input_names)
    with _quiet_exporters():
        program = torch.onnx.export(wrapper, args, dynamo=True, input_names=input_names, output_names=output_names,
                                    opset_version=opset, dynamic_shapes=(per_input,) if bounded else None,
                                    verbose=False, optimize=True)
        if program is None:  # only the legacy path returns None
            raise RuntimeError("torch.onnx.export returned no ONNX program")
        if not keep_metadata:
            strip_exporter_metadata(program.model)
        program.save(str(target), external_data=external)


def strip_exporter_metadata(model: Any) -> None:
    """Drop what the dynamo exporter records for debugging: per-node source stack traces, module paths
    and FX node dumps (`pkg.torch.onnx.*`, `namespace`), per-value original names, and the graph-level
    `pkg.torch.export.*` program signature. On a small transformer that is over half the file, and the
    stack traces carry local file paths into a file that gets shipped. Names, shapes, types, opsets and
    weights are untouched, so the graph computes and reads the same.

    `model` is the exporter's in-memory `onnx_ir.Model` (stripped before saving, so no second write).
    """
    graphs = [*model.graphs()]
    for function in model.functions.values():
        graphs += [function.graph, *function.graph.subgraphs()]
    _drop_torch_props(model.metadata_props)
    for graph in graphs:
        _drop_torch_props(graph.metadata_props)
        values = [*graph.inputs, *graph.outputs, *graph.initializers.values()]
        for node in graph:
            node.metadata_props.clear()
            node.doc_string = None
            values += [value for value in node.outputs if value is not None]
        for value in values:
            value.metadata_props.clear()


def _drop_torch_props(props: dict[str, str]) -> None:
    for key in [key for key in props if key.startswith("pkg.torch.")]:
        del props[key]


def _export_legacy(wrapper: Any, args: tuple[Any, ...], target: Path, input_names: list[str],
                   output_names: list[str], axes: dict[str, dict[int, str]], opset: int, external: bool) -> None:
    import torch

    with _quiet_exporters(), tempfile.TemporaryDirectory(dir=target.parent, prefix=".legacy-") as scratch:
        written = Path(scratch) / target.name
        torch.onnx.export(wrapper, args, str(written), dynamo=False, input_names=input_names,
                          output_names=output_names, dynamic_axes=axes or None, opset_version=opset)
        if external or len(list(Path(scratch).iterdir())) > 1:  # torch wrote per-tensor files: gather them
            import onnx

            save_model_proto(onnx.load(str(written)), target, external=True)
        else:
            os.replace(written, target)


def save_model_proto(model: Any, path: Path, external: bool) -> None:
    """Save an ONNX ModelProto as one file, or with all weights in `<name>.data` beside it."""
    import onnx

    _remove_stale_data(path)
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=_data_file(path).name, size_threshold=1024)
    else:
        onnx.save_model(model, str(path))


# ---------------------------------------------------------------- graph facts


@dataclass(frozen=True)
class GraphValue:
    """One graph input or output: name, element type and dims (a symbol name or a fixed size)."""

    name: str
    dtype: str
    dims: tuple[str | int, ...]


@dataclass(frozen=True)
class GraphInfo:
    opset: int
    nodes: int
    inputs: tuple[GraphValue, ...]
    outputs: tuple[GraphValue, ...]
    op_domains: tuple[str, ...]


def graph_info(path: str | Path) -> GraphInfo:
    """Opset, node count (subgraphs included) and named inputs/outputs of an ONNX file."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    domains = sorted({node.domain or "ai.onnx" for node in _all_nodes(model.graph)})
    initializers = {init.name for init in model.graph.initializer}
    inputs = tuple(_values(v for v in model.graph.input if v.name not in initializers))
    return GraphInfo(opset, count_nodes(model), inputs, tuple(_values(model.graph.output)), tuple(domains))


def count_nodes(model: Any) -> int:
    """Nodes in the main graph and every nested subgraph (If/Loop bodies) and local function."""
    return sum(1 for _ in _all_nodes(model.graph)) + sum(len(f.node) for f in model.functions)


def _all_nodes(graph: Any) -> Iterator[Any]:
    import onnx

    for node in graph.node:
        yield node
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(attribute.g)
            elif attribute.type == onnx.AttributeProto.GRAPHS:
                for subgraph in attribute.graphs:
                    yield from _all_nodes(subgraph)


def _values(values: Any) -> Iterator[GraphValue]:
    import onnx

    for value in values:
        tensor = value.type.tensor_type
        try:
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type)).name
        except (KeyError, TypeError):
            dtype = str(tensor.elem_type)
        dims = tuple(d.dim_param if d.dim_param else (int(d.dim_value) if d.HasField("dim_value") else "?")
                     for d in tensor.shape.dim)
        yield GraphValue(value.name, dtype, dims)


# ---------------------------------------------------------------- the command's service


@dataclass(frozen=True)
class OptimizePass:
    """One optimisation pass: node counts before/after and whether its result was kept."""

    name: str
    nodes_before: int
    nodes_after: int | None
    accepted: bool
    reason: str
    seconds: float


@dataclass(frozen=True)
class ExportOnnxSettings:
    """Everything `export onnx` can be asked to do (the command's options)."""

    opset: int = 20
    static: bool = False
    exporter: str = "auto"
    external_data: bool = False
    verify: bool = True
    optimize: str = "none"
    inputs: tuple[str, ...] = ()  # --input specs
    seed: int = 0
    tolerances: Tolerances = field(default_factory=Tolerances)
    include_padding: bool = False
    device: str = "auto"
    repeats: int = 10  # timed runs per side and shape in the verification; 0 skips timing
    force: bool = False
    keep_metadata: bool = False  # keep the exporter's per-node stack traces and module paths
    load: LoadOptions = field(default_factory=LoadOptions)


@dataclass(frozen=True)
class ExportOnnxReport:
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
    verification: Any  # ParityReport | None (None with --no-verify)
    stages: dict[str, float]  # stage -> seconds
    passed: bool
    verdict: str
    notes: tuple[str, ...] = ()


def export_onnx(reference: str, output: str | Path, settings: ExportOnnxSettings) -> ExportOnnxReport:
    """Export, check, verify, optionally optimise, then move the result into place (even when it fails
    verification: the caller reports the verdict and exits 6, and the file is there to inspect)."""
    from mlops_cli.core.inputs import example_inputs
    from mlops_cli.core.io import check_output, scratch_dir_beside
    from mlops_cli.core.loading import load_model
    from mlops_cli.core.timing import Stopwatch

    _check_settings(settings)
    target = Path(output)
    if target.is_dir():
        raise OutputError(f"output {target} is a folder", hint="Give a file path such as model.onnx.")
    sources = [reference] if not reference.startswith("builtin:") else []
    check_output(target, settings.force, sources)
    _check_data_file(target, settings.force, sources)
    watch = Stopwatch()
    with watch.stage("load"):
        loaded = load_model(reference, settings.load)
        explicit = list(settings.inputs) or None
        specs = specs_for(loaded, explicit)
        example = example_inputs(loaded, explicit, settings.seed)
    workdir = scratch_dir_beside(target)
    try:
        with watch.stage("export"):
            written = write_onnx(loaded, workdir / target.name, example, dynamic=not settings.static,
                                 opset=settings.opset, exporter=settings.exporter,
                                 external_data=settings.external_data, specs=specs,
                                 keep_metadata=settings.keep_metadata)
        current = workdir / target.name
        with watch.stage("check"):
            checker = run_checker(current)
        verification: Any = None
        passes: list[_Pass] = []
        notes = list(loaded.warnings)
        if settings.verify and checker.startswith("passed"):  # ONNX Runtime may not even load a rejected graph
            verify = _verifier(loaded, example, settings, notes)
            with watch.stage("verify"):
                verification = verify(current)
            if settings.optimize != "none":
                with watch.stage("optimize"):
                    current, passes = _optimize(current, workdir, settings.optimize, verify, verification)
                verification = next((p.report for p in reversed(passes) if p.accepted), verification)
        with watch.stage("write"):
            files = _move_into_place(current, target)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return _report(reference, target, files, written, checker, passes, verification, watch.stages, notes)


def _check_data_file(target: Path, force: bool, sources: list[str]) -> None:
    """The export replaces or removes `<output>.data`. Beside an output being overwritten (--force) it
    is that model's weights; beside a new output it belongs to something else: not ours to delete."""
    from mlops_cli.core.io import check_output

    data = _data_file(target)
    if not force and (data.exists() or data.is_symlink()):
        raise OutputError(f"{data} already exists beside the new output {target.name}: the export would "
                          "replace or delete it", hint="Move it away, choose another output name, or pass --force.")
    check_output(data, True, sources)


def _check_settings(settings: ExportOnnxSettings) -> None:
    if settings.optimize not in OPTIMIZERS:
        raise UsageError(f"unknown --optimize {settings.optimize!r}", hint=f"Use one of: {', '.join(OPTIMIZERS)}.")
    if settings.repeats < 0:
        raise UsageError("--repeats must be 0 (no timing) or more")
    if settings.optimize != "none" and not settings.verify:
        raise UsageError("--optimize needs verification (a pass that changes the outputs must be rejected)",
                         hint="Drop --no-verify.")
    if settings.exporter not in EXPORTERS:
        raise UsageError(f"unknown --exporter {settings.exporter!r}", hint=f"Use one of: {', '.join(EXPORTERS)}.")
    if settings.opset not in OPSETS:
        raise UsageError(f"--opset {settings.opset} is not supported",
                         hint=f"Use one of: {', '.join(map(str, OPSETS))}.")
    if settings.exporter == "legacy" and settings.opset > LEGACY_MAX_OPSET:
        raise UsageError(f"the legacy exporter supports opset <= {LEGACY_MAX_OPSET}, not {settings.opset}")


def run_checker(path: Path) -> str:
    """`onnx.checker` with full shape inference; an invalid graph is an input error for ONNX Runtime too."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:
        return f"failed: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}"
    return "passed (full check with shape inference)"


def _verifier(loaded: LoadedModel, example: InputSet, settings: ExportOnnxSettings, notes: list[str]) -> Any:
    """A function `path -> ParityReport` comparing an ONNX file with the loaded model."""
    from mlops_cli.core.inputs import model_shape_sets
    from mlops_cli.core.parity import check_parity
    from mlops_cli.core.runtimes import device_for, onnx_runner, runner_for

    if settings.static:
        input_sets = [InputSet(f"example (static) {example.label}", example.tensors, example.sizes)]
        notes.append("static export: verified at the example shape only (other shapes are rejected by design)")
    else:
        input_sets = model_shape_sets(loaded, list(settings.inputs) or None, settings.seed)
    reference = runner_for(loaded, device_for(loaded, settings.device))

    def verify(path: Path) -> Any:
        onnx_model = LoadedModel(str(path), ModelKind.ONNX, None, path=path)
        candidate = onnx_runner(onnx_model, device_for(onnx_model, settings.device))
        candidate.name = str(path.name)
        return check_parity(reference, candidate, input_sets, settings.tolerances,
                            include_masked=settings.include_padding, time_runs=settings.repeats > 0,
                            repeats=settings.repeats)

    return verify


def _optimize(current: Path, workdir: Path, which: str, verify: Any, baseline: Any) -> tuple[Path, list[Any]]:
    """Run the asked passes in order; keep each one only if the result still passes verification."""
    passes: list[Any] = []
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
        elif baseline is not None and not baseline.passed:
            reason = "not kept: the export itself fails verification"
        else:
            reason = f"rejected, changes the outputs: {report.verdict}"
        accepted = report.passed
        passes.append(_Pass(name, before, after, accepted, reason, time.perf_counter() - started, report))
        if accepted:
            current = candidate
    return current, passes


@dataclass(frozen=True)
class _Pass:
    name: str
    nodes_before: int
    nodes_after: int | None
    accepted: bool
    reason: str
    seconds: float
    report: Any

    def public(self) -> OptimizePass:
        return OptimizePass(self.name, self.nodes_before, self.nodes_after, self.accepted, self.reason, self.seconds)


def _has_external_data(path: Path) -> bool:
    return _data_file(path).exists()


def _slim(source: Path, destination: Path) -> None:
    import onnx
    import onnxslim

    with _quiet_exporters():
        model = onnxslim.slim(onnx.load(str(source)))
    save_model_proto(model, destination, external=_has_external_data(source))


def _ort_offline(source: Path, destination: Path) -> None:
    """ONNX Runtime's offline optimisation (extended level: fusions; the result needs ONNX Runtime)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(destination)
    if _has_external_data(source):
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                         _data_file(destination).name)
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])


def _move_into_place(current: Path, target: Path) -> dict[str, int]:
    """Move the .onnx (and its .data) over the target; a .data from an earlier export is removed."""
    files: dict[str, int] = {}
    data = _data_file(current)
    if data.exists():
        files[_data_file(target).name] = data.stat().st_size
        os.chmod(data, default_mode())
        os.replace(data, _data_file(target))
    else:
        _remove_stale_data(target)
    files[target.name] = current.stat().st_size
    os.chmod(current, default_mode())
    os.replace(current, target)
    return files


def _report(reference: str, target: Path, files: dict[str, int], written: OnnxWriteResult, checker: str,
            passes: list[Any], verification: Any, stages: dict[str, float], notes: list[str]) -> ExportOnnxReport:
    info = graph_info(target)
    checked = checker.startswith("passed")
    if not checked:
        passed, verdict = False, f"onnx.checker rejected {target.name}: {checker.removeprefix('failed: ')}"
    elif verification is None:
        passed, verdict = True, f"exported {target.name} (checker passed; not verified: --no-verify)"
    else:
        passed = verification.passed
        verdict = (f"{target.name} matches {reference}: {verification.verdict}" if passed
                   else f"{target.name} does not match {reference}: {verification.verdict}")
    if written.fallback_reason:
        notes.insert(0, f"dynamo exporter failed, used the legacy exporter: {written.fallback_reason}")
    if written.fixed_dims:
        notes.insert(0, f"the exporter fixed dims asked to be dynamic: {', '.join(written.fixed_dims)} "
                        "(the model's code depends on them; other sizes will fail)")
    custom = [domain for domain in info.op_domains if domain not in ("ai.onnx", "ai.onnx.ml")]
    if custom:
        notes.append(f"the graph uses {', '.join(custom)} operators: it runs on ONNX Runtime only")
    dims = sorted({name for axes in written.dynamic_axes.values() for name in axes.values()})
    return ExportOnnxReport(
        model=reference, output=str(target), files=files, exporter_used=written.exporter_used,
        fallback_reason=written.fallback_reason, opset=info.opset, dynamic_dims=tuple(dims),
        external_data=_data_file(target).name in files, inputs=info.inputs, outputs=info.outputs, nodes=info.nodes,
        checker=checker, optimize_passes=tuple(p.public() for p in passes), verification=verification,
        stages={k: round(v, 4) for k, v in stages.items()}, passed=passed, verdict=verdict, notes=tuple(notes))
