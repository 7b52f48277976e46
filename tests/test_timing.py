"""Timing you can trust: ratios with intervals, the busy-machine warning, peak memory."""

from __future__ import annotations

import multiprocessing
import time

import numpy as np

from mlops_cli.core.timing import PeakMemory, SpeedRatio, speed_ratio, summarize_samples, trust_warnings


def _timing(median: float, spread: float, n: int = 30, seed: int = 0):
    rng = np.random.default_rng(seed)
    return summarize_samples(list(median * (1 + spread * rng.standard_normal(n))))


def test_an_equal_pair_is_no_measurable_difference() -> None:
    ratio = speed_ratio(_timing(10.0, 0.05, seed=1), _timing(10.0, 0.05, seed=2))
    assert ratio is not None and not ratio.measurable
    assert ratio.describe().startswith("no measurable difference")


def test_a_two_times_faster_pair_is_a_speed_up_and_the_reverse_a_slow_down() -> None:
    faster = speed_ratio(_timing(10.0, 0.05, seed=1), _timing(5.0, 0.05, seed=2))
    assert faster is not None and faster.measurable and 1.8 < faster.low <= faster.ratio <= faster.high < 2.2
    assert faster.describe().startswith("2.00x faster") or faster.describe().startswith("1.9")
    slower = speed_ratio(_timing(5.0, 0.05, seed=1), _timing(10.0, 0.05, seed=2))
    assert slower is not None and "slower" in slower.describe()


def test_too_few_samples_never_claim_a_speed_up() -> None:
    ratio = speed_ratio(summarize_samples([10.0, 10.5]), summarize_samples([5.0, 9.0]))
    assert isinstance(ratio, SpeedRatio) and not ratio.measurable


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def test_a_loaded_cpu_is_reported_as_busy_and_oversubscribed() -> None:
    from mlops_cli.core.timing import usable_cores

    cores = usable_cores()
    workers = [multiprocessing.Process(target=_spin, args=(3.0,)) for _ in range(cores + 1)]
    for worker in workers:
        worker.start()
    try:
        time.sleep(0.5)
        warnings = trust_warnings(threads=cores)
    finally:
        for worker in workers:
            worker.join()
    assert any("busy" in w for w in warnings), warnings
    assert any("oversubscription" in w for w in warnings), warnings


def test_noisy_samples_are_flagged() -> None:
    noisy = summarize_samples([1.0] * 8 + [5.0, 6.0])
    assert any("noisy" in w for w in trust_warnings(None, [noisy]))


def test_peak_memory_sees_a_short_lived_allocation() -> None:
    with PeakMemory() as peak:
        block = np.ones(64 * 1024 * 1024, dtype=np.uint8)  # 64 MiB, touched
        block[::4096] = 2
        time.sleep(0.05)
        del block
    assert peak.growth_bytes is not None and peak.growth_bytes >= 48 * 1024 * 1024


def test_threads_are_set_for_torch_and_onnxruntime_and_reported(cli) -> None:
    import torch

    from mlops_cli.core import runtimes

    before = torch.get_num_threads()
    try:
        assert runtimes.use_threads(1) == 1 and torch.get_num_threads() == 1 and runtimes._ort_threads == 1
        assert 1 <= runtimes.use_threads() <= max(before, 1)  # the default never exceeds torch's own count
        report = cli("verify-parity", "builtin:lenet", "builtin:lenet", "--threads", "1", "--repeats", "3", "--json")
        assert report.exit_code == 0, report.output
        parity = report.json()["parity"]
        assert parity["threads"] == 1
        assert all(shape["speed"]["low"] <= shape["speed"]["ratio"] <= shape["speed"]["high"]
                   for shape in parity["shapes"])
    finally:
        torch.set_num_threads(before)
