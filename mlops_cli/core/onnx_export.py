"""The ONNX writing engine: a loaded model and an example in, an ONNX file with the model's names out.

Every user reaches it from here (`export onnx`, `view`, `compress`, a benchmark): the wrappers around
`torch.onnx.export` for the dynamo and legacy (TorchScript) exporters, named dynamic batch/sequence dims shared
across inputs, Hugging Face models called without caches, the dynamo exporter's debugging metadata stripped,
external data for big weights, `onnx.checker`, and the facts of a written graph (named inputs/outputs, node count).

Writes are plain writes to one path: callers own atomicity (`move_into_place` moves a file and its `.data`).
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import re
import tempfile
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mlops_cli.core.errors import InputError, OutputError, UsageError
from mlops_cli.core.inputs import TEXT_INPUTS, InputSet, InputSpec
from mlops_cli.core.io import default_mode
from mlops_cli.core.loading import LoadedModel, ModelKind

EXPORTERS = ("auto", "dynamo", "legacy")
OPSETS = (18, 19, 20, 21)
LEGACY_MAX_OPSET = 20  # torch's TorchScript-based exporter stops at opset 20
# Weights above this go to an external `.data` file: protobuf cannot hold a model over 2 GiB, and the
# graph needs room too. The same threshold torch's dynamo exporter uses.
EXTERNAL_DATA_THRESHOLD = 1536 * 1024 * 1024
DYNAMIC_DIM_NAMES = {"batch": "batch", "sequence": "sequence", "seq": "sequence", "sequence_length": "sequence"}
_ANSI = re.compile(r"\x1b\[[0-9;]*m")

Axes = dict[str, dict[int, str]]  # input or output name -> {axis: dim name}


@dataclass(frozen=True)
class OnnxWriteResult:
    """What `write_onnx` wrote and how."""

    path: str
    exporter_used: str  # "dynamo" or "legacy"
    fallback_reason: str | None  # why `auto` fell back to the legacy exporter
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    dynamic_axes: Axes  # input name -> {axis: dim name}; empty when static
    opset: int
    external_data: bool
    seconds: float
    data_file: str | None = None  # the external `.data` file beside `path`, when written
    fixed_dims: tuple[str, ...] = ()  # dims asked to be dynamic that the exporter fixed, e.g. "x[0] (batch) = 2"


# ---------------------------------------------------------------- writing


def write_onnx(loaded: LoadedModel, path: str | Path, example: InputSet, *, dynamic: bool = True, opset: int = 20,
               exporter: str = "auto", external_data: bool | None = None,
               specs: Sequence[InputSpec] | None = None, keep_metadata: bool = False) -> OnnxWriteResult:
    """Export `loaded` to `path` (a plain write: callers handle atomicity) using `example` as inputs.

    `dynamic`: batch and sequence dims (named as in `specs`, shared across inputs) stay symbolic; give an example
    whose dynamic dims are >= 2 (`InputPlan.export_example`): exporters specialise size-1 dims to constants.
    `exporter`: auto (dynamo, then legacy on failure), dynamo or legacy. `external_data`: True forces weights into
    `<path>.data`, None/False writes one file unless the weights are too big. `keep_metadata`: keep the dynamo
    exporter's debugging metadata (see `strip_exporter_metadata`).
    """
    import torch

    started = time.perf_counter()
    target = Path(path)
    check_exportable(loaded, exporter, opset)
    input_names = list(example.tensors)
    axes = dynamic_axes_for(example, specs) if dynamic else {}
    args = tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in example.tensors.values())
    wrapper, output_names = _named_io_module(loaded, input_names, args)
    use_external = bool(external_data) or weights_need_external_data(loaded.module)
    remove_stale_data(target)
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
        all_axes = {**axes, **_output_axes(wrapper, args, input_names, output_names, axes)}
        _legacy_or_fail(wrapper, args, target, input_names, output_names, all_axes, opset, use_external,
                        fallback_reason)
    data = data_file(target)
    return OnnxWriteResult(
        path=str(target), exporter_used=used, fallback_reason=fallback_reason, input_names=tuple(input_names),
        output_names=tuple(output_names), dynamic_axes=axes, opset=opset, external_data=data.exists(),
        seconds=time.perf_counter() - started, data_file=str(data) if data.exists() else None,
        fixed_dims=tuple(fixed))


def exporter_order(loaded: LoadedModel, exporter: str, opset: int) -> tuple[str, ...]:
    """The exporters to try, in order, for `--exporter`; a caller keeps the first whose graph verifies.

    `auto` on a Hugging Face model: legacy first, dynamo when the legacy graph fails. Measured on a 22 M BERT
    (benchmarks/bench_export_onnx.py): the legacy exporter takes a fraction of dynamo's time, and its graph is
    the one ONNX Runtime's transformer fusions recognise (attention, layer norm, GELU). On other models `auto`
    stays `write_onnx`'s dynamo-then-legacy: dynamo reads Python control flow a trace would freeze.
    """
    if exporter == "auto" and loaded.kind == ModelKind.HF and opset <= LEGACY_MAX_OPSET:
        return ("legacy", "dynamo")
    return (exporter,)


def check_exportable(loaded: LoadedModel, exporter: str, opset: int) -> None:
    """Usage errors before any work: an ONNX input, an unknown exporter or opset, a format one exporter cannot read."""
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
    if exporter == "legacy" and opset > LEGACY_MAX_OPSET:
        raise UsageError(f"the legacy exporter supports opset <= {LEGACY_MAX_OPSET}, not {opset}",
                         hint=f"Use --opset {LEGACY_MAX_OPSET} or lower.")


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
    remove_stale_data(target)
    return reason, []


def _legacy_or_fail(wrapper: Any, args: tuple[Any, ...], target: Path, input_names: list[str],
                    output_names: list[str], axes: Axes, opset: int, external: bool,
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


def fixed_dims(path: Path, axes: Axes) -> list[str]:
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


def dynamic_axes_for(example: InputSet, specs: Sequence[InputSpec] | None) -> Axes:
    """Which axes of each input are the batch and sequence dims (named alike across inputs).

    From the specs when known; otherwise axis 0 of every input is `batch` and axis 1 of 2-D text
    inputs (input_ids, attention_mask, ...) is `sequence`. Other named dims (image height/width)
    stay fixed: most vision models check them.
    """
    by_name = {spec.name: spec for spec in specs or []}
    axes: Axes = {}
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


def weights_need_external_data(module: Any) -> bool:
    """Do a torch module's parameters and buffers pass the external-data threshold (every ONNX writer's)?"""
    tensors = list(module.parameters()) + list(module.buffers()) if hasattr(module, "parameters") else []
    return sum(t.numel() * t.element_size() for t in tensors) > EXTERNAL_DATA_THRESHOLD


def data_file(path: Path) -> Path:
    """Where the external weights of `path` live: `<name>.data` beside it."""
    return path.with_name(f"{path.name}.data")


def check_onnx_output(output: str | Path, force: bool, sources: Iterable[str | Path] = ()) -> Path:
    """An ONNX output path, refused before any work when it is a folder, exists (without --force) or would
    overwrite an input; the same rules for the `.data` file the export may write or remove beside it."""
    from mlops_cli.core.io import check_output

    target = Path(output)
    if target.is_dir():
        raise OutputError(f"output {target} is a folder", hint="Give a file path such as model.onnx.")
    sources = list(sources)
    check_output(target, force, sources)
    data = data_file(target)
    # Beside an output being overwritten (--force) the .data is that model's weights; beside a new output it
    # belongs to something else: not ours to delete.
    if not force and (data.exists() or data.is_symlink()):
        raise OutputError(f"{data} already exists beside the new output {target.name}: writing would replace or "
                          "delete it", hint="Move it away, choose another output name, or pass --force.")
    check_output(data, True, sources)
    return target


def files_on_disk(path: Path) -> dict[str, int]:
    """File name -> bytes of an ONNX file and its `.data` when it has one."""
    return {p.name: p.stat().st_size for p in (path, data_file(path)) if p.is_file()}


def external_data_files(path: Path) -> dict[str, int]:
    """External-data files an ONNX model references (locations were checked to stay in its folder at load)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    files: dict[str, int] = {}
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            location = next((e.value for e in tensor.external_data if e.key == "location"), "")
            if location and location not in files:
                files[location] = (path.parent / location).stat().st_size
    return files


