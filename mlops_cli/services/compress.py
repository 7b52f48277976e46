"""Shared machinery of `mlops compress half` and `mlops compress int8`.

- Which tensors a conversion touches: only floating-point ones, minus those a `--keep-fp32` pattern
  names (by default the normalisation layers, whose parameters are tiny and whose statistics suffer
  most from rounding).
- The safety count of a cast, per tensor: values that overflow to inf, flush to zero, or land in the
  target dtype's subnormal range (where precision collapses). Counted on the real cast, not estimated.
  Mask fills (the source dtype's extreme, e.g. the `finfo(float32).min` every Hugging Face attention mask
  adds) are not overflow: they saturate to the target's extreme and are counted apart.
- Refusals made before any work: an input already quantised to int8, and a drift check whose model
  inputs cannot be told (so a usage error never leaves an output behind).
- Size accounting, and the drift check: the compressed model against the original through the parity
  engine, optionally layer by layer (forward hooks) to name the first layer whose error jumps.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlops_cli.core.errors import InputError, UsageError
from mlops_cli.core.formats import Format, detect_format, torch_load_weights
from mlops_cli.core.int8_state import PACKED, QUANTIZATION_INFO
from mlops_cli.core.sidecar import SIDECAR, read_sidecar

HALF_DTYPES = {"fp16": "float16", "bf16": "bfloat16"}
FLOAT_DTYPES = ("float64", "float32", "float16", "bfloat16")  # fp8 tensors are left alone
# Normalisation layers by name: BERT/ViT `LayerNorm`/`layernorm_*`, `norm1`, `rms_norm`, `batch_norm`,
# GPT-2 `ln_1`/`ln_f`, torchvision-style `bn1`. Applied to tensor names, and to ONNX node and initializer names.
DEFAULT_KEEP_FP32 = (r"(?i)norm", r"(^|[./_])ln_(\d+|f)([./]|$)", r"(^|[./])bn\d*([./]|$)")
NORM_ONNX_OPS = ("LayerNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization",
                 "SkipSimplifiedLayerNormalization", "BatchNormalization", "InstanceNormalization",
                 "GroupNormalization", "RMSNormalization")
CHUNK_ELEMENTS = 1024 * 1024  # tensors are cast in chunks of this many elements (4 MiB of fp32)
# Ops of a graph that is already quantised (ONNX Runtime's dynamic and QDQ/QOperator formats).
QUANTISED_ONNX_OPS = frozenset({
    "DynamicQuantizeLinear", "QuantizeLinear", "DequantizeLinear", "MatMulInteger", "ConvInteger", "QLinearMatMul",
    "QLinearConv", "QGemm", "QAttention", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "DynamicQuantizeLSTM"})


# ---------------------------------------------------------------- which tensors change


@dataclass(frozen=True)
class KeepRules:
    """`--keep-fp32` patterns (regular expressions searched in tensor names), defaults first."""

    patterns: tuple[str, ...]
    defaults_used: bool

    @classmethod
    def build(cls, user_patterns: Iterable[str] | None, use_defaults: bool) -> KeepRules:
        patterns = (DEFAULT_KEEP_FP32 if use_defaults else ()) + tuple(user_patterns or ())
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise UsageError(f"--keep-fp32 {pattern!r} is not a valid regular expression: {exc}") from exc
        return cls(patterns, use_defaults)

    def match(self, name: str) -> str | None:
        """The first pattern that names this tensor, or None."""
        return next((p for p in self.patterns if re.search(p, name)), None)


def torch_dtype(name: str) -> Any:
    import torch

    return getattr(torch, name)


def dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def plan_tensor(name: str, dtype: str, target: str, keep: KeepRules) -> tuple[bool, str]:
    """(convert?, why) for one tensor: only floating tensors not named by a keep pattern change."""
    if dtype not in FLOAT_DTYPES:
        return False, f"not floating-point ({dtype})"
    if dtype == target:
        return False, f"already {target}"
    pattern = keep.match(name)
    if pattern is not None:
        return False, f"kept: matches {pattern}"
    return True, "converted"


# ---------------------------------------------------------------- safety counts


@dataclass(frozen=True)
class TensorSafety:
    """One tensor's conversion: what happened to it and what the cast did to its values."""

    name: str
    shape: tuple[int, ...]
    source_dtype: str
    output_dtype: str
    converted: bool
    reason: str
    elements: int
    bytes_before: int
    bytes_after: int
    overflow: int = 0  # finite values that became +-inf (or, for ONNX, were clamped to the largest finite value)
    underflow: int = 0  # non-zero values that flushed to zero (ONNX: raised to the smallest subnormal instead)
    subnormal: int = 0  # values now in the target's subnormal range: few significant bits left
    nonfinite_source: int = 0  # NaN/inf already present before the cast
    max_abs: float | None = None  # largest finite |value| before the cast
    sentinel: int = 0  # mask fills (+-the source dtype's largest value) saturated to +-the target's, not overflow

    @property
    def has_issue(self) -> bool:
        return bool(self.overflow or self.underflow or self.subnormal or self.nonfinite_source)


