"""`mlops summarize`: what to know about a model before shipping it.

Parameters (total, unique with tied weights counted once and named, trainable, by dtype, bytes stored and
in memory), a layer table from one instrumented forward pass (output shapes, parameters, MACs from
core/flops, attention included), totals per example, an activation-memory estimate and the warm forward
time. ONNX files get their graph facts (inputs with symbolic dims, opset, ops, initializers, external
data) from services/inspect plus an ONNX Runtime timing. TorchScript and .pt2 get what can be known.
Dynamically quantised models (`mlops compress int8`) keep their int8 weights in packed parameters, outside
`parameters()`: they are unpacked here and counted as qint8 (and their Linear MACs added by forward hooks).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mlops_cli.core.contract import ModelRef, Report, ServiceOptions
from mlops_cli.core.errors import InputError, UsageError
from mlops_cli.core.formats import WEIGHT_SUFFIXES
from mlops_cli.core.inputs import InputRequest, InputSet, plan_inputs, text_properties
from mlops_cli.core.loading import LoadedModel, ModelKind, load_model
from mlops_cli.core.runtimes import device_map_of, placement_note, stays_put
from mlops_cli.core.timing import Timing, measure


@dataclass(frozen=True)
class DtypeCount:
    dtype: str
    tensors: int
    elements: int
    nbytes: int


@dataclass(frozen=True)
class ParameterSummary:
    """Counts in elements, sizes in bytes. `total` counts a tied tensor once per name, `unique` once."""

    total: int
    unique: int
    trainable: int | None  # None where the format has no such notion (ONNX initializers)
    buffers: int | None
    by_dtype: tuple[DtypeCount, ...]  # unique parameters and buffers
    tied: tuple[tuple[str, ...], ...]  # groups of names sharing one tensor
    parameter_bytes: int  # unique parameters in memory
    buffer_bytes: int
    memory_bytes: int  # parameters + buffers, each tensor once


@dataclass(frozen=True)
class StoredSize:
    """What the model takes on disk."""

    path: str
    format: str
    file_bytes: int  # weight file(s) (and ONNX external data) on disk
    tensor_bytes: int  # tensor payload in those files (tied weights are usually stored once)
    tensors: int
    files: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class LayerRow:
    path: str  # "" for the whole model
    type: str
    depth: int
    output_shapes: tuple[tuple[int, ...], ...]  # first call's output tensors
    params: int  # parameters inside this module (each tensor once)
    macs: int | None  # MACs of all its calls in the pass (None: no forward pass was run)
    calls: int


@dataclass(frozen=True)
class ComputeSummary:
    """Figures of one forward pass at the given inputs; per-example values divide by the batch size."""

    batch_size: int
    macs: int
    flops: int
    macs_per_example: float
    flops_per_example: float
    attention_macs: int
    by_op: dict[str, int]
    activation_peak_bytes: int | None
    activation_total_bytes: int | None
    measured_peak_bytes: int | None = None  # CUDA only: torch.cuda.max_memory_allocated during the pass


@dataclass(frozen=True)
class OnnxSummary:
    opset: dict[str, int]
    ir_version: int
    producer: str
    inputs: dict[str, str]  # name -> dtype[dims], symbolic dims by name
    outputs: dict[str, str]
    nodes: int
    ops: dict[str, int]
    initializers: int
    initializer_bytes: int
    external_data: dict[str, int]  # file -> bytes


@dataclass(frozen=True, kw_only=True)
class SummaryReport(Report):
    reference: str
    kind: str
    model_class: str
    device: str
    parameters: ParameterSummary
    stored: StoredSize | None
    compute: ComputeSummary | None
    layers: tuple[LayerRow, ...]
    depth: int
    timing: Timing | None
    inputs: dict[str, str] = field(default_factory=dict)  # the forward pass's inputs: name -> dtype[shape]
    onnx: OnnxSummary | None = None
    notes: tuple[str, ...] = ()
    device_map: dict[str, str] | None = None  # where --device-map put each part (accelerate's hf_device_map)


@dataclass(frozen=True, kw_only=True)
class SummarizeOptions(ServiceOptions):
    inputs: InputRequest = field(default_factory=InputRequest)  # --input, --batch-size, --seq-len, --seed
    depth: int = 3
    device: str = "auto"
    warmup: int = 2
    repeats: int = 10  # 0: no timing


def run(ref: ModelRef, options: SummarizeOptions) -> SummaryReport:
    """Load and summarize a model; the loader's warnings travel in the report."""
    from mlops_cli.core.runtimes import device_for, use_threads

    if options.depth < 0:
        raise UsageError("--depth must be 0 or more")
    use_threads(options.threads)
    options.on_step("loading the model")
    loaded = load_model(ref, options.load)
    device = device_for(loaded, options.device)
    if loaded.kind == ModelKind.ONNX:
        report = summarize_onnx(loaded, options, device)
    else:
        report = summarize_torch(loaded, options, device)
    return replace(report, warnings=(*report.warnings, *loaded.warnings))


