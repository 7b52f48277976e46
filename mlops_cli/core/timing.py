"""Timing done properly: warm-up, repeats, CUDA synchronisation, median and spread; ratios with their
uncertainty; and the conditions under which no figure should be trusted (a busy or oversubscribed machine).
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

NOISY_SPREAD = 1.5  # p90 above this many times p50: the figures are noisy
CONFIDENCE = 0.95  # of the interval around every speed ratio
INTERLEAVE_BLOCK = 5  # timed calls of one function in a row, at most, when several are timed side by side


@dataclass(frozen=True)
class Timing:
    """Summary of repeated wall-clock measurements, in milliseconds (the raw samples kept for ratios)."""

    median_ms: float
    p90_ms: float
    min_ms: float
    max_ms: float
    stdev_ms: float
    repeats: int
    warmup: int
    samples_ms: tuple[float, ...] = field(default=(), repr=False, compare=False, metadata={"json": False})

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
        samples_ms=tuple(samples_ms),
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
    """Time several functions side by side, in alternating blocks (A A A B B B A A A ...) that each start with
    one untimed call, so slow drifts of the machine hit all of them alike.

    Blocks, not strict A/B alternation: alternating call by call makes each function start every call with the
    caches the other one filled; for tiny BERT at sequence 128 on one thread that inflated eager by ~20% and ONNX
    Runtime by ~30% against each timed alone (measured by `mlops bench`'s author). A re-warmed block gives the
    figures measured alone.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    block = max(1, min(INTERLEAVE_BLOCK, repeats // 4))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    while any(len(values) < repeats for values in samples.values()):
        for name, fn in fns.items():
            wanted = min(block, repeats - len(samples[name]))
            if wanted:
                samples[name] += measure(fn, warmup=1, repeats=wanted, device=device).samples_ms
    return {name: summarize_samples(values, warmup) for name, values in samples.items()}


@dataclass(frozen=True)
class SpeedRatio:
    """`before` median / `after` median with a bootstrap interval: > 1 means `after` is faster."""

    ratio: float
    low: float
    high: float
    confidence: float = CONFIDENCE

    @property
    def measurable(self) -> bool:
        """False when the interval includes 1.0: then no speed-up (or slow-down) can be claimed."""
        return not (self.low <= 1.0 <= self.high)

    def describe(self) -> str:
        interval = f"{self.low:.2f}-{self.high:.2f}x"
        if not self.measurable:
            return f"no measurable difference ({interval})"
        if self.ratio > 1:
            return f"{self.ratio:.2f}x faster ({interval})"
        return f"{1 / self.ratio:.2f}x slower ({interval})"


def speed_ratio(before: Timing | None, after: Timing | None, resamples: int = 2000, seed: int = 0
                ) -> SpeedRatio | None:
    """The speed-up of `after` over `before` with a percentile-bootstrap interval on the ratio of medians.

    With fewer than 3 samples a side there is no interval worth the name: the ratio is returned as not
    measurable (low = min, high = max of the possible ratios), never as a claimed speed-up.
    """
    import numpy as np

    ratio = speedup(before, after)
    if ratio is None or before is None or after is None:
        return None
    a, b = np.asarray(before.samples_ms), np.asarray(after.samples_ms)
    if a.size < 3 or b.size < 3 or not (b > 0).all():
        low = float(before.min_ms / after.max_ms) if after.max_ms else ratio
        high = float(before.max_ms / after.min_ms) if after.min_ms else ratio
        return SpeedRatio(ratio, min(low, 1.0), max(high, 1.0))
    rng = np.random.default_rng(seed)
    ratios = (np.median(rng.choice(a, (resamples, a.size)), axis=1)
              / np.median(rng.choice(b, (resamples, b.size)), axis=1))
    tail = 100 * (1 - CONFIDENCE) / 2
    low, high = np.percentile(ratios, [tail, 100 - tail])
    return SpeedRatio(ratio, float(low), float(high))


# ---------------------------------------------------------------- can the figures be trusted?


def usable_cores() -> int:
    """Cores this process may run on (the affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def other_runnable() -> float | None:
    """Runnable threads of other processes right now (Linux /proc/stat procs_running, minus this one), or None."""
    try:
        with open("/proc/stat", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("procs_running"):
                    return max(0.0, float(line.split()[1]) - 1)
    except OSError:
        return None
    return None


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def default_threads() -> int:
    """CPU threads for timed work: the usable cores not already busy with other runnable work, at least 1.
    Oversubscription (more threads than free cores) made a 2-thread BERT forward 40x slower here."""
    busy = other_runnable() or 0.0
    return max(1, usable_cores() - round(busy))


def frequency_scaling() -> str | None:
    """The CPU frequency governor when it can vary the clock ('powersave', 'ondemand'...), else None."""
    try:
        with open("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor", encoding="ascii") as handle:
            governor = handle.read().strip()
    except OSError:
        return None
    return None if governor == "performance" else governor


def trust_warnings(threads: int | None, timings: Iterable[Timing] = ()) -> list[str]:
    """Why the figures of a timed run may not be trusted: other work on the CPUs, more threads than free cores,
    a varying clock, or samples too spread out. An empty list means nothing was seen against them."""
    warnings: list[str] = []
    cores = usable_cores()
    others = other_runnable()
    load = load_average()
    if others is not None and others >= cores:
        warnings.append(f"the machine is busy: {others:.0f} other runnable thread(s) on {cores} usable core(s); "
                        "timings are inflated and noisy")
    elif load is not None and load > cores + 0.5:
        warnings.append(f"the machine is busy: load average {load:.1f} on {cores} usable core(s)")
    if threads is not None:
        free = cores - round(others or 0.0)
        if threads > max(1, free):
            warnings.append(f"{threads} thread(s) asked for but only {max(free, 0)} core(s) are free: "
                            "oversubscription can make runs many times slower (use --threads)")
    governor = frequency_scaling()
    if governor:
        warnings.append(f"CPU frequency scaling is on (governor {governor}): the clock can change during the run")
    noisy = [t for t in timings if t.median_ms and t.p90_ms / t.median_ms > NOISY_SPREAD]
    if noisy:
        warnings.append(f"noisy samples: p90 above {NOISY_SPREAD}x p50 in {len(noisy)} measurement(s); "
                        "treat small differences as noise")
    return warnings


# ---------------------------------------------------------------- memory


class PeakMemory:
    """Peak resident memory (RSS) growth of this process while the block runs, sampled by a thread.

    `growth_bytes` is None where RSS cannot be read (no /proc): report "not measured", never 0.
    """

    def __init__(self, interval_s: float = 0.002) -> None:
        self.interval_s = interval_s
        self.baseline: int | None = None
        self.peak: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def rss_bytes() -> int | None:
        try:
            with open("/proc/self/statm", encoding="ascii") as handle:
                return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            return None

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._record()

    def _record(self) -> None:
        value = self.rss_bytes()
        if value is not None and (self.peak is None or value > self.peak):
            self.peak = value

    def __enter__(self) -> PeakMemory:
        self.baseline = self.rss_bytes()
        self.peak = self.baseline
        if self.baseline is not None:
            self._thread = threading.Thread(target=self._sample, name="mlops-peak-rss", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._record()

    @property
    def growth_bytes(self) -> int | None:
        if self.baseline is None or self.peak is None:
            return None
        return self.peak - self.baseline


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