@dataclass
class CastCounts:
    """The safety counts of one tensor, accumulated over its chunks."""

    overflow: int = 0
    underflow: int = 0
    subnormal: int = 0
    nonfinite_source: int = 0
    max_abs: float = 0.0
    sentinel: int = 0


class ChunkCaster:
    """Casts chunks to the target dtype and counts what the cast did, in reused buffers.

    The buffers (the cast chunk, its magnitudes, a mask) are allocated once per run, so streaming a model
    does not churn the allocator: peak memory stays at about one chunk. Every count is a difference of
    plain counts (a value is 0 after the cast iff it was 0 or underflowed; inf iff it was inf or
    overflowed); the rare non-finite inputs take a slower path with temporary masks.

    Values equal to +-the source dtype's largest finite value are mask/sentinel fills (Hugging Face fills
    masked attention scores with `finfo(float32).min`): they become +-the target's largest finite value
    (+-65504 for fp16) instead of +-inf, and are counted as `sentinel`, not as overflow.
    """

    def __init__(self, target: str, chunk_elements: int = CHUNK_ELEMENTS) -> None:
        import torch

        self.dtype = torch_dtype(target)
        self.tiny = torch.finfo(self.dtype).tiny
        self.largest = torch.finfo(self.dtype).max
        self.capacity = chunk_elements
        self._result = torch.empty(0, dtype=self.dtype)
        self._magnitude = torch.empty(0, dtype=self.dtype)
        self._mask = torch.empty(0, dtype=torch.bool)

    def cast(self, chunk: Any, counts: CastCounts) -> Any:
        """The 1-D `chunk` cast to the target dtype (a view of a reused buffer: copy it out before the next call)."""
        import torch

        size = chunk.numel()
        if size > self._result.numel():
            self._result = torch.empty(size, dtype=self.dtype)
            self._magnitude = torch.empty(size, dtype=self.dtype)
            self._mask = torch.empty(size, dtype=torch.bool)
        result, magnitude, mask = self._result[:size], self._magnitude[:size], self._mask[:size]
        result.copy_(chunk)
        if not size:
            return result
        zeros_after = size - int(torch.count_nonzero(result))
        counts.underflow += zeros_after - (size - int(torch.count_nonzero(chunk)))
        torch.abs(result, out=magnitude)
        torch.lt(magnitude, self.tiny, out=mask)
        counts.subnormal += int(torch.count_nonzero(mask)) - zeros_after
        low, high = (float(v) for v in torch.aminmax(chunk))
        if math.isfinite(low) and math.isfinite(high):
            counts.max_abs = max(counts.max_abs, abs(low), abs(high))
            after_low, after_high = (float(v) for v in torch.aminmax(result))
            if not (math.isfinite(after_low) and math.isfinite(after_high)):
                counts.sentinel += self._saturate_sentinels(chunk, result)
                counts.overflow += int(torch.isinf(result).sum())
        else:  # NaN/inf already in the source
            inf_before = int(torch.isinf(chunk).sum())
            counts.nonfinite_source += inf_before + int(torch.isnan(chunk).sum())
            counts.sentinel += self._saturate_sentinels(chunk, result)
            counts.overflow += int(torch.isinf(result).sum()) - inf_before
            finite = torch.nan_to_num(chunk, nan=0.0, posinf=0.0, neginf=0.0)
            counts.max_abs = max(counts.max_abs, float(finite.abs().max()))
        return result

    def _saturate_sentinels(self, chunk: Any, result: Any) -> int:
        """Write +-the target's largest value where the source holds +-its own largest; return how many."""
        import torch

        extreme = torch.finfo(chunk.dtype).max
        if extreme <= self.largest:  # the source's extreme fits the target: nothing saturates
            return 0
        positive, negative = chunk == extreme, chunk == -extreme
        count = int(torch.count_nonzero(positive)) + int(torch.count_nonzero(negative))
        if count:
            result.masked_fill_(positive, self.largest)
            result.masked_fill_(negative, -self.largest)
        return count