# ---------------------------------------------------------------- inputs


def summary_inputs(loaded: LoadedModel, options: SummarizeOptions) -> InputSet:
    """The one input set of the forward pass: the plan's first set, at --batch-size/--seq-len (or the inputs'
    own sizes); a torch.export program's inputs come from its graph when no --input is given."""
    _, _, max_positions = text_properties(loaded)
    request = options.inputs
    if request.seq_len and max_positions and request.seq_len > max_positions:
        raise UsageError(f"--seq-len {request.seq_len} is longer than the model's {max_positions} positions")
    if not request.specs:  # a torch.export program knows its own inputs
        request = replace(request, specs=tuple(exported_input_specs(loaded)))
    return plan_inputs(loaded, request).example


def exported_input_specs(loaded: LoadedModel) -> list[str]:
    """A torch.export program records its example inputs' shapes on the graph's placeholders."""
    if loaded.kind != ModelKind.EXPORTED or not hasattr(loaded.module, "graph"):
        return []
    specs = []
    for node in loaded.module.graph.nodes:
        value = node.meta.get("val") if node.op == "placeholder" else None
        if value is not None and hasattr(value, "shape"):
            dims = [f"batch={int(d)}" if i == 0 else str(int(d)) for i, d in enumerate(value.shape)]
            specs.append(f"{node.name}:{str(value.dtype).removeprefix('torch.')}[{','.join(dims)}]")
    return specs


def describe_inputs(inputs: InputSet | None) -> dict[str, str]:
    """name -> dtype[d0, d1, ...] of an input set."""
    if inputs is None:
        return {}
    return {name: f"{value.dtype}[{', '.join(str(d) for d in value.shape)}]" for name, value in inputs.tensors.items()}


# ---------------------------------------------------------------- torch models


def summarize_torch(loaded: LoadedModel, options: SummarizeOptions, device: str) -> SummaryReport:
    module = loaded.module
    if not stays_put(loaded) and loaded.kind != ModelKind.EXPORTED:  # placed or export-pinned: never moved
        module.to(device)
    notes: list[str] = []
    notes.extend(filter(None, [placement_note(module)]))  # offloaded weights loaded in count as activations
    parameters = parameter_summary(module)
    packed = packed_layers(module)
    if packed:
        kinds = ", ".join(sorted({type(layer).__name__ for layer in packed.values()}))
        notes.append(f"{len(packed)} dynamically quantised layer(s) ({kinds}): "
                     "their packed int8 weights are counted as qint8 parameters (1 byte per element, plus "
                     "per-channel scales and zero points), not trainable.")
    if parameters.tied:
        notes.append("tied weights (one tensor, several names): "
                     + "; ".join(" = ".join(group) for group in parameters.tied))
    compute, layers, timing = None, _layer_rows(module, options.depth, None), None
    try:
        inputs = summary_inputs(loaded, options)
    except UsageError as exc:
        if options.inputs.specs or options.inputs.batch_size or options.inputs.seq_len:
            raise
        inputs = None
        notes.append(f"no forward pass: {exc.message}. Describe the inputs with --input name:dtype[d0,d1,...] "
                     "to get MACs, shapes, activation memory and timing.")
    if inputs is not None:
        options.on_step("profiling a forward pass")
        compute, profile = _profile(module, inputs, device)
        layers = _layer_rows(module, options.depth, profile)
        if options.repeats > 0:
            options.on_step("timing")
            timing = _time_torch(module, inputs, options, device)
        if loaded.kind == ModelKind.TORCHSCRIPT:
            notes.append("TorchScript runs its submodules in C++: per-layer shapes and MACs are not visible, "
                         "the totals are exact.")
        if profile.macs.uncounted:
            notes.append(f"MACs of {', '.join(profile.macs.uncounted)} could not be counted (e.g. nested tensors): "
                         "the totals leave them out.")
        if any(op.endswith(("_native_multi_head_attention", "_transformer_encoder_layer_fwd"))
               for op in compute.by_op):
            notes.append("fused nn.MultiheadAttention/TransformerEncoderLayer kernels are counted whole "
                         "(projections + attention); their attention share is not split out.")
    stored = stored_size(loaded.path, loaded.format.value if loaded.format else "") if loaded.path else None
    if stored is None:
        notes.append("built-in model: not stored on disk (`mlops zoo save` writes it as files)")
    return SummaryReport(
        reference=loaded.reference, kind=loaded.kind.value, model_class=_type_name(module), device=device,
        parameters=parameters, stored=stored, compute=compute, layers=layers, depth=options.depth, timing=timing,
        inputs=describe_inputs(inputs), notes=tuple(notes), device_map=device_map_of(module))