def remove_stale_data(path: Path) -> None:
    """A previous export's `.data` would be stale (and some writers append to it): remove it first."""
    data = data_file(path)
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


def _output_axes(wrapper: Any, args: tuple[Any, ...], input_names: list[str], output_names: list[str],
                 axes: Axes) -> Axes:
    """Which output axes are the batch/sequence dims, for the legacy exporter (dynamo names them itself).

    Two eager runs: the example, and the example grown by a different amount per dim; an output axis that
    follows one dim in both runs carries its name (`logits: [batch, 2]`, not `[Gemmlogits_dim_0, 2]`).
    """
    import torch

    if not axes:
        return {}
    growth = {name: index + 1 for index, name in enumerate(sorted({d for a in axes.values() for d in a.values()}))}
    grown = []
    for name, tensor in zip(input_names, args, strict=True):
        for axis, dim in axes.get(name, {}).items():
            repeated = torch.arange(growth[dim]) % tensor.shape[axis]
            tensor = torch.cat([tensor, tensor.index_select(axis, repeated)], dim=axis)
        grown.append(tensor)
    sizes = [{dim: args[input_names.index(name)].shape[axis] for name, a in axes.items() for axis, dim in a.items()},
             {dim: grown[input_names.index(name)].shape[axis] for name, a in axes.items() for axis, dim in a.items()}]
    try:
        with torch.inference_mode():
            runs = [wrapper(*args), wrapper(*grown)]
    except Exception:  # the model refuses the grown inputs (e.g. a maximum length): the exporter's names stay
        return {}
    found: Axes = {}
    for index, name in enumerate(output_names):
        before, after = (tuple(run[index].shape) for run in runs)
        for axis in range(min(len(before), len(after))):
            dims = [dim for dim in growth if (before[axis], after[axis]) == (sizes[0][dim], sizes[1][dim])]
            if len(dims) == 1:
                found.setdefault(name, {})[axis] = dims[0]
    return found