def cast_tensor(tensor: Any, target: str, caster: ChunkCaster | None = None) -> tuple[Any, CastCounts]:
    """Cast a floating tensor to `target`, chunk by chunk, counting what the cast did."""
    import torch

    caster = caster or ChunkCaster(target)
    counts = CastCounts()
    flat = tensor.reshape(-1)
    result = torch.empty(flat.shape, dtype=caster.dtype)
    for start in range(0, flat.numel(), caster.capacity):
        chunk = flat[start:start + caster.capacity]
        result[start:start + chunk.numel()] = caster.cast(chunk, counts)
    return result.reshape(tensor.shape), counts


def tensor_safety(name: str, shape: tuple[int, ...], source_dtype: str, output_dtype: str, converted: bool,
                  reason: str, itemsizes: tuple[int, int], counts: CastCounts | None = None) -> TensorSafety:
    elements = math.prod(shape)
    counts = counts or CastCounts()
    return TensorSafety(name, tuple(shape), source_dtype, output_dtype, converted, reason, elements,
                        elements * itemsizes[0], elements * itemsizes[1], counts.overflow, counts.underflow,
                        counts.subnormal, counts.nonfinite_source, counts.max_abs if converted else None,
                        counts.sentinel)


def convert_state_dict(state_dict: dict[str, Any], target: str, keep: KeepRules
                       ) -> tuple[dict[str, Any], list[TensorSafety]]:
    """Convert the floating tensors of an in-memory state_dict; everything else is kept as it is."""
    caster = ChunkCaster(target)
    result: dict[str, Any] = {}
    safety: list[TensorSafety] = []
    for name, tensor in state_dict.items():
        source = dtype_name(tensor.dtype)
        convert, reason = plan_tensor(name, source, target, keep)
        counts = None
        if convert:
            result[name], counts = cast_tensor(tensor, target, caster)
        else:
            result[name] = tensor
        after = result[name].element_size()
        safety.append(tensor_safety(name, tuple(tensor.shape), source, dtype_name(result[name].dtype), convert,
                                    reason, (tensor.element_size(), after), counts))
    return result, safety


@dataclass(frozen=True)
class SafetyTotals:
    converted_tensors: int
    kept_tensors: int  # floating tensors left in their dtype by a keep pattern
    other_tensors: int  # integer/bool tensors and tensors already in the target dtype
    overflow: int
    underflow: int
    subnormal: int
    nonfinite_source: int
    tensors_with_overflow: tuple[str, ...]
    sentinel: int = 0  # mask fills saturated to the target's largest value (not overflow)
    tensors_with_sentinel: tuple[str, ...] = ()


def safety_totals(tensors: Iterable[TensorSafety]) -> SafetyTotals:
    items = list(tensors)
    return SafetyTotals(
        converted_tensors=sum(t.converted for t in items),
        kept_tensors=sum(t.reason.startswith("kept") for t in items),
        other_tensors=sum(not t.converted and not t.reason.startswith("kept") for t in items),
        overflow=sum(t.overflow for t in items),
        underflow=sum(t.underflow for t in items),
        subnormal=sum(t.subnormal for t in items),
        nonfinite_source=sum(t.nonfinite_source for t in items),
        tensors_with_overflow=tuple(t.name for t in items if t.overflow),
        sentinel=sum(t.sentinel for t in items),
        tensors_with_sentinel=tuple(t.name for t in items if t.sentinel),
    )


