"""Measuring one generation run: a step clock, peak memory, and the figures derived from them.

The step clock ticks each time a new token is known on the host (CUDA synchronised, every visible GPU, since
`--device-map` may spread a model over several). For `model.generate` it is a stopping criterion that never
stops: `generate` calls it once per step right after appending the token, beam search included, and never
with the prompt (a streamer's first `put()` carries the prompt, so a streamer-based clock would start early).
Our loop ticks it from a step observer.

Definitions (also in `mlops generate --help` and the README):
- TTFT: from the call to the first *generated* token (the prompt pass included);
- per-token latency: time between consecutive ticks, so the first token is excluded;
- decode tokens/s: tokens produced after the first step / time from the first tick to the last;
- total: the whole call, synchronised;
- peak memory: CUDA max allocated (weights included), or on CPU the growth of the resident set: peak RSS
  during the run (VmHWM, reset before the run through /proc/self/clear_refs) minus RSS before it.
"""

from __future__ import annotations

import itertools
import re
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import StoppingCriteria

from mlops_cli.core.timing import PeakMemory, Timing, summarize_samples


@dataclass(frozen=True)
class Metrics:
    """A strategy's figures: medians over the measured runs (warm-up runs excluded) and their spread."""

    runs: int
    warmup: int
    prompt_tokens: int
    new_tokens: int
    ttft: Timing | None  # time to the first generated token
    decode_tokens_per_s: float | None  # median; tokens after the first / time after the first token
    decode_tokens_per_s_min: float | None
    decode_tokens_per_s_max: float | None
    token_latency: Timing | None  # per-token latency over all runs, first token excluded (median = p50)
    total: Timing
    peak_memory_bytes: int | None


class StepClock:
    """Timestamps (perf_counter seconds) of the moments each new token is known on the host."""

    def __init__(self, cuda: bool) -> None:
        self.sync = _sync_all_cuda if cuda else None
        self.start = 0.0
        self.ticks: list[float] = []

    def begin(self) -> None:
        if self.sync:
            self.sync()
        self.start = time.perf_counter()

    def tick(self) -> None:
        if self.sync:
            self.sync()
        self.ticks.append(time.perf_counter())


def _sync_all_cuda() -> None:
    for index in range(torch.cuda.device_count()):  # --device-map may spread the model over several GPUs
        torch.cuda.synchronize(index)


class ClockCriterion(StoppingCriteria):
    """A stopping criterion that never stops: `generate` calls it once per step, right after the new token."""

    def __init__(self, clock: StepClock) -> None:
        self.clock = clock
        self._never: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        self.clock.tick()
        never = self._never
        if never is None or never.shape[0] != input_ids.shape[0] or never.device != input_ids.device:
            never = self._never = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        return never


class MemoryProbe:
    """Peak memory of one run: CUDA max allocated, or on CPU the growth of the resident set during the run."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.resettable = not cuda and _reset_peak_rss()
        if cuda:
            self.kind = "CUDA max allocated (weights included)"
        elif self.resettable:
            self.kind = "RSS growth on CPU (peak RSS during the run - RSS before it)"
        else:  # no resettable peak counter: a thread samples the RSS (never a 0 that means "not measured")
            self.kind = "RSS growth on CPU, sampled every 2 ms during the run"
        self.baseline = 0
        self.sampler: PeakMemory | None = None

    def begin(self) -> None:
        if self.cuda:
            for index in range(torch.cuda.device_count()):
                torch.cuda.reset_peak_memory_stats(index)
        elif self.resettable and _reset_peak_rss():
            self.baseline = PeakMemory.rss_bytes() or 0
        else:
            self.sampler = PeakMemory().__enter__()

    def peak(self) -> int | None:
        if self.cuda:
            return sum(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count()))
        if self.resettable:
            return max(0, _peak_rss_bytes() - self.baseline)
        if self.sampler is None:
            return None
        self.sampler.__exit__()
        return self.sampler.growth_bytes  # None where the RSS cannot be read: shown as "not measured"


def _reset_peak_rss() -> bool:
    """Linux: writing 5 to /proc/self/clear_refs resets the peak RSS (VmHWM) to the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int:
    match = re.search(r"^VmHWM:\s+(\d+)", Path("/proc/self/status").read_text(), re.MULTILINE)
    return int(match.group(1)) * 1024 if match else 0


@dataclass
class RunRecord:
    """The raw outcome of one timed run."""

    sequences: torch.Tensor
    start: float
    ticks: list[float]
    end: float
    peak_memory_bytes: int | None


@dataclass(frozen=True)
class RunMetrics:
    """Figures of one run (see the module docstring for the definitions)."""

    new_tokens: int
    ttft_ms: float | None
    step_latencies_ms: tuple[float, ...]
    decode_tokens_per_s: float | None
    total_ms: float
    peak_memory_bytes: int | None


def run_metrics(record: RunRecord, new_tokens: int, batch_size: int) -> RunMetrics:
    ticks = record.ticks
    ttft = (ticks[0] - record.start) * 1000 if ticks else None
    latencies = tuple((b - a) * 1000 for a, b in itertools.pairwise(ticks))
    decode_time = ticks[-1] - ticks[0] if len(ticks) > 1 else 0.0
    decode_tokens = max(0, new_tokens - batch_size)  # every row gets its first token at the first tick
    tps = decode_tokens / decode_time if decode_time > 0 and decode_tokens else None
    return RunMetrics(new_tokens, ttft, latencies, tps, (record.end - record.start) * 1000, record.peak_memory_bytes)


def summarize_runs(runs: Sequence[RunMetrics], prompt_tokens: int, warmup: int) -> Metrics:
    ttfts = [r.ttft_ms for r in runs if r.ttft_ms is not None]
    rates = [r.decode_tokens_per_s for r in runs if r.decode_tokens_per_s is not None]
    latencies = [value for r in runs for value in r.step_latencies_ms]
    peaks = [r.peak_memory_bytes for r in runs if r.peak_memory_bytes is not None]
    return Metrics(
        runs=len(runs), warmup=warmup, prompt_tokens=prompt_tokens, new_tokens=runs[-1].new_tokens,
        ttft=summarize_samples(ttfts, warmup) if ttfts else None,
        decode_tokens_per_s=statistics.median(rates) if rates else None,
        decode_tokens_per_s_min=min(rates) if rates else None,
        decode_tokens_per_s_max=max(rates) if rates else None,
        token_latency=summarize_samples(latencies, warmup) if latencies else None,
        total=summarize_samples([r.total_ms for r in runs], warmup),
        peak_memory_bytes=max(peaks) if peaks else None)