@contextlib.contextmanager
def quiet_exporters() -> Iterator[io.StringIO]:
    """Exporters and graph tools print progress to stdout and warn a lot (torch.onnx, onnxscript, and ONNX Runtime's
    transformer fusions, whose loggers are top-level modules): keep stdout clean for --json, stderr for errors."""
    captured = io.StringIO()
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(captured):
            warnings.simplefilter("ignore")
            yield captured
    finally:
        logging.disable(previous)


def _dim_bounds(loaded: LoadedModel, axes: Axes) -> dict[str, dict[int, tuple[str, int | None]]]:
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
    with quiet_exporters():
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
                   output_names: list[str], axes: Axes, opset: int, external: bool) -> None:
    import torch

    with quiet_exporters(), tempfile.TemporaryDirectory(dir=target.parent, prefix=".legacy-") as scratch:
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

    declare_op_domains(model)
    remove_stale_data(path)
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_file(path).name, size_threshold=1024)
    else:
        onnx.save_model(model, str(path))


def declare_op_domains(model: Any) -> None:
    """Declare (version 1) every operator domain the nodes use that the model does not import.

    ONNX Runtime's transformer fusions add `com.microsoft` nodes without importing that domain: ONNX Runtime
    runs such a file, but onnx's shape inference (which the float16 converter and the int8 quantiser run
    first) rejects it ("No opset import for domain com.microsoft").
    """
    import onnx

    declared = {entry.domain or "ai.onnx" for entry in model.opset_import}
    used = {node.domain or "ai.onnx" for node in _all_nodes(model.graph)}
    for domain in sorted(used - declared):
        model.opset_import.append(onnx.helper.make_opsetid(domain, 1))


def load_onnx(path: Path, *, infer_shapes: bool = False) -> Any:
    """An ONNX model with its weights, external data included (read from beside it once every location is
    checked to stay inside the model's folder: exit 4 otherwise, where onnx would raise a bare error).

    `infer_shapes`: run shape inference on the graph before its big external weights are read. Inference in
    memory serialises the model, which protobuf refuses past 2 GiB; without the weights the graph is small (ONNX
    Runtime's symbolic inference gets the external tensors it may read loaded first: `_load_external_for_inference`).
    """
    import onnx
    from onnx.external_data_helper import load_external_data_for_model

    from mlops_cli.core.loading import check_onnx_external_data

    check_onnx_external_data(path)
    model = onnx.load(str(path), load_external_data=False)
    declare_op_domains(model)
    if infer_shapes:
        model = _infer_types(model, path.parent)
    load_external_data_for_model(model, str(path.parent))
    return model