def sentinel_notes(tensors: Iterable[TensorSafety], target: str) -> list[str]:
    """One line per source dtype whose mask fills were saturated, e.g. `1 sentinel value(s) +-3.4e38 ...`."""
    import torch

    largest = torch.finfo(torch_dtype(target)).max
    by_source: dict[str, list[TensorSafety]] = {}
    for tensor in tensors:
        if tensor.sentinel:
            by_source.setdefault(tensor.source_dtype, []).append(tensor)
    notes = []
    for source, items in by_source.items():
        names = ", ".join(t.name for t in items[:3]) + (" ..." if len(items) > 3 else "")
        fill = _compact(torch.finfo(torch_dtype(source)).max)
        notes.append(f"{sum(t.sentinel for t in items)} sentinel value(s) ±{fill} (attention-mask fills) saturated "
                     f"to ±{_compact(largest)} in {names}; not counted as overflow")
    return notes


def _compact(value: float) -> str:
    """65504 -> '65504', 3.4028e38 -> '3.4e38'."""
    return f"{value:g}" if value < 1e6 else f"{value:.2g}".replace("e+", "e")


# ---------------------------------------------------------------- sizes


@dataclass(frozen=True)
class SizeSummary:
    """Bytes before/after: the converted floating tensors alone, all tensors, and the files on disk."""

    converted_before: int
    converted_after: int
    tensors_before: int
    tensors_after: int
    files_before: int
    files_after: int
    converted_ratio: float | None
    files_ratio: float | None


def size_summary(tensors: Iterable[TensorSafety], source: Path, output: Path | None) -> SizeSummary:
    items = list(tensors)
    converted = [t for t in items if t.converted]
    converted_before, converted_after = sum(t.bytes_before for t in converted), sum(t.bytes_after for t in converted)
    files_before, files_after = disk_size(source), disk_size(output) if output is not None else 0
    return SizeSummary(
        converted_before=converted_before, converted_after=converted_after,
        tensors_before=sum(t.bytes_before for t in items), tensors_after=sum(t.bytes_after for t in items),
        files_before=files_before, files_after=files_after,
        converted_ratio=converted_after / converted_before if converted_before else None,
        files_ratio=files_after / files_before if files_before and files_after else None)


def disk_size(path: Path) -> int:
    """Bytes on disk of a file or folder; an ONNX file's external-data files count too."""
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    if not path.exists():
        return 0
    return path.stat().st_size + sum(p.stat().st_size for p in onnx_external_files(path))


def onnx_external_files(path: Path) -> list[Path]:
    """The external-data files an ONNX model refers to (none for other files)."""
    from mlops_cli.core.formats import detect_format

    if path.is_dir() or detect_format(path) != Format.ONNX:
        return []
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    locations = {entry.value for init in model.graph.initializer if init.data_location == onnx.TensorProto.EXTERNAL
                 for entry in init.external_data if entry.key == "location"}
    return [path.parent / location for location in sorted(locations) if (path.parent / location).is_file()]


# ---------------------------------------------------------------- inputs and model building


def reject_builtin(reference: str) -> None:
    """Compression writes the same kind of file it reads, so it needs a file."""
    if reference.startswith("builtin:"):
        name = reference.removeprefix("builtin:")
        raise InputError("compress reads a model file or folder and writes the same kind; "
                         f"{reference} exists only in memory",
                         hint=f"Save it first: mlops zoo save {name} {name}/ && mlops compress ... {name}/")


def refuse_quantised(source: Path, fmt: Format, command: str) -> None:
    """An int8 model cannot be converted to fp16/bf16 nor quantised again: refuse it before any work."""
    evidence = quantised_evidence(source, fmt)
    if evidence is not None:
        raise InputError(f"{source} is already quantised to int8 ({evidence}); {command} needs float weights",
                         hint="It is already quantised: compress the float checkpoint it was made from instead.")


def quantised_evidence(source: Path, fmt: Format) -> str | None:
    """What shows that a model is already quantised (written by `compress int8` or alike), or None."""
    if fmt == Format.HF_FOLDER and (source / QUANTIZATION_INFO).is_file():
        return f"{QUANTIZATION_INFO} describes its int8 weights"
    if fmt in (Format.HF_FOLDER, Format.WEIGHTS_FOLDER):
        method = read_sidecar(source).get("quantization")
        if method:
            return f"{SIDECAR} says quantization: {method}"
        for path in weight_files(source):
            layer = _packed_layer(path) if detect_format(path) in (Format.TORCH_ZIP, Format.TORCH_LEGACY) else None
            if layer:
                return f"{path.name} holds packed int8 layers such as {layer}"
        return None
    if fmt in (Format.TORCH_ZIP, Format.TORCH_LEGACY):
        layer = _packed_layer(source)
        return f"its state_dict holds packed int8 layers such as {layer}" if layer else None
    if fmt == Format.ONNX:
        import onnx

        graph = onnx.load(str(source), load_external_data=False).graph
        ops = sorted({node.op_type for node in graph.node} & QUANTISED_ONNX_OPS)
        return f"its graph has {', '.join(ops)} nodes" if ops else None
    return None


