"""`mlops diff A B`: what differs between two checkpoints, tensor by tensor, without building either model.

Names only in A or only in B, shape and dtype changes, and for every common tensor how much it moved: relative
change ‖B−A‖/‖A‖, max |Δ|, cosine and the share of elements changed (|Δ| > atol), summed per layer (the module
a tensor belongs to) and sorted by change: what did fine-tuning touch? Both sides are read range by range
(core/weight_set.py), so two large models never sit in memory together. A name that only one side stores
because it is tied to a tensor both sides have (torch.save keeps GPT-2's lm_head tied to wte, safetensors drops
it) is noted, not counted as a difference.

`expect_same` makes the report a check: it passes when nothing differs beyond atol (the CI gate for "this
conversion changed nothing"); the command turns a failure into exit 6.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from mlops_cli.core.contract import ModelRef, Report, ServiceOptions
from mlops_cli.core.errors import UsageError
from mlops_cli.core.safetensors_file import CHUNK_ELEMENTS
from mlops_cli.core.weight_set import WeightSet, open_weights

__all__ = ["DiffOptions", "DiffReport", "LayerChange", "Mismatch", "TensorChange", "run"]


@dataclass(frozen=True, kw_only=True)
class DiffOptions(ServiceOptions):
    """Compare `other` (B) with the MODEL given to `run` (A); `load` (--key, --strip-prefix) applies to both."""

    other: ModelRef
    atol: float = 0.0  # an element counts as changed when |B - A| > atol
    expect_same: bool = False


@dataclass(frozen=True)
class TensorChange:
    """How one tensor present on both sides moved from A to B."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # A's dtype ("float32 -> float16" when B's differs)
    elements: int
    identical: bool  # bit for bit the same values and dtype
    relative_change: float  # ‖B−A‖ / ‖A‖ (inf when A is all zeros and B is not)
    max_abs_diff: float
    cosine: float | None  # None when either side is all zeros
    changed_share: float  # share of elements with |B - A| > atol
    norm_a: float  # ‖A‖
    norm_diff: float  # ‖B−A‖


@dataclass(frozen=True)
class LayerChange:
    """A layer's tensors together (weight, bias, ... of one module): ‖ΔW‖ over ‖W‖ for all of them."""

    layer: str
    tensors: int
    changed_tensors: int
    elements: int
    relative_change: float
    max_abs_diff: float
    changed_share: float


@dataclass(frozen=True)
class Mismatch:
    """A tensor both sides name, with a different shape or dtype."""

    name: str
    a: str
    b: str


@dataclass(frozen=True, kw_only=True)
class DiffReport(Report):
    a: str
    b: str
    kind_a: str
    kind_b: str
    atol: float
    tensors_a: int
    tensors_b: int
    compared: int
    identical: int
    changed: int
    only_in_a: tuple[str, ...]
    only_in_b: tuple[str, ...]
    shape_changed: tuple[Mismatch, ...]
    dtype_changed: tuple[Mismatch, ...]
    tied: tuple[str, ...]  # names one side stores as a tie to a tensor both have (not counted as differences)
    layers: tuple[LayerChange, ...]  # sorted by relative change, largest first
    tensors: tuple[TensorChange, ...] = field(repr=False)  # every common tensor, largest change first
    relative_change: float  # over all compared tensors
    expect_same: bool
    passed: bool  # nothing differs beyond atol
    verdict: str


def run(ref: ModelRef, options: DiffOptions) -> DiffReport:
    """Open both sides, compare names, shapes and dtypes, then the values of every common tensor."""
    if options.atol < 0:
        raise UsageError("--atol must not be negative")
    options.on_step("reading headers")
    with open_weights(ref, options.load) as side_a, open_weights(options.other, options.load) as side_b:
        options.on_step("comparing tensors")
        return _compare(side_a, side_b, options)


def _compare(a: WeightSet, b: WeightSet, options: DiffOptions) -> DiffReport:
    common = [name for name in a.tensors if name in b.tensors]
    tied = sorted(_tied_only(a, b) | _tied_only(b, a))
    only_a = tuple(n for n in a.tensors if n not in b.tensors and n not in tied)
    only_b = tuple(n for n in b.tensors if n not in a.tensors and n not in tied)
    shapes = tuple(Mismatch(n, str(list(a.tensors[n].shape)), str(list(b.tensors[n].shape)))
                   for n in common if a.tensors[n].shape != b.tensors[n].shape)
    dtypes = tuple(Mismatch(n, a.tensors[n].dtype, b.tensors[n].dtype)
                   for n in common if a.tensors[n].dtype != b.tensors[n].dtype)
    mis_shaped = {m.name for m in shapes}
    changes = [_tensor_change(a, b, name, options.atol) for name in common if name not in mis_shaped]
    changes.sort(key=lambda c: (-_sortable(c.relative_change), c.name))
    identical = sum(c.identical for c in changes)
    changed = sum(c.max_abs_diff > options.atol for c in changes)
    passed = not (only_a or only_b or shapes or dtypes or changed)
    return DiffReport(
        warnings=tuple(a.warnings + b.warnings + _dropped_notes(a, b)), a=a.reference, b=b.reference,
        kind_a=a.kind, kind_b=b.kind, atol=options.atol, tensors_a=len(a.tensors), tensors_b=len(b.tensors),
        compared=len(changes), identical=identical, changed=changed, only_in_a=only_a, only_in_b=only_b,
        shape_changed=shapes, dtype_changed=dtypes, tied=tuple(tied), layers=_layers(changes, options.atol),
        tensors=tuple(changes), relative_change=_overall(changes), expect_same=options.expect_same,
        passed=passed, verdict=_verdict(passed, changed, len(changes), only_a, only_b, shapes, dtypes, options.atol))