def _infer_types(model: Any, folder: Path) -> Any:
    """The graph with every value's type and shape inferred. onnx's inference does not know ONNX Runtime's
    contrib ops (the fused Attention, FastGelu, SkipLayerNormalization... of `export onnx --optimize`): their
    outputs would stay untyped and a float16 conversion would mix float32 and float16 around them. ONNX Runtime's
    symbolic inference knows them."""
    import onnx

    if not any(node.domain == "com.microsoft" for node in model.graph.node):
        return onnx.shape_inference.infer_shapes(model)
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    _load_external_for_inference(model, folder)
    return SymbolicShapeInference.infer_shapes(model, auto_merge=True)


_SMALL_TENSOR = 1024 * 1024  # bytes: shape constants, indices, axes


def _load_external_for_inference(model: Any, folder: Path) -> None:
    """ONNX Runtime's symbolic inference reads the values of constant initializers (shapes, indices) with
    `numpy_helper.to_array`, which resolves an external tensor's location against the current directory, not the
    model's folder: a crash from elsewhere, or a same-named file's bytes. Read them from `folder` first: all of them
    when the weights stay under the external-data threshold, else the small ones (the constants it reads)."""
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

    external = [(tensor, _tensor_bytes(tensor)) for tensor in model.graph.initializer if uses_external_data(tensor)]
    everything = sum(size for _, size in external) <= EXTERNAL_DATA_THRESHOLD
    for tensor, size in external:
        if everything or size < _SMALL_TENSOR:
            load_external_data_for_tensor(tensor, str(folder))


def _tensor_bytes(tensor: Any) -> int:
    import onnx

    return math.prod(tensor.dims) * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize


def has_external_data(path: Path) -> bool:
    """Does this ONNX file keep (some of) its weights in files beside it?"""
    return bool(external_data_files(path))


def needs_external_data(model: Any, source_had_it: bool) -> bool:
    """Write a model's weights to `<name>.data` when its source did, or when they pass the threshold."""
    return source_had_it or sum(tensor.ByteSize() for tensor in model.graph.initializer) > EXTERNAL_DATA_THRESHOLD


@contextlib.contextmanager
def atomic_onnx(output: str | Path, force: bool = False, sources: Iterable[str | Path] = ()) -> Iterator[Path]:
    """Yield where to write an ONNX file: a path named like `output` in a private folder beside it, so that a
    `<name>.data` written with it gets its final relative location. On success both files are fsynced and
    moved into place (move_into_place: the .data first); on failure the folder goes and neither appears.
    The output is checked first (check_onnx_output: a `.data` beside a new output is not ours to replace)."""
    import shutil

    from mlops_cli.core.io import scratch_dir_beside

    target = check_onnx_output(output, force, sources)
    scratch = scratch_dir_beside(target)
    try:
        written = scratch / target.name
        yield written
        for path in (written, data_file(written)):
            if path.is_file():
                with open(path, "rb+") as handle:
                    os.fsync(handle.fileno())
        _check_loads(written, target)
        move_into_place(written, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _check_loads(written: Path, target: Path) -> None:
    """A graph ONNX Runtime refuses is never moved into place (nothing half-written): load it once, unoptimised."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        ort.InferenceSession(str(written), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise InputError(f"the graph for {target} does not load in ONNX Runtime, so it was not written: "
                         f"{str(exc).splitlines()[0]}",
                         hint="Rerun with MLOPS_DEBUG=1 and report it; the source graph is unchanged.") from exc


def move_into_place(current: Path, target: Path) -> dict[str, int]:
    """Move an .onnx (and its .data) over `target`; a .data from an earlier export is removed.
    Returns file name -> bytes of what is now there."""
    files: dict[str, int] = {}
    data = data_file(current)
    if data.exists():
        files[data_file(target).name] = data.stat().st_size
        os.chmod(data, default_mode())
        os.replace(data, data_file(target))
    else:
        remove_stale_data(target)
    files[target.name] = current.stat().st_size
    os.chmod(current, default_mode())
    os.replace(current, target)
    return files


# ---------------------------------------------------------------- checking and graph facts


def run_checker(path: Path) -> str:
    """`onnx.checker` with full shape inference; an invalid graph is an input error for ONNX Runtime too."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:
        return f"failed: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}"
    return "passed (full check with shape inference)"


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