def _tensor_key(tensor: Any) -> tuple:
    """Two names hold the same tensor when they view the same memory the same way (tied weights)."""
    if tensor.device.type == "meta" or hasattr(tensor, "to_local"):  # offloaded, or a tensor-parallel shard
        return (id(tensor),)
    return (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tuple(tensor.stride()))


def _named_tensors(module: Any, kind: str) -> list[tuple[str, Any]]:
    """Every (name, tensor), tied names included (TorchScript modules cannot list duplicates)."""
    method = getattr(module, f"named_{kind}")
    try:
        return list(method(remove_duplicate=False))
    except TypeError:
        return list(method())


def tensor_bytes(tensor: Any) -> int:
    """Bytes a tensor holds; a quantised one adds its per-channel scales and zero points."""
    size = tensor.numel() * tensor.element_size()
    if getattr(tensor, "is_quantized", False):
        import torch

        if tensor.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric,
                                torch.per_channel_affine_float_qparams):
            scales, zero_points = tensor.q_per_channel_scales(), tensor.q_per_channel_zero_points()
            size += scales.numel() * scales.element_size() + zero_points.numel() * zero_points.element_size()
        else:
            size += 16  # one float64 scale, one int64 zero point
    return size


def parameter_summary(module: Any) -> ParameterSummary:
    named_parameters = _named_tensors(module, "parameters")
    named_buffers = _named_tensors(module, "buffers")
    groups: dict[tuple, list[str]] = {}
    unique: dict[tuple, Any] = {}
    for name, tensor in named_parameters:
        key = _tensor_key(tensor)
        groups.setdefault(key, []).append(name)
        unique.setdefault(key, tensor)
    buffers = {_tensor_key(t): t for _, t in named_buffers if _tensor_key(t) not in unique}
    packed = [tensor for layer in packed_layers(module).values() for _, tensor in packed_tensors(layer)]
    by_dtype: dict[str, list[int]] = {}
    for tensor in [*unique.values(), *packed, *buffers.values()]:
        entry = by_dtype.setdefault(str(tensor.dtype).removeprefix("torch."), [0, 0, 0])
        entry[0] += 1
        entry[1] += tensor.numel()
        entry[2] += tensor_bytes(tensor)
    parameter_bytes = sum(tensor_bytes(t) for t in [*unique.values(), *packed])
    buffer_bytes = sum(tensor_bytes(t) for t in buffers.values())
    packed_elements = sum(t.numel() for t in packed)
    return ParameterSummary(
        total=sum(t.numel() for _, t in named_parameters) + packed_elements,
        unique=sum(t.numel() for t in unique.values()) + packed_elements,
        trainable=sum(t.numel() for t in unique.values() if t.requires_grad),
        buffers=sum(t.numel() for t in buffers.values()),
        by_dtype=tuple(DtypeCount(d, *v) for d, v in sorted(by_dtype.items(), key=lambda kv: -kv[1][2])),
        tied=tuple(tuple(names) for names in groups.values() if len(names) > 1),
        parameter_bytes=parameter_bytes, buffer_bytes=buffer_bytes, memory_bytes=parameter_bytes + buffer_bytes)


# ---------------------------------------------------------------- dynamically quantised layers


def packed_layers(module: Any) -> dict[str, Any]:
    """path -> torch.ao dynamically quantised layer (Linear, Embedding) whose weights sit in packed params."""
    return {path: sub for path, sub in module.named_modules()
            if type(sub).__module__.startswith("torch.ao.nn.quantized") and hasattr(sub, "_packed_params")
            and callable(getattr(sub, "weight", None))}