def _tied_only(side: WeightSet, other: WeightSet) -> set[str]:
    """Names only `side` has that are ties to a tensor both sides have: the same values stored once."""
    return {name for name, meta in side.tensors.items()
            if name not in other.tensors and meta.tied_to is not None and meta.tied_to in other.tensors}


def _dropped_notes(a: WeightSet, b: WeightSet) -> list[str]:
    return [f"{side.reference}: training-checkpoint entries not compared: {', '.join(side.dropped_entries)}"
            for side in (a, b) if side.dropped_entries]


@dataclass
class _Sums:
    """Running sums over a tensor's ranges (float64), enough for every figure of a TensorChange."""

    a2: float = 0.0
    b2: float = 0.0
    ab: float = 0.0
    d2: float = 0.0
    max_abs: float = 0.0
    changed: int = 0
    unequal: int = 0

    def add(self, first: object, second: object, atol: float) -> None:
        import torch

        x = torch.as_tensor(first).to(torch.float64)
        y = torch.as_tensor(second).to(torch.float64)
        delta = y - x
        if bool(torch.isnan(delta).any()):  # NaN in the same place is no change; NaN on one side is inf apart
            same = (torch.isnan(x) & torch.isnan(y)) | (x == y)
            delta = torch.where(same, 0.0, delta).nan_to_num(nan=math.inf)
            x, y = x.nan_to_num(0.0), y.nan_to_num(0.0)
        self.a2 += float(torch.dot(x, x))
        self.b2 += float(torch.dot(y, y))
        self.ab += float(torch.dot(x, y))
        self.d2 += float(torch.dot(delta, delta))
        delta = delta.abs_()
        if delta.numel():
            self.max_abs = max(self.max_abs, float(delta.max()))
        self.changed += int((delta > atol).sum())
        self.unequal += int((delta > 0).sum())


def _tensor_change(a: WeightSet, b: WeightSet, name: str, atol: float) -> TensorChange:
    meta_a, meta_b = a.tensors[name], b.tensors[name]
    sums = _Sums()
    for start in range(0, meta_a.numel, CHUNK_ELEMENTS):
        stop = min(start + CHUNK_ELEMENTS, meta_a.numel)
        sums.add(a.read(name, start, stop), b.read(name, start, stop), atol)
    dtype = meta_a.dtype if meta_a.dtype == meta_b.dtype else f"{meta_a.dtype} -> {meta_b.dtype}"
    cosine = sums.ab / math.sqrt(sums.a2 * sums.b2) if sums.a2 > 0 and sums.b2 > 0 else None
    return TensorChange(
        name=name, shape=meta_a.shape, dtype=dtype, elements=meta_a.numel,
        identical=sums.unequal == 0 and meta_a.dtype == meta_b.dtype,
        relative_change=_relative(sums.d2, sums.a2), max_abs_diff=sums.max_abs,
        cosine=None if cosine is None else min(1.0, max(-1.0, cosine)),
        changed_share=sums.changed / meta_a.numel if meta_a.numel else 0.0, norm_a=math.sqrt(sums.a2),
        norm_diff=math.sqrt(sums.d2))


def _relative(delta2: float, base2: float) -> float:
    if base2 > 0:
        return math.sqrt(delta2 / base2)
    return 0.0 if delta2 == 0 else math.inf


def _sortable(value: float) -> float:
    return 1e308 if math.isinf(value) or math.isnan(value) else value


def layer_of(name: str) -> str:
    """The module a tensor belongs to: its name without the last part (`encoder.layer.0.output.dense`)."""
    return name.rpartition(".")[0] or name


def _layers(changes: list[TensorChange], atol: float) -> tuple[LayerChange, ...]:
    groups: dict[str, list[TensorChange]] = {}
    for change in changes:
        groups.setdefault(layer_of(change.name), []).append(change)
    layers = [LayerChange(
        layer=layer, tensors=len(members), changed_tensors=sum(c.max_abs_diff > atol for c in members),
        elements=sum(c.elements for c in members), relative_change=_overall(members),
        max_abs_diff=max(c.max_abs_diff for c in members),
        changed_share=sum(c.changed_share * c.elements for c in members) / max(1, sum(c.elements for c in members)))
        for layer, members in groups.items()]
    layers.sort(key=lambda layer: (-_sortable(layer.relative_change), layer.layer))
    return tuple(layers)


def _overall(changes: list[TensorChange]) -> float:
    """‖ΔW‖/‖W‖ over several tensors taken together."""
    return _relative(sum(c.norm_diff ** 2 for c in changes), sum(c.norm_a ** 2 for c in changes))


def _verdict(passed: bool, changed: int, compared: int, only_a: tuple[str, ...], only_b: tuple[str, ...],
             shapes: tuple[Mismatch, ...], dtypes: tuple[Mismatch, ...], atol: float) -> str:
    if passed:
        return f"the same: {compared} tensors, none differs by more than atol={atol:g}"
    parts = [f"{changed} of {compared} tensors differ by more than atol={atol:g}"] if changed else []
    parts += [f"{len(items)} {what}" for items, what in ((only_a, "only in A"), (only_b, "only in B"),
                                                          (shapes, "with another shape"),
                                                          (dtypes, "with another dtype")) if items]
    return "different: " + ", ".join(parts)
