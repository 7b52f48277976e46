"""`mlops estimate` on a Llama-3-70B-sized config: must answer in under 5 s with under 500 MB peak RSS.

The config (hidden 8192, 80 layers, 64 heads, 8 KV heads, MLP 28672, vocabulary 128256, untied embeddings) is
written to a temporary folder as a lone config.json; no weight exists anywhere. Figures:
- cold: `python -m mlops_cli estimate DIR --json` in a fresh process, wall and CPU time and the child's max RSS
  (imports included: what a user waits for). The verdict uses CPU time: on a shared machine wall time also
  counts other processes' turns; on an idle one they agree.
- in-process: the service call timed (wall and CPU) under core/timing.PeakMemory, twice: the first call pays
  the torch/transformers imports, the second is what a warm process pays.

    .venv/bin/python benchmarks/bench_estimate.py [--context 8192] [--batch 1] [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mlops_cli import render
from mlops_cli.core.contract import ModelRef
from mlops_cli.core.timing import PeakMemory
from mlops_cli.services.estimate import EstimateOptions, run

LLAMA3_70B = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 8192, "num_hidden_layers": 80,
    "num_attention_heads": 64, "num_key_value_heads": 8, "intermediate_size": 28672, "vocab_size": 128256,
    "tie_word_embeddings": False, "max_position_embeddings": 8192, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
}
LIMIT_S, LIMIT_RSS = 5.0, 500e6


def in_process(folder: Path, context: int, batch: int) -> tuple[float, float, PeakMemory, object]:
    """One service call: wall and CPU seconds, RSS growth and peak (PeakMemory). The first call in a process
    pays the torch/transformers imports; the second does not."""
    with PeakMemory() as memory:
        wall, cpu = time.perf_counter(), time.process_time()
        report = run(ModelRef.parse(str(folder)), EstimateOptions(context=context, batch=batch))
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return wall, cpu, memory, report


def cold(folder: Path, context: int, batch: int) -> tuple[float, float, int]:
    """Wall time, CPU time (user + system) and max RSS (bytes, the largest of any child so far) of the CLI in
    a fresh process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    began = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "mlops_cli", "estimate", str(folder), "--json",
                           "--context", str(context), "--batch", str(batch)],
                          capture_output=True, text=True, env=env, check=True)
    elapsed = time.perf_counter() - began
    json.loads(done.stdout)
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = usage.ru_utime + usage.ru_stime - before.ru_utime - before.ru_stime
    return elapsed, cpu, usage.ru_maxrss * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--runs", type=int, default=1, help="cold CLI processes to run (medians are reported)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as temp:
        folder = Path(temp) / "llama3-70b"
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(LLAMA3_70B), encoding="utf-8")
        runs = [cold(folder, args.context, args.batch) for _ in range(args.runs)]
        cold_wall, cold_cpu = (statistics.median(run[i] for run in runs) for i in (0, 1))
        cold_rss = max(run[2] for run in runs)
        first = in_process(folder, args.context, args.batch)
        second = in_process(folder, args.context, args.batch)
    rows = [("parameters (unique)", render.fmt_count(first[3].parameters.unique))]  # type: ignore[attr-defined]
    for label, (wall, cpu, memory, _) in (("first call (imports torch, transformers)", first),
                                         ("second call (warm)", second)):
        rows += [(f"{label}: wall / CPU", f"{wall:.2f} s / {cpu:.2f} s"),
                 (f"{label}: RSS peak (growth)",
                  f"{render.fmt_bytes(memory.peak)} ({render.fmt_bytes(memory.growth_bytes)})")]
    rows += [
        (f"cold CLI process: wall / CPU (median of {args.runs})", f"{cold_wall:.2f} s / {cold_cpu:.2f} s"),
        ("cold CLI process: each run's wall / CPU", ", ".join(f"{w:.1f}/{c:.1f}" for w, c, _ in runs)),
        ("cold CLI process: max RSS", render.fmt_bytes(cold_rss)),
        ("limits", f"{LIMIT_S:.0f} s, {LIMIT_RSS / 1e6:.0f} MB"),
        ("verdict (cold CLI: CPU time, max RSS)", "PASS" if cold_cpu < LIMIT_S and cold_rss < LIMIT_RSS else "FAIL"),
    ]
    render.stdout().print(render.key_values(f"estimate, Llama-3-70B-sized config, context {args.context}", rows))


if __name__ == "__main__":
    main()
