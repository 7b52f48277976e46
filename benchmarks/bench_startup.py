"""Start-up time of `mlops --help` beside `python -c pass` and a bare `import typer, rich` (goal: < 0.5 s).

Each command runs in a fresh process, interleaved (A/B/C/A/B/C...) so machine noise hits all alike;
prints median, p90 and min of the wall time.

    .venv/bin/python benchmarks/bench_startup.py [--repeats 15]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlops_cli.core.timing import summarize_samples

COMMANDS = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "python -c 'import typer, rich.table'": [sys.executable, "-c", "import typer, rich.table"],
    "mlops --help": [sys.executable, "-m", "mlops_cli", "--help"],
    "mlops zoo list": [sys.executable, "-m", "mlops_cli", "zoo", "list"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    env = {**os.environ, "COLUMNS": "100"}
    samples: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for command in COMMANDS.values():  # warm the page cache once
        subprocess.run(command, capture_output=True, env=env, check=True)
    for _ in range(args.repeats):
        for name, command in COMMANDS.items():
            begin = time.perf_counter()
            subprocess.run(command, capture_output=True, env=env, check=True)
            samples[name].append((time.perf_counter() - begin) * 1000)
    print(f"{'command':<40} {'median':>10} {'p90':>10} {'min':>10}")
    for name, values in samples.items():
        timing = summarize_samples(values)
        print(f"{name:<40} {timing.median_ms:>8.0f}ms {timing.p90_ms:>8.0f}ms {timing.min_ms:>8.0f}ms")
    help_ms = summarize_samples(samples["mlops --help"]).median_ms
    print(f"\nmlops --help median {help_ms:.0f} ms: goal < 500 ms -> {'met' if help_ms < 500 else 'NOT met'}")


if __name__ == "__main__":
    main()
