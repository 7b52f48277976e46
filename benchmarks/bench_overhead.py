"""What `mlops bench`'s runner adds over a bare timed loop of the same runtime (goal: <= 2%).

For eager tiny-bert and its ONNX export (ONNX Runtime), at batch 1 and sequence 128 on one thread: a bare loop
(`model(**tensors)` / `session.run(None, feed)` between two perf_counter calls) and the tool's path (a bench
candidate's bound call inside the core/timing's measure_interleaved) are run in alternating blocks, so machine noise
hits both alike. Prints each side's median and the median of the rounds' paired tool/bare ratios with its
95% bootstrap interval.

    .venv/bin/python benchmarks/bench_overhead.py [--rounds 15] [--calls 40] [--seq-len 128]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlops_cli.core.contract import LoadOptions, ModelRef
from mlops_cli.core.inputs import InputRequest, plan_inputs
from mlops_cli.core.loading import load_model
from mlops_cli.core.timing import measure_interleaved, trust_warnings
from mlops_cli.services.bench.candidates import Candidate, onnx_candidate, torch_candidate
from mlops_cli.services.bench.exports import export_artefact

GOAL = 1.02


def bare_block(fn: Callable[[], Any], calls: int) -> float:
    """Median ms of `calls` calls, each timed alone with perf_counter: the least a timing loop can do."""
    samples = []
    for _ in range(calls):
        begin = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - begin) * 1000.0)
    return statistics.median(samples)


def tool_block(call: Callable[[], Any], calls: int) -> float:
    return measure_interleaved({"tool": call}, warmup=0, repeats=calls, device="cpu")["tool"].median_ms


def compare(name: str, bare: Callable[[], Any], candidate: Candidate, inputs: dict[str, Any], rounds: int,
            calls: int) -> float:
    tool = candidate.bind(inputs)
    for _ in range(5):
        bare()
        tool()
    bare_medians, tool_medians = [], []
    for round_index in range(rounds):  # which side goes first alternates, so neither always runs warmer
        if round_index % 2:
            tool_medians.append(tool_block(tool, calls))
        bare_medians.append(bare_block(bare, calls))
        if not round_index % 2:
            tool_medians.append(tool_block(tool, calls))
    # Each round's tool/bare ratio pairs two neighbouring blocks, so slow drifts of a busy machine cancel out.
    paired = np.array(tool_medians) / np.array(bare_medians)
    overhead = float(np.median(paired))
    resampled = np.median(np.random.default_rng(0).choice(paired, (2000, paired.size)), axis=1)
    low, high = (float(v) for v in np.percentile(resampled, [2.5, 97.5]))
    verdict = "within" if overhead <= GOAL else "not distinguishable from" if low <= GOAL else "ABOVE"
    print(f"{name:<28} bare {statistics.median(bare_medians):8.3f} ms   tool {statistics.median(tool_medians):8.3f} ms"
          f"   tool/bare {overhead:.4f} (95% interval {low:.4f}-{high:.4f}): {verdict} the {GOAL - 1:.0%} goal")
    return overhead


def main() -> None:
    import onnxruntime as ort
    import torch

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=40)
    parser.add_argument("--seq-len", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(1)
    ref = ModelRef.parse("builtin:tiny-bert")
    model = load_model(ref)
    inputs = plan_inputs(model, InputRequest(batch_size=1, seq_len=args.seq_len)).example.tensors
    tensors = {k: torch.from_numpy(v) for k, v in inputs.items()}
    module = model.module.eval()

    def bare_eager() -> Any:
        with torch.inference_mode():
            return module(**tensors, return_dict=True)

    compare("eager tiny-bert", bare_eager, torch_candidate("eager", "fp32", model, module, "cpu"), inputs,
            args.rounds, args.calls)
    with tempfile.TemporaryDirectory() as folder:
        exported = export_artefact("onnxruntime", ref, LoadOptions(), (), "cpu", Path(folder))
        onnx_model = load_model(str(exported.path))
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = 1, 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(str(exported.path), sess_options=options, providers=["CPUExecutionProvider"])
        feed = {i.name: inputs[i.name] for i in session.get_inputs()}
        compare("onnxruntime tiny-bert.onnx", lambda: session.run(None, feed), onnx_candidate(onnx_model, "cpu", 1),
                inputs, args.rounds, args.calls)
    for warning in trust_warnings(1):
        print(f"warning: {warning}")
    print(f"(seq {args.seq_len}, batch 1, 1 thread, {args.rounds} alternating blocks of {args.calls} calls; "
          f"pid {os.getpid()})")


if __name__ == "__main__":
    main()
