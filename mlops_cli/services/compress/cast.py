"""Counted casts for `mlops compress half`: what converting each tensor did to its values, and the sizes.

- Which tensors a conversion touches: only floating-point ones, minus those `keep.KeepRules` keeps (by default
  the normalisation layers, whose parameters are tiny and whose statistics suffer most from rounding).
- The safety count of a cast, per tensor: values that overflow to inf, flush to zero, or land in the
  target dtype's subnormal range (where precision collapses). Counted on the real cast, not estimated.
  Mask fills (the source dtype's extreme, e.g. the `finfo(float32).min` every Hugging Face attention mask
  adds) are not overflow: they saturate to the target's extreme and are counted apart.
- Size accounting: the converted tensors alone, all tensors, the files on disk.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlops_cli.core.safetensors_file import CHUNK_ELEMENTS, torch_dtype
from mlops_cli.services.compress.keep import BY_MODULE_TYPE, BY_NAME, KeepRules
from mlops_cli.services.compress.shared import disk_size

HALF_DTYPES = {"fp16": "float16", "bf16": "bfloat16"}
FLOAT_DTYPES = ("float64", "float32", "float16", "bfloat16")  # fp8 tensors are left alone


# ---------------------------------------------------------------- which tensors change


@dataclass(frozen=True)
class TensorPlan:
    """What happens to one tensor: converted or not, why, and (for a kept one) what chose to keep it."""

    convert: bool
    reason: str
    kept_by: str | None = None  # keep.BY_MODULE_TYPE or keep.BY_NAME


def dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def plan_tensor(name: str, dtype: str, target: str, keep: KeepRules) -> TensorPlan:
    """Only floating tensors that the keep rules do not keep change."""
    if dtype not in FLOAT_DTYPES:
        return TensorPlan(False, f"not floating-point ({dtype})")
    if dtype == target:
        return TensorPlan(False, f"already {target}")
    decision = keep.match(name)
    if decision is not None:
        return TensorPlan(False, decision.reason, decision.by)
    return TensorPlan(True, "converted")


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
    kept_by: str | None = None  # for a kept tensor: keep.BY_MODULE_TYPE or keep.BY_NAME

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


def tensor_safety(name: str, shape: tuple[int, ...], source_dtype: str, output_dtype: str, plan: TensorPlan,
                  itemsizes: tuple[int, int], counts: CastCounts | None = None) -> TensorSafety:
    elements = math.prod(shape)
    counts = counts or CastCounts()
    return TensorSafety(name, tuple(shape), source_dtype, output_dtype, plan.convert, plan.reason, elements,
                        elements * itemsizes[0], elements * itemsizes[1], counts.overflow, counts.underflow,
                        counts.subnormal, counts.nonfinite_source, counts.max_abs if plan.convert else None,
                        counts.sentinel, plan.kept_by)


def convert_state_dict(state_dict: dict[str, Any], target: str, keep: KeepRules
                       ) -> tuple[dict[str, Any], list[TensorSafety]]:
    """Convert the floating tensors of an in-memory state_dict; everything else is kept as it is."""
    caster = ChunkCaster(target)
    result: dict[str, Any] = {}
    safety: list[TensorSafety] = []
    for name, tensor in state_dict.items():
        source = dtype_name(tensor.dtype)
        plan = plan_tensor(name, source, target, keep)
        counts = None
        if plan.convert:
            result[name], counts = cast_tensor(tensor, target, caster)
        else:
            result[name] = tensor
        after = result[name].element_size()
        safety.append(tensor_safety(name, tuple(tensor.shape), source, dtype_name(result[name].dtype), plan,
                                    (tensor.element_size(), after), counts))
    return result, safety


@dataclass(frozen=True)
class SafetyTotals:
    converted_tensors: int
    kept_tensors: int  # floating tensors left in their dtype by the keep rules
    other_tensors: int  # integer/bool tensors and tensors already in the target dtype
    overflow: int
    underflow: int
    subnormal: int
    nonfinite_source: int
    tensors_with_overflow: tuple[str, ...]
    sentinel: int = 0  # mask fills saturated to the target's largest value (not overflow)
    tensors_with_sentinel: tuple[str, ...] = ()
    kept_by_module_type: int = 0  # kept because their module is a normalisation layer
    kept_by_name: int = 0  # kept because their name matches a pattern


def safety_totals(tensors: Iterable[TensorSafety]) -> SafetyTotals:
    items = list(tensors)
    return SafetyTotals(
        converted_tensors=sum(t.converted for t in items),
        kept_tensors=sum(t.kept_by is not None for t in items),
        other_tensors=sum(not t.converted and t.kept_by is None for t in items),
        overflow=sum(t.overflow for t in items),
        underflow=sum(t.underflow for t in items),
        subnormal=sum(t.subnormal for t in items),
        nonfinite_source=sum(t.nonfinite_source for t in items),
        tensors_with_overflow=tuple(t.name for t in items if t.overflow),
        sentinel=sum(t.sentinel for t in items),
        tensors_with_sentinel=tuple(t.name for t in items if t.sentinel),
        kept_by_module_type=sum(t.kept_by == BY_MODULE_TYPE for t in items),
        kept_by_name=sum(t.kept_by == BY_NAME for t in items),
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


