"""Timing done properly: warm-up, repeats, CUDA synchronisation, median and spread."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Timing:
    """Summary of repeated wall-clock measurements, in milliseconds."""

    median_ms: float
    p90_ms: float
    min_ms: float
    max_ms: float
    stdev_ms: float
    repeats: int
    warmup: int

    @property
    def spread_pct(self) -> float:
        """Interquantile-style spread: (p90 - min) relative to the median, in percent."""
        return 100.0 * (self.p90_ms - self.min_ms) / self.median_ms if self.median_ms else 0.0


def speedup(before: Timing | None, after: Timing | None) -> float | None:
    """How many times faster `after` is than `before` (median over median): > 1 means faster; None when either
    side was not timed. The one place a speed-up is computed, so every table means the same by it."""
    if before is None or after is None or not after.median_ms:
        return None
    return before.median_ms / after.median_ms


def summarize_samples(samples_ms: list[float], warmup: int = 0) -> Timing:
    """Reduce raw samples (ms) to a Timing."""
    if not samples_ms:
        raise ValueError("no timing samples")
    ordered = sorted(samples_ms)
    p90_index = min(len(ordered) - 1, max(0, round(0.9 * (len(ordered) - 1))))
    return Timing(
        median_ms=statistics.median(ordered),
        p90_ms=ordered[p90_index],
        min_ms=ordered[0],
        max_ms=ordered[-1],
        stdev_ms=statistics.pstdev(ordered) if len(ordered) > 1 else 0.0,
        repeats=len(ordered),
        warmup=warmup,
    )


def synchronizer(device: str) -> Callable[[], None]:
    """A function that waits for queued GPU work on `device` (a no-op on CPU)."""
    if str(device).startswith("cuda"):
        import torch

        return torch.cuda.synchronize
    return lambda: None


def measure(fn: Callable[[], Any], *, warmup: int = 2, repeats: int = 10, device: str = "cpu",
            min_time_s: float = 0.0) -> Timing:
    """Time `fn` after `warmup` calls; keeps repeating until `repeats` samples and `min_time_s` elapsed."""
    sync = synchronizer(device)
    for _ in range(warmup):
        fn()
    sync()
    samples: list[float] = []
    started = time.perf_counter()
    while len(samples) < repeats or (time.perf_counter() - started) < min_time_s:
        begin = time.perf_counter()
        fn()
        sync()
        samples.append((time.perf_counter() - begin) * 1000.0)
        if len(samples) >= 10_000:
            break
    return summarize_samples(samples, warmup)


def measure_interleaved(fns: dict[str, Callable[[], Any]], *, warmup: int = 2, repeats: int = 10,
                        device: str = "cpu") -> dict[str, Timing]:
    """Time several functions A/B/A/B in one loop, so machine noise hits all of them alike."""
    sync = synchronizer(device)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            begin = time.perf_counter()
            fn()
            sync()
            samples[name].append((time.perf_counter() - begin) * 1000.0)
    return {name: summarize_samples(values, warmup) for name, values in samples.items()}


class Stopwatch:
    """Records named stage durations (seconds) for 'time taken by each stage' reports."""

    def __init__(self) -> None:
        self.stages: dict[str, float] = {}

    def stage(self, name: str) -> _Stage:
        return _Stage(self, name)


class _Stage:
    def __init__(self, watch: Stopwatch, name: str) -> None:
        self.watch, self.name = watch, name

    def __enter__(self) -> _Stage:
        self.begin = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.watch.stages[self.name] = self.watch.stages.get(self.name, 0.0) + time.perf_counter() - self.begin
