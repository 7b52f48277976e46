"""Benchmark `mlops export onnx` against the reference pipeline Optimum's exporter runs, on a MiniLM-L6-shaped BERT.

The model: a BertModel from a local BertConfig (hidden 384, 6 layers, 12 heads, intermediate 1536, vocab 30522:
about 22 M parameters, randomly initialised; no hub), saved as a Hugging Face folder.

1. Wall and CPU time, each side a fresh process (imports included), rounds interleaved: the first round is a
   first export of the architecture (every optimisation pass measured), the others re-exports (a pass measured no
   faster is remembered and not run again), median of those:
   - ours: `mlops export onnx FOLDER -o ours.onnx` with default settings (exporter, multi-shape verification,
     optimisation pass: whatever the defaults choose);
   - reference: what Optimum's exporter does (Optimum itself cannot be installed beside our transformers):
     load the model, `torch.onnx.export(dynamo=False)` with dynamic batch/sequence axes, ONNX Runtime's
     transformer optimizer (`onnxruntime.transformers.optimizer.optimize_model`, model type bert), and one
     validation run against PyTorch at the example shape, as Optimum validates its exports.
2. Runtime: both files in ONNX Runtime, one thread each, runs interleaved, median of --repeats, at batch 1 and 8
   with sequence --seq-len (128).

Both ratios are printed: reference wall / our wall (>= 1.0: ours is no slower) and reference latency / our latency
(>= 1.0: our file is no slower). On a shared machine the absolute numbers move; the interleaving keeps the ratios
fair.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_export_onnx.py [--rounds 3] [--repeats 20] [--seq-len 128]
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

import numpy as np

REFERENCE_PIPELINE = r'''
import sys, time, logging, warnings
started = time.perf_counter()
warnings.simplefilter("ignore")
logging.disable(logging.WARNING)
import numpy as np, torch, transformers, onnxruntime
from onnxruntime.transformers.optimizer import optimize_model
folder, output = sys.argv[1], sys.argv[2]
model = transformers.AutoModel.from_pretrained(folder).eval()
ids = torch.randint(5, model.config.vocab_size, (2, 16))
args = (ids, torch.ones_like(ids), torch.zeros_like(ids))
names = ["input_ids", "attention_mask", "token_type_ids"]


class Positional(torch.nn.Module):  # Optimum's exporters call the model by keyword the same way
    def __init__(self):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        return out.last_hidden_state, out.pooler_output


axes = {name: {0: "batch", 1: "sequence"} for name in names}
axes.update({"last_hidden_state": {0: "batch", 1: "sequence"}, "pooler_output": {0: "batch"}})
plain = output + ".plain.onnx"
torch.onnx.export(Positional().eval(), args, plain, dynamo=False, input_names=names,
                  output_names=["last_hidden_state", "pooler_output"], dynamic_axes=axes, opset_version=14)
optimized = optimize_model(plain, model_type="bert", num_heads=model.config.num_attention_heads,
                           hidden_size=model.config.hidden_size)
optimized.save_model_to_file(output)
session = onnxruntime.InferenceSession(output, providers=["CPUExecutionProvider"])
with torch.inference_mode():
    expected = Positional()(*args)[0].numpy()
got = session.run(["last_hidden_state"], {n: a.numpy() for n, a in zip(names, args)})[0]
assert np.allclose(got, expected, atol=1e-4, rtol=1e-3), float(np.abs(got - expected).max())
print(time.perf_counter() - started)
'''


def build_model(folder: Path) -> None:
    import torch
    import transformers

    config = transformers.BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                                     intermediate_size=1536, vocab_size=30522, max_position_embeddings=512)
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    print(f"model: BertModel, {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters")
    model.save_pretrained(folder)


def timed(command: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """(wall seconds, CPU seconds user+system, stdout) of a child process."""
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - started
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command[:4])} ... failed ({done.returncode}):\n{done.stderr[-3000:]}")
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    return seconds, cpu, done.stdout


def wall_times(folder: Path, scratch: Path, rounds: int,
               env: dict[str, str]) -> tuple[dict[str, list[float]], dict[str, list[float]], dict]:
    """Each side once untimed, then `rounds` times, alternating which goes first; wall and CPU seconds per side,
    and our last report."""
    commands = {
        "ours": [sys.executable, "-m", "mlops_cli", "export", "onnx", str(folder), "-o", str(scratch / "ours.onnx"),
                 "--force", "--json", "-q"],
        "reference": [sys.executable, "-c", REFERENCE_PIPELINE, str(folder), str(scratch / "reference.onnx")]}
    for command in commands.values():  # untimed: compiles bytecode and warms the disk cache for both sides
        timed(command, {**env, "MLOPS_CACHE_DIR": str(scratch / "warm-up-cache")})
    wall: dict[str, list[float]] = {"ours": [], "reference": []}
    cpu: dict[str, list[float]] = {"ours": [], "reference": []}
    report: dict = {}
    for round_index in range(rounds):
        for name in (("ours", "reference") if round_index % 2 == 0 else ("reference", "ours")):
            seconds, cpu_seconds, stdout = timed(commands[name], env)
            wall[name].append(seconds)
            cpu[name].append(cpu_seconds)
            if name == "ours":
                report = json.loads(stdout)
        print(f"round {round_index + 1}: ours {wall['ours'][-1]:.2f} s (CPU {cpu['ours'][-1]:.2f} s), reference "
              f"{wall['reference'][-1]:.2f} s (CPU {cpu['reference'][-1]:.2f} s)", flush=True)
    return wall, cpu, report


def latencies(ours: Path, reference: Path, seq_len: int, repeats: int) -> list[tuple[int, float, float]]:
    import onnxruntime as ort

    sessions = {}
    for name, path in (("ours", ours), ("reference", reference)):
        options = ort.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sessions[name] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    rows = []
    for batch in (1, 8):
        ids = rng.integers(5, 30522, (batch, seq_len))
        feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
        samples: dict[str, list[float]] = {name: [] for name in sessions}
        outputs = {}
        for name, session in sessions.items():  # warm-up
            wanted = [i.name for i in session.get_inputs()]
            outputs[name] = session.run(["last_hidden_state"], {k: v for k, v in feed.items() if k in wanted})[0]
        assert np.allclose(outputs["ours"], outputs["reference"], atol=1e-3), "the two files disagree"
        for _ in range(repeats):
            for name, session in sessions.items():
                wanted = [i.name for i in session.get_inputs()]
                started = time.perf_counter()
                session.run(None, {k: v for k, v in feed.items() if k in wanted})
                samples[name].append((time.perf_counter() - started) * 1000)
        rows.append((batch, statistics.median(samples["ours"]), statistics.median(samples["reference"])))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4,
                        help="wall-time rounds (each side once per round); the first one is a first export")
    parser.add_argument("--repeats", type=int, default=20, help="timed ONNX Runtime runs per side and batch")
    parser.add_argument("--seq-len", type=int, default=128)
    args = parser.parse_args()
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{repo}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    with tempfile.TemporaryDirectory() as temporary:
        scratch = Path(temporary)
        build_model(scratch / "minilm")
        env["MLOPS_CACHE_DIR"] = str(scratch / "cache")  # a first export, then re-exports of the architecture
        wall, cpu, report = wall_times(scratch / "minilm", scratch, args.rounds, env)
        print(f"\nmlops export onnx (defaults): exporter {report['exporter_used']}, verified on "
              f"{len(report['verification']['shapes'])} shape sets ({'PASS' if report['passed'] else 'FAIL'}), "
              f"passes: {[(p['name'], p['accepted'], p['reason']) for p in report['optimize_passes']]}")
        print(f"  our stages (last round): {report['stages']}")
        for kind, seconds in (("wall", wall), ("CPU (user+system)", cpu)):
            first = seconds["reference"][0] / seconds["ours"][0]
            print(f"{kind}, first export (every pass measured): ours {seconds['ours'][0]:.2f} s, reference "
                  f"{seconds['reference'][0]:.2f} s -> reference/ours = {first:.2f}x")
            if args.rounds > 1:
                ours, reference = statistics.median(seconds["ours"][1:]), statistics.median(seconds["reference"][1:])
                print(f"{kind}, re-exports (passes measured no faster remembered), median of {args.rounds - 1}: "
                      f"ours {ours:.2f} s, reference {reference:.2f} s -> reference/ours = {reference / ours:.2f}x")
        for batch, our_ms, reference_ms in latencies(scratch / "ours.onnx", scratch / "reference.onnx",
                                                     args.seq_len, args.repeats):
            print(f"ONNX Runtime, 1 thread, batch {batch} seq {args.seq_len}, median of {args.repeats}: ours "
                  f"{our_ms:.2f} ms, reference {reference_ms:.2f} ms -> reference/ours = "
                  f"{reference_ms / our_ms:.2f}x (>= 1.0: our file no slower)")


if __name__ == "__main__":
    main()
