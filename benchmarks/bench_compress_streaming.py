"""Benchmark the streaming fp32 -> fp16 safetensors conversion of `mlops compress half` against the naive
load-convert-save, side by side on one model of a few hundred MB.

- streaming: `services.compress.stream.stream_convert` (memory-mapped input, chunked casts with the safety
  counts, header computed up front, pages released as it goes);
- naive: `safetensors.torch.load_file` -> `.half()` on every floating tensor -> `save_file` (no safety counts);
- safe_open: the same naive conversion but reading tensor by tensor with `safetensors.safe_open` and
  holding the converted tensors until one `save_file` (what a "lazy" script does).

Each method runs in its own child process (so one's memory does not hide in another's): the child records
its RSS after imports, resets the peak (/proc/self/clear_refs), converts, and reports the peak RSS rise and
the wall time. The input is read once beforehand so every method starts with it in the page cache. The
outputs are compared byte for byte. Throughput is input MB (10^6 bytes) per second.

    .venv/bin/python benchmarks/bench_compress_streaming.py [--size-mb 400] [--runs 2] [--threads 1]
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
torch.set_num_threads(int(sys.argv[4]))
method, source, output = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from mlops_cli.services.compress.keep import KeepRules
from mlops_cli.services.compress.stream import stream_convert

def rss(field):
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field))
    return int(line.split()[1]) / 1024

def half(tensor):
    return tensor.half() if tensor.is_floating_point() else tensor

Path("/proc/self/clear_refs").write_text("5")
baseline = rss("VmRSS:")
started = time.perf_counter()
if method == "streaming":
    stream_convert(source, output, "float16", KeepRules.build([], False))
elif method == "naive":
    save_file({k: half(v) for k, v in load_file(str(source)).items()}, str(output), metadata={"format": "pt"})
else:
    with safe_open(str(source), "pt") as handle:
        converted = {k: half(handle.get_tensor(k)) for k in handle.keys()}
    save_file(converted, str(output), metadata={"format": "pt"})
seconds = time.perf_counter() - started
print(json.dumps({"seconds": seconds, "peak_rise_mib": rss("VmHWM:") - baseline}))
"""
METHODS = ("streaming", "naive", "safe_open")


def make_model(path: Path, size_mb: int) -> int:
    """A GPT-2-shaped fp32 checkpoint of about `size_mb` MB: embeddings, attention/MLP blocks, norms, buffers."""
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    hidden = 768
    tensors = {"wte.weight": torch.randn(16_000, hidden) * 0.02, "wpe.weight": torch.randn(1024, hidden) * 0.01,
               "position_ids": torch.arange(1024)}
    block_bytes = 4 * (hidden * 3 * hidden + hidden * hidden + 2 * hidden * 4 * hidden)
    for layer in range(max(1, (size_mb * 10**6 - 4 * 17_024 * hidden) // block_bytes)):
        prefix = f"h.{layer}"
        tensors |= {f"{prefix}.ln_1.weight": torch.ones(hidden), f"{prefix}.ln_1.bias": torch.zeros(hidden),
                    f"{prefix}.attn.c_attn.weight": torch.randn(hidden, 3 * hidden) * 0.02,
                    f"{prefix}.attn.c_proj.weight": torch.randn(hidden, hidden) * 0.02,
                    f"{prefix}.mlp.c_fc.weight": torch.randn(hidden, 4 * hidden) * 0.02,
                    f"{prefix}.mlp.c_proj.weight": torch.randn(4 * hidden, hidden) * 0.02}
    save_file(tensors, str(path), metadata={"format": "pt"})
    return len(tensors)


def run_child(method: str, source: Path, output: Path, threads: int) -> dict[str, float]:
    result = subprocess.run([sys.executable, "-c", CHILD, method, str(source), str(output), str(threads)],
                            capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=400, help="Approximate model size in MB (fp32).")
    parser.add_argument("--runs", type=int, default=2, help="Runs per method (the fastest is shown).")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in each child.")
    args = parser.parse_args()

    from mlops_cli import render

    with tempfile.TemporaryDirectory(prefix="bench-compress-") as folder:
        source = Path(folder) / "model.safetensors"
        count = make_model(source, args.size_mb)
        size = source.stat().st_size
        source.read_bytes()  # into the page cache: every method starts warm
        results: dict[str, list[dict[str, float]]] = {method: [] for method in METHODS}
        for _ in range(args.runs):
            for method in METHODS:  # interleaved, so machine noise hits all methods alike
                results[method].append(run_child(method, source, Path(folder) / f"{method}.safetensors",
                                                 args.threads))
        outputs = {method: (Path(folder) / f"{method}.safetensors").read_bytes() for method in METHODS}
        identical = all(outputs[method] == outputs["streaming"] for method in METHODS)
        rows = []
        for method in METHODS:
            best = min(results[method], key=lambda r: r["seconds"])
            peak = max(r["peak_rise_mib"] for r in results[method])
            rows.append((method, f"{best['seconds']:.2f} s", f"{size / 1e6 / best['seconds']:.0f} MB/s",
                         f"{peak:.0f} MiB", f"{peak * 2**20 / size:.2f}x"))
        render.stdout().print(render.table(
            f"fp32 -> fp16, {size / 1e6:.0f} MB safetensors ({count} tensors), {args.runs} run(s) each, "
            f"torch threads {args.threads}",
            ("method", "time (best)", "throughput", "peak RSS rise (worst)", "peak / input size"), rows,
            numeric=("time (best)", "throughput", "peak RSS rise (worst)", "peak / input size"),
            caption=f"outputs byte-identical across methods: {'yes' if identical else 'NO'}; streaming also "
                    "counts overflow/underflow/subnormal per tensor, the others do not"))


if __name__ == "__main__":
    main()
