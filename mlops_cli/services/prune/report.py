"""What a prune run reports: per tensor, per amount, and for the whole run (frozen; --json serialises it)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from mlops_cli.core.contract import Report
from mlops_cli.core.parity import ParityReport
from mlops_cli.core.timing import SpeedRatio, Timing, speed_ratio
from mlops_cli.services.perplexity import PerplexityComparison


@dataclass(frozen=True)
class LayerChange:
    """One pruned tensor: its zeros after pruning, or its shape before/after a structural shrink."""

    name: str
    module_type: str
    shape: tuple[int, ...]
    zeros: int
    elements: int
    shape_before: tuple[int, ...] | None = None

    sparsity: float = dataclasses.field(init=False)  # a field, not a property, so --json carries it

    def __post_init__(self) -> None:
        object.__setattr__(self, "sparsity", self.zeros / self.elements if self.elements else 0.0)


@dataclass(frozen=True)
class SizeFigures:
    """Weight bytes as stored (raw) and compressed (gzip): zeros only pay off in the second figure.

    `gzip_bytes` is an estimate by `codec` (None when skipped); `method` says how it was made and
    `sampled_share` which share of the bytes was actually compressed (1.0: all of them, exact for that codec).
    """

    raw_bytes: int
    gzip_bytes: int | None
    codec: str = ""
    method: str = ""
    sampled_share: float = 1.0

    gzip_ratio: float | None = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        ratio = None if self.gzip_bytes is None else self.gzip_bytes / self.raw_bytes if self.raw_bytes else 1.0
        object.__setattr__(self, "gzip_ratio", ratio)


@dataclass(frozen=True)
class Drift:
    """Worst figures over every output and input set of the parity run (pruning is expected to drift)."""

    max_abs: float | None
    mean_abs: float | None
    cosine: float | None
    top1_agreement: float | None
    error: str | None = None


@dataclass(frozen=True)
class LatencyFigures:
    """Before/after latency, timed A/B interleaved on the default input shape.

    `speedup` is the ratio of the medians; it is `measurable` only when its bootstrap interval excludes 1.0
    (core/timing.speed_ratio): zeros in dense tensors change nothing, and noise must not read as a speed-up.
    """

    input_set: str
    before: Timing
    after: Timing

    ratio: SpeedRatio | None = dataclasses.field(init=False)
    speedup: float | None = dataclasses.field(init=False)  # before p50 / after p50
    measurable: bool = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        ratio = speed_ratio(self.before, self.after)
        object.__setattr__(self, "ratio", ratio)
        object.__setattr__(self, "speedup", ratio.ratio if ratio else None)
        object.__setattr__(self, "measurable", bool(ratio and ratio.measurable))

    @property
    def repeats(self) -> int:
        return min(self.before.repeats, self.after.repeats)


@dataclass(frozen=True)
class AmountResult:
    """Everything measured for one pruning amount."""

    amount: float
    layers: tuple[LayerChange, ...]
    target_zeros: int
    target_elements: int
    model_zeros: int
    parameters: int
    size: SizeFigures
    drift: Drift
    parity: ParityReport
    latency: LatencyFigures | None
    macs: int | None
    passed: bool
    failure: str | None = None
    output: str | None = None
    output_files: dict[str, int] = dataclasses.field(default_factory=dict)
    reloaded: str | None = None  # what loading the output back showed
    perplexity: PerplexityComparison | None = None  # a causal LM's perplexity before/after pruning

    target_sparsity: float = dataclasses.field(init=False)  # zeros (or removed share) of the pruned tensors
    model_sparsity: float = dataclasses.field(init=False)  # zeros over all parameters

    def __post_init__(self) -> None:
        targets = self.target_zeros / self.target_elements if self.target_elements else 0.0
        object.__setattr__(self, "target_sparsity", targets)
        object.__setattr__(self, "model_sparsity", self.model_zeros / self.parameters if self.parameters else 0.0)


@dataclass(frozen=True, kw_only=True)
class PruneReport(Report):
    model: str
    model_kind: str
    method: str
    n: float
    dim: int | None
    structured_shrink: bool
    seed: int
    device: str
    targets: tuple[str, ...]
    skipped: tuple[tuple[str, str], ...]  # (module, why it is left alone)
    parameters_before: int
    model_zeros_before: int
    size_before: SizeFigures
    macs_before: int | None
    results: tuple[AmountResult, ...]
    enforced: bool
    thresholds: dict[str, float]
    passed: bool
    verdict: str
    notes: tuple[str, ...] = ()

    @property
    def is_sweep(self) -> bool:
        return len(self.results) > 1
