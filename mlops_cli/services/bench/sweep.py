"""The timed sweep: every candidate at every batch size (and sequence length), interleaved with the baseline.

At each shape every candidate is called once with its peak memory measured (the first call at a new size is
the one that allocates), then all are timed together, interleaved by blocks (core/timing.measure_interleaved),
so machine noise hits them alike and each speed-up vs eager gets a bootstrap interval from like-for-like samples.
A candidate that runs out of memory at a batch size gets one row saying so and is not run at larger batches.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from mlops_cli.core.inputs import InputPlan
from mlops_cli.core.timing import PeakMemory, SpeedRatio, Timing, measure_interleaved, speed_ratio
from mlops_cli.services.bench.candidates import ORT, BoundCall, Candidate

TIMED, OUT_OF_MEMORY, FAILED, DIFFERS, SKIPPED = "timed", "out of memory", "failed", "outputs differ", "skipped"
MEMORY_RSS, MEMORY_CUDA, NOT_MEASURED = "peak RSS growth", "peak CUDA memory allocated", "not measured"
# ONNX Runtime and allocators word running out of memory in their own ways.
_OOM_WORDS = ("out of memory", "failed to allocate", "bad_alloc", "cannot allocate memory")


@dataclass(frozen=True)
class BenchRow:
    """One runtime/precision at one shape: its timing, throughput, memory and speed-up vs eager, or why not."""

    runtime: str
    dtype: str
    batch: int | None
    seq_len: int | None
    status: str  # timed, out of memory, failed, outputs differ, skipped
    latency: Timing | None = None
    throughput: float | None = None
    throughput_unit: str = "items/s"  # tokens/s for text (batch x sequence per second)
    peak_memory_bytes: int | None = None
    memory: str = NOT_MEASURED  # how peak_memory_bytes was measured
    speedup: SpeedRatio | None = None  # vs eager fp32 at the same shape; None for the baseline itself
    speedup_text: str | None = None  # "1.52x faster (1.40-1.61x)", "no measurable difference (...)", "baseline"
    note: str | None = None

    @property
    def label(self) -> str:
        return f"{self.runtime} {self.dtype}"


@dataclass(frozen=True)
class SweepSettings:
    batches: tuple[int, ...]
    seq_lens: tuple[int | None, ...]  # (None,) for models without a sequence dim
    repeats: int
    warmup: int
    device: str
    baseline: str | None  # the label speed-ups are relative to (eager fp32), when it is benched


@dataclass
class _Shape:
    batch: int
    seq_len: int | None
    inputs: dict[str, np.ndarray]
    rows: list[BenchRow] = field(default_factory=list)

    @property
    def unit(self) -> str:
        return "items/s" if self.seq_len is None else "tokens/s"


def is_out_of_memory(exc: BaseException) -> bool:
    """MemoryError, torch.cuda.OutOfMemoryError, or an allocation failure reported by ONNX Runtime."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    return any(word in str(exc).lower() for word in _OOM_WORDS)


def time_sweep(candidates: list[Candidate], plan: InputPlan, settings: SweepSettings) -> list[BenchRow]:
    """Rows for every candidate at every shape; at each sequence length the batch sizes go up, and a candidate
    that ran out of memory is not run again at a larger batch."""
    rows: list[BenchRow] = []
    for seq_len in settings.seq_lens:
        active = list(candidates)
        for batch in sorted(settings.batches):
            if not active:
                break
            sizes = {"batch": batch} if seq_len is None else {"batch": batch, "sequence": seq_len}
            shape = _Shape(batch, seq_len, plan.at(sizes).tensors)
            active = _run_shape(active, shape, settings)
            rows += shape.rows
    return rows