def packed_tensors(layer: Any) -> list[tuple[str, Any]]:
    """A packed layer's weight (quantised) and bias (float), unpacked."""
    tensors = [("weight", layer.weight())]
    bias = layer.bias() if callable(getattr(layer, "bias", None)) else None
    if bias is not None:
        tensors.append(("bias", bias))
    return tensors


def _packed_elements(module: Any) -> dict[str, int]:
    """path of each quantised layer -> elements of its packed weight and bias."""
    return {path: sum(t.numel() for _, t in packed_tensors(layer)) for path, layer in packed_layers(module).items()}


def _inside(path: str, ancestor: str) -> bool:
    return not ancestor or path == ancestor or path.startswith(ancestor + ".")


def _count_packed_linear_macs(module: Any) -> tuple[dict[str, int], Any]:
    """Forward hooks adding up the MACs of quantised Linear layers (their kernels are not aten ops, so the
    counting mode misses them): each call does output elements x in_features multiply-adds.
    Returns the per-layer counts (filled during the pass) and a function removing the hooks."""
    counts: dict[str, int] = {}
    handles = []
    for path, layer in packed_layers(module).items():
        if not hasattr(layer, "in_features"):
            continue  # a quantised Embedding looks rows up: no MACs

        def hook(_module: Any, _inputs: Any, output: Any, path: str = path, width: int = layer.in_features) -> None:
            counts[path] = counts.get(path, 0) + int(output.numel()) * width

        handles.append(layer.register_forward_hook(hook))
    return counts, lambda: [handle.remove() for handle in handles]


def _with_packed_macs(profile: Any, counts: dict[str, int]) -> Any:
    """The profile with the quantised Linear MACs added to the total, the op table and each enclosing module."""
    if not counts or any(op.startswith("quantized") for op in profile.macs.by_op):
        return profile  # nothing quantised ran, or core/flops counts these ops itself
    from dataclasses import replace

    by_module = dict(profile.macs.by_module)
    for path, macs in counts.items():
        parts = path.split(".")
        for ancestor in ["", *(".".join(parts[:i]) for i in range(1, len(parts) + 1))]:
            by_module[ancestor] = by_module.get(ancestor, 0) + macs
    total = sum(counts.values())
    by_op = {**profile.macs.by_op, "quantized.linear_dynamic": total}
    return replace(profile, macs=replace(profile.macs, macs=profile.macs.macs + total, by_module=by_module,
                                         by_op=by_op))


def _profile(module: Any, inputs: InputSet, device: str) -> tuple[ComputeSummary, Any]:
    import torch

    from mlops_cli.core.flops import profile_forward

    batch = int(inputs.sizes.get("batch") or next(iter(inputs.tensors.values())).shape[0] or 1)
    cuda = device.startswith("cuda") and torch.cuda.is_available()
    if cuda:  # untested here (no GPU): the allocator's own peak, on top of what was allocated before
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    packed_macs, remove_hooks = _count_packed_linear_macs(module)
    try:
        profile = profile_forward(module, inputs.tensors, record_shapes=True, track_memory=True)
    except (RuntimeError, ValueError, TypeError, IndexError, torch.jit.Error) as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        # TorchScript puts the model's own error (e.g. "ValueError: Supported sampling rates...") last
        message = (lines[-1] if isinstance(exc, torch.jit.Error) else lines[0]) if lines else type(exc).__name__
        raise InputError(f"the forward pass failed on inputs {describe_inputs(inputs)}: {message}",
                         hint="Describe the inputs the model takes with --input name:dtype[d0,d1,...].") from exc
    finally:
        remove_hooks()
    profile = _with_packed_macs(profile, packed_macs)
    measured = None
    if cuda:
        torch.cuda.synchronize()
        measured = torch.cuda.max_memory_allocated() - baseline
    macs = profile.macs
    compute = ComputeSummary(
        batch_size=batch,
        macs=macs.macs, flops=macs.flops, macs_per_example=macs.macs / batch, flops_per_example=macs.flops / batch,
        attention_macs=macs.attention_macs, by_op=dict(sorted(macs.by_op.items(), key=lambda kv: -kv[1])),
        activation_peak_bytes=profile.activation_peak_bytes, activation_total_bytes=profile.activation_total_bytes,
        measured_peak_bytes=measured)
    return compute, profile


