"""Benchmark `mlops average` (services/average.run) on N synthetic fp32 safetensors checkpoints of a few hundred
MB each: peak RSS growth against the largest tensor and the input size, and the time, beside a naive
`load_file` x N -> average -> `save_file`. Also `mlops diff` (services/diff.run) of two of the checkpoints.

Each method runs in its own child process (so one's memory does not hide in another's). The child imports
torch first, then measures the run with core/timing.PeakMemory (sampled RSS growth) and /proc VmHWM (the
kernel's peak, reset through /proc/self/clear_refs). Inputs are read once beforehand (page cache warm). The
outputs are compared byte for byte. The streamed average must stay within two tensors + a constant.

    .venv/bin/python benchmarks/bench_average.py [--count 3] [--size-mb 200] [--runs 1]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys, time
from pathlib import Path
import torch
torch.set_num_threads(1)
from safetensors.torch import load_file, save_file
from mlops_cli.core.contract import ModelRef
from mlops_cli.core.timing import PeakMemory
from mlops_cli.services import average, diff

method, output, inputs = sys.argv[1], Path(sys.argv[2]), [Path(p) for p in sys.argv[3:]]

def hwm_mib():
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024

def rss_mib():
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024

Path("/proc/self/clear_refs").write_text("5")
baseline = rss_mib()
started = time.perf_counter()
with PeakMemory() as memory:
    if method == "average (streamed)":
        first, *others = (ModelRef.parse(str(p)) for p in inputs)
        average.run(first, average.AverageOptions(output=output, others=tuple(others)))
    elif method == "diff (streamed)":
        diff.run(ModelRef.parse(str(inputs[0])), diff.DiffOptions(other=ModelRef.parse(str(inputs[1]))))
    else:
        states = [load_file(str(p)) for p in inputs]
        result = {k: (sum(s[k].double() for s in states) / len(states)).to(states[0][k].dtype) for k in states[0]}
        save_file(result, str(output), metadata={"format": "pt"})
seconds = time.perf_counter() - started
print(json.dumps({"seconds": seconds, "sampled_mib": memory.growth_bytes / 2**20, "hwm_mib": hwm_mib() - baseline}))
"""
METHODS = ("average (streamed)", "average (naive load/save)", "diff (streamed)")


def make_checkpoints(folder: Path, count: int, size_mb: int) -> tuple[list[Path], int]:
    """`count` GPT-2-shaped fp32 checkpoints of about `size_mb` MB (different values), and the largest tensor's
    bytes (the 16000 x 768 embedding, 49 MB)."""
    import torch
    from safetensors.torch import save_file

    hidden = 768
    paths = []
    for index in range(count):
        torch.manual_seed(index)
        tensors = {"wte.weight": torch.randn(16_000, hidden) * 0.02, "position_ids": torch.arange(1024)}
        block_bytes = 4 * (hidden * 3 * hidden + hidden * hidden + 2 * hidden * 4 * hidden)
        for layer in range(max(1, (size_mb * 10**6 - 4 * 16_000 * hidden) // block_bytes)):
            prefix = f"h.{layer}"
            tensors |= {f"{prefix}.ln_1.weight": torch.ones(hidden), f"{prefix}.ln_1.running_mean": torch.zeros(hidden),
                        f"{prefix}.attn.c_attn.weight": torch.randn(hidden, 3 * hidden) * 0.02,
                        f"{prefix}.attn.c_proj.weight": torch.randn(hidden, hidden) * 0.02,
                        f"{prefix}.mlp.c_fc.weight": torch.randn(hidden, 4 * hidden) * 0.02,
                        f"{prefix}.mlp.c_proj.weight": torch.randn(4 * hidden, hidden) * 0.02}
        path = folder / f"ckpt-{index}.safetensors"
        save_file(tensors, str(path), metadata={"format": "pt"})
        paths.append(path)
        del tensors
    return paths, 16_000 * hidden * 4


def run_child(method: str, output: Path, inputs: list[Path]) -> dict[str, float]:
    result = subprocess.run([sys.executable, "-c", CHILD, method, str(output), *map(str, inputs)],
                            capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=3, help="Checkpoints averaged.")
    parser.add_argument("--size-mb", type=int, default=200, help="Approximate size of each checkpoint in MB (fp32).")
    parser.add_argument("--runs", type=int, default=1, help="Runs per method (the fastest time, the worst peak).")
    args = parser.parse_args()

    from mlops_cli import render

    with tempfile.TemporaryDirectory(prefix="bench-average-") as name:
        folder = Path(name)
        inputs, largest = make_checkpoints(folder, args.count, args.size_mb)
        total = sum(p.stat().st_size for p in inputs)
        for path in inputs:
            path.read_bytes()  # into the page cache: every method starts warm
        results: dict[str, list[dict[str, float]]] = {method: [] for method in METHODS}
        outputs = {method: folder / f"out-{index}.safetensors" for index, method in enumerate(METHODS)}
        for _ in range(args.runs):
            for method in METHODS:
                outputs[method].unlink(missing_ok=True)
                results[method].append(run_child(method, outputs[method], inputs))
        identical = outputs[METHODS[0]].read_bytes() == outputs[METHODS[1]].read_bytes()
        rows = []
        for method in METHODS:
            best = min(r["seconds"] for r in results[method])
            hwm = max(r["hwm_mib"] for r in results[method])
            sampled = max(r["sampled_mib"] for r in results[method])
            rows.append((method, f"{best:.2f} s", f"{total / 1e6 / best:.0f} MB/s", f"{sampled:.0f} MiB",
                         f"{hwm:.0f} MiB", f"{hwm * 2**20 / largest:.2f}x", f"{hwm * 2**20 / total:.3f}x"))
        render.stdout().print(render.table(
            f"{args.count} x {total / args.count / 1e6:.0f} MB fp32 safetensors, largest tensor "
            f"{largest / 2**20:.0f} MiB, {args.runs} run(s) each, torch threads 1",
            ("method", "time (best)", "input read", "peak RSS growth (PeakMemory)", "peak RSS growth (VmHWM)",
             "/ largest tensor", "/ all inputs"), rows,
            numeric=("time (best)", "input read", "peak RSS growth (PeakMemory)", "peak RSS growth (VmHWM)",
                     "/ largest tensor", "/ all inputs"),
            caption=f"streamed and naive averages byte-identical: {'yes' if identical else 'NO'}"))


if __name__ == "__main__":
    main()