def _packed_layer(path: Path) -> str | None:
    """The first dynamically quantised layer of a torch file's state_dict (alone or inside a checkpoint)."""
    content = torch_load_weights(path)  # memory-mapped: reads the pickle, not the tensor data
    if not isinstance(content, dict):
        return None
    dicts = [content, *(value for value in content.values() if isinstance(value, dict))]
    key = next((str(k) for d in dicts for k in d if PACKED in str(k)), None)
    return key.split(PACKED)[0] if key is not None else None


def resolve_input_specs(loaded: Any, explicit: tuple[str, ...]) -> tuple[str, ...]:
    """The `--input` specs the drift check will use, settled before anything is converted or written.

    `--input` first, then what the model knows (mlops.json, HF config, ONNX graph); a plain state_dict
    loaded with `--arch` naming a built-in architecture (mlops_cli.core.zoo:ConvNet) gets that zoo entry's inputs.
    A model whose inputs cannot be told fails here (exit 2), so the usage error leaves no output behind.
    """
    from mlops_cli.core.inputs import specs_for

    if explicit:
        specs_for(loaded, list(explicit))  # a malformed --input fails here with its own message
        return explicit
    specs = () if loaded.input_specs else zoo_inputs(loaded.arch)
    try:
        specs_for(loaded, list(specs) or None)
    except UsageError as exc:
        hint = f"{exc.hint or ''} Or pass --no-check to convert without measuring drift.".lstrip()
        raise UsageError(exc.message, hint=hint) from exc
    return specs


def zoo_inputs(arch: str | None) -> tuple[str, ...]:
    """The input specs of the built-in model whose architecture `arch` names (mlops_cli.core.zoo:ConvNet), or ()."""
    from mlops_cli.core import zoo

    name = next((name for name, path in zoo.ARCH_PATHS.items() if path == arch), None)
    return zoo.ENTRIES[name].inputs if name else ()


def weight_files(folder: Path) -> list[Path]:
    """The weight files of a model folder: every *.safetensors, `pytorch_model*.bin` / `model*.bin`, and the
    file mlops.json names. Other pickles (training_args.bin, optimizer.pt, rng_state.pth) are not weights."""
    named = str(read_sidecar(folder).get("weights", ""))
    return [path for path in sorted(folder.iterdir()) if path.is_file() and (
        path.suffix == ".safetensors" or path.name == named
        or (path.suffix == ".bin" and path.name.startswith(("pytorch_model", "model"))))]


def can_build_model(path: Path, fmt: Format, arch: str | None) -> bool:
    """Can mlops build a runnable model from this input (to measure drift)? A bare state_dict cannot."""
    if fmt in (Format.SAFETENSORS, Format.TORCH_ZIP, Format.TORCH_LEGACY):
        return bool(arch or read_sidecar(path.parent).get("arch"))
    return fmt in (Format.HF_FOLDER, Format.WEIGHTS_FOLDER, Format.ONNX)


def output_load_options(reference_loaded: Any, options: Any) -> Any:
    """Options that load the compressed artefact as the original was loaded (same architecture)."""
    from dataclasses import replace

    if reference_loaded.arch:
        return replace(options, arch=reference_loaded.arch, arch_kwargs=dict(reference_loaded.arch_kwargs))
    return options


# ---------------------------------------------------------------- per-layer drift


JUMP_FACTOR = 10.0  # an error "jumps" when it is this many times the largest error before it...
JUMP_FLOOR = 1e-2  # ...and at least this large (relative L2 error), so rounding noise never counts


@dataclass(frozen=True)
class LayerDrift:
    """One module's output, compressed model vs original, in execution order."""

    index: int
    name: str
    type: str
    relative_error: float | None  # ||cand - ref|| / ||ref||; None when the candidate is not finite
    max_abs: float | None
    reference_max_abs: float  # largest |activation| of the original: beyond the target's range it overflows there
    nonfinite: bool
    beyond_range: bool
    shape: tuple[int, ...]