def _layer_rows(module: Any, depth: int, profile: Any) -> tuple[LayerRow, ...]:
    rows = []
    packed = _packed_elements(module)
    for path, sub in module.named_modules():
        level = path.count(".") + 1 if path else 0
        if level > depth or path.endswith("._packed_params"):  # a packed layer's storage, not a layer
            continue
        call = profile.modules.get(path) if profile is not None else None
        macs = _module_macs(sub, path, profile) if profile is not None else None
        if not path and profile is not None:
            macs = profile.macs.macs  # the whole model, including ops outside any module's hooks
        params = sum(p.numel() for p in sub.parameters()) + sum(
            count for layer, count in packed.items() if _inside(layer, path))
        rows.append(LayerRow(path, _type_name(sub), level, call.output_shapes if call else (), params, macs,
                             call.calls if call else 0))
    return tuple(rows)


def _module_macs(module: Any, path: str, profile: Any) -> int:
    """A module's MACs; containers that are never called themselves (ModuleList, ModuleDict) sum their children."""
    if path in profile.modules:
        return int(profile.macs.by_module.get(path, 0))
    prefix = f"{path}." if path else ""
    return sum(_module_macs(child, prefix + name, profile) for name, child in module.named_children())


def _type_name(module: Any) -> str:
    name = type(module).__name__
    original = getattr(module, "original_name", None)  # TorchScript keeps the Python class name here
    return str(original) if name == "RecursiveScriptModule" and original else name.removesuffix("Impl")


def _time_torch(module: Any, inputs: InputSet, options: SummarizeOptions, device: str) -> Timing:
    import torch

    from mlops_cli.core.flops import module_caller, module_device, to_tensors

    tensors = to_tensors(inputs.tensors, module_device(module))
    call = module_caller(module)

    def forward() -> None:
        with torch.inference_mode():
            call(tensors)

    return measure(forward, warmup=options.warmup, repeats=options.repeats, device=str(module_device(module)))


# ---------------------------------------------------------------- stored size


def stored_size(path: Path, format_name: str) -> StoredSize:
    """Size on disk from services/inspect (headers and zip directories; nothing is run)."""
    from mlops_cli.services.inspect import inspect_path

    report = inspect_path(str(path))
    files = dict(report.files)
    file_bytes = report.file_bytes
    if path.is_dir():
        files = {name: size for name, size in files.items() if name.endswith(WEIGHT_SUFFIXES)}
        file_bytes = sum(files.values())
    return StoredSize(str(path), report.format, file_bytes, report.tensor_bytes, report.tensor_count,
                      files if path.is_dir() else {})


# ---------------------------------------------------------------- ONNX


def summarize_onnx(loaded: LoadedModel, options: SummarizeOptions, device: str) -> SummaryReport:
    from mlops_cli.core.onnx_export import external_data_files
    from mlops_cli.core.runtimes import runner_for
    from mlops_cli.services.inspect import inspect_path

    assert loaded.path is not None
    report = inspect_path(str(loaded.path))
    external = external_data_files(loaded.path)
    graph = report.graph
    onnx_summary = OnnxSummary(
        opset=graph["opset"], ir_version=graph["ir_version"], producer=graph["producer"], inputs=graph["inputs"],
        outputs=graph["outputs"], nodes=graph["nodes"], ops=graph["ops"], initializers=report.tensor_count,
        initializer_bytes=report.tensor_bytes, external_data=external)
    parameters = ParameterSummary(
        total=report.element_count, unique=report.element_count, trainable=None, buffers=None,
        by_dtype=tuple(DtypeCount(d.dtype, d.tensors, d.elements, d.nbytes) for d in report.dtypes), tied=(),
        parameter_bytes=report.tensor_bytes, buffer_bytes=0, memory_bytes=report.tensor_bytes)
    stored = StoredSize(str(loaded.path), report.format, report.file_bytes + sum(external.values()),
                        report.tensor_bytes, report.tensor_count, {loaded.path.name: report.file_bytes, **external})
    notes = ["MACs, activation memory and the layer table need the torch model: summarize the checkpoint the "
             "ONNX file was exported from. The forward time is ONNX Runtime's."]
    timing = None
    inputs = summary_inputs(loaded, options)
    if options.repeats > 0:
        options.on_step("timing")
        runner = runner_for(loaded, device)
        timing = measure(lambda: runner(inputs.tensors), warmup=options.warmup, repeats=options.repeats)
    return SummaryReport(
        reference=loaded.reference, kind=loaded.kind.value, model_class="onnx graph", device=device,
        parameters=parameters, stored=stored, compute=None, layers=(), depth=options.depth, timing=timing,
        inputs=describe_inputs(inputs), onnx=onnx_summary, notes=tuple(notes))