def _run_shape(candidates: list[Candidate], shape: _Shape, settings: SweepSettings) -> list[Candidate]:
    """Bench every candidate at one shape; returns those still worth running at larger batches."""
    calls: dict[str, BoundCall] = {}
    memory: dict[str, tuple[int | None, str]] = {}
    survivors: list[Candidate] = []
    for candidate in candidates:
        try:
            call = candidate.bind(shape.inputs)
            memory[candidate.label] = first_call(call, candidate)
        except Exception as exc:
            shape.rows.append(_not_timed(candidate, shape, exc))
            if not is_out_of_memory(exc):
                survivors.append(candidate)
            continue
        calls[candidate.label] = call
        survivors.append(candidate)
    if not calls:
        return survivors
    try:
        timings = measure_interleaved(calls, warmup=settings.warmup, repeats=settings.repeats, device=settings.device)
    except Exception as exc:  # which side raised is unknown: none of them is timed at this shape
        by_label = {c.label: c for c in candidates}
        shape.rows += [_not_timed(by_label[label], shape, exc) for label in calls]
        return [c for c in survivors if c.label not in calls or not is_out_of_memory(exc)]
    baseline = timings.get(settings.baseline or "")
    for candidate in (c for c in candidates if c.label in timings):
        shape.rows.append(_timed_row(candidate, shape, timings[candidate.label], baseline,
                                     candidate.label == settings.baseline, memory[candidate.label]))
    return survivors


def _timed_row(candidate: Candidate, shape: _Shape, timing: Timing, baseline: Timing | None, is_baseline: bool,
               memory: tuple[int | None, str]) -> BenchRow:
    items = shape.batch * (shape.seq_len or 1)
    ratio = None if is_baseline or baseline is None else speed_ratio(baseline, timing)
    text = "baseline" if is_baseline else (ratio.describe() if ratio else None)
    return BenchRow(candidate.runtime, candidate.dtype, shape.batch, shape.seq_len, TIMED, latency=timing,
                    throughput=1000.0 * items / timing.median_ms if timing.median_ms else None,
                    throughput_unit=shape.unit,
                    peak_memory_bytes=memory[0], memory=memory[1], speedup=ratio, speedup_text=text)


def _not_timed(candidate: Candidate, shape: _Shape, exc: BaseException) -> BenchRow:
    if is_out_of_memory(exc):
        release_cuda_cache(candidate.device)
        return BenchRow(candidate.runtime, candidate.dtype, shape.batch, shape.seq_len, OUT_OF_MEMORY,
                        throughput_unit=shape.unit,
                        note=f"out of memory at batch {shape.batch}, larger batches skipped")
    return BenchRow(candidate.runtime, candidate.dtype, shape.batch, shape.seq_len, FAILED, throughput_unit=shape.unit,
                    note=f"failed at batch {shape.batch}: {first_line(exc)}")


def first_call(call: BoundCall, candidate: Candidate) -> tuple[int | None, str]:
    """Run `call` once (the call that allocates at a new size) and measure its peak memory: RSS growth on CPU,
    torch.cuda.max_memory_allocated on CUDA for torch runtimes; ONNX Runtime's CUDA memory is not measured."""
    if not candidate.device.startswith("cuda"):
        with PeakMemory() as peak:
            call()
        growth = peak.growth_bytes
        return (None, NOT_MEASURED) if growth is None else (growth, MEMORY_RSS)
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    call()
    torch.cuda.synchronize()
    if candidate.runtime == ORT:
        return None, NOT_MEASURED
    return int(torch.cuda.max_memory_allocated()), MEMORY_CUDA


def release_cuda_cache(device: str) -> None:
    """After running out of GPU memory, hand torch's cached blocks back so the other runtimes can go on."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


def first_line(exc: BaseException, limit: int = 200) -> str:
    text = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def guarded(build: Callable[[], Candidate | BenchRow], runtime: str, dtype: str) -> Candidate | BenchRow:
    """Build a candidate, or the row saying why it could not be (an export or compile that failed)."""
    try:
        return build()
    except Exception as exc:
        if is_out_of_memory(exc):
            return BenchRow(runtime, dtype, None, None, OUT_OF_MEMORY, note="out of memory while preparing it")
        return BenchRow(runtime, dtype, None, None, FAILED, note=first_line(exc))