@dataclass(frozen=True)
class PerLayerReport:
    input_set: str
    layers: tuple[LayerDrift, ...]
    first_jump: str | None
    jump_reason: str | None
    worst: str | None
    jump_rule: str = (f"first layer whose output is not finite, whose original activations exceed the target "
                      f"dtype's range, or whose relative error is >= {JUMP_FACTOR:g}x the largest before it "
                      f"and >= {JUMP_FLOOR:g}")
    skipped: tuple[str, ...] = field(default_factory=tuple)


def first_tensor(value: Any) -> Any:
    """The first tensor of a module's output (a tensor, a tuple, or a ModelOutput)."""
    import torch

    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, dict) or hasattr(value, "to_tuple"):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        for item in value:
            found = first_tensor(item)
            if found is not None:
                return found
    return None


def capture_outputs(module: Any, run: Any) -> dict[str, tuple[str, Any]]:
    """Run `run()` with forward hooks on every submodule; {name: (type, first output as float32 CPU)}."""
    captured: dict[str, tuple[str, Any]] = {}
    handles = []

    def hook_for(name: str, kind: str) -> Any:
        def hook(_module: Any, _inputs: Any, output: Any) -> None:
            tensor = first_tensor(output)
            if name not in captured and tensor is not None and tensor.is_floating_point():
                captured[name] = (kind, tensor.detach().float().cpu())
        return hook

    for name, sub in module.named_modules():
        if name:
            handles.append(sub.register_forward_hook(hook_for(name, type(sub).__name__)))
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return captured


def compare_layers(reference: Any, candidate: Any, run_reference: Any, run_candidate: Any, label: str,
                   target: str) -> PerLayerReport:
    """Compare every module's output between the original and the compressed model; find the jump."""
    import torch

    ref_out = capture_outputs(reference, run_reference)
    cand_out = capture_outputs(candidate, run_candidate)
    limit = torch.finfo(torch_dtype(target)).max
    layers: list[LayerDrift] = []
    skipped: list[str] = []
    for name, (kind, ref) in ref_out.items():
        if name not in cand_out or tuple(cand_out[name][1].shape) != tuple(ref.shape):
            skipped.append(name)
            continue
        layers.append(_layer_drift(len(layers), name, kind, ref, cand_out[name][1], limit))
    jump, reason = _first_jump(layers, target, limit)
    finite = [layer for layer in layers if layer.relative_error is not None]
    worst = max(finite, key=lambda layer: layer.relative_error or 0.0).name if finite else None
    return PerLayerReport(label, tuple(layers), jump, reason, worst, skipped=tuple(skipped))


def _layer_drift(index: int, name: str, kind: str, ref: Any, cand: Any, limit: float) -> LayerDrift:
    import torch

    reference_max = float(ref.abs().max()) if ref.numel() else 0.0
    nonfinite = not bool(torch.isfinite(cand).all())
    if nonfinite or not ref.numel():
        return LayerDrift(index, name, kind, None, None, reference_max, nonfinite, reference_max > limit,
                          tuple(ref.shape))
    diff = (cand.double() - ref.double())
    relative = float(diff.norm() / max(float(ref.double().norm()), 1e-12))
    return LayerDrift(index, name, kind, relative, float(diff.abs().max()), reference_max, False,
                      reference_max > limit, tuple(ref.shape))


def _first_jump(layers: list[LayerDrift], target: str, limit: float) -> tuple[str | None, str | None]:
    largest_before = 0.0
    for layer in layers:
        if layer.nonfinite:
            return layer.name, "its output holds inf/NaN"
        if layer.beyond_range:
            return layer.name, (f"the original's activations reach {layer.reference_max_abs:.3g}, beyond "
                                f"{target}'s largest finite value {limit:.6g}: real {target} compute overflows here")
        error = layer.relative_error or 0.0
        if error >= JUMP_FLOOR and error >= JUMP_FACTOR * largest_before:
            return layer.name, (f"relative error {error:.3g} is {error / largest_before:.3g}x the largest before it "
                                f"({largest_before:.3g})" if largest_before else
                                f"relative error {error:.3g} at the first compared layer")
        largest_before = max(largest_before, error)
    return None, None
