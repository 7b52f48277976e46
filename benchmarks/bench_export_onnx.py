"""Benchmark `mlops export onnx` on the built-in tiny BERT, side by side in one run:

1. Export cost: our export (names from the model, dynamic batch/sequence, onnx.checker, verification with
   ONNX Runtime on 3 shape sets) against a bare `torch.onnx.export(model, kwargs)` call (what most scripts
   do), each timed end to end, with what the resulting file can do: its output names, and whether it runs
   at a batch/sequence other than the example's.
2. Inference: the exported file in ONNX Runtime against PyTorch eager on the same inputs, at batch 1 and 8
   (sequence --seq-len), timed A/B interleaved (median and p90 of --repeats after warm-up).

Every export runs in this one process; the first one also pays for importing the exporter, so a throwaway
warm-up export runs first. On a shared machine pass --threads 1 to avoid oversubscribing the cores.

    .venv/bin/python benchmarks/bench_export_onnx.py [--repeats 50] [--seq-len 32] [--threads 1]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from mlops_cli import render
from mlops_cli.core.inputs import example_inputs, make_inputs, specs_for
from mlops_cli.core.loading import LoadedModel, ModelKind, load_model
from mlops_cli.core.runtimes import onnx_runner, torch_runner
from mlops_cli.core.timing import measure_interleaved
from mlops_cli.services.export_onnx import ExportOnnxSettings, export_onnx, graph_info

MODEL = "builtin:tiny-bert"


def bare_export(loaded: LoadedModel, path: Path) -> float:
    """What a script typically does: torch.onnx.export with the example as kwargs, nothing else."""
    example = example_inputs(loaded)
    kwargs = {name: torch.from_numpy(array) for name, array in example.tensors.items()}
    started = time.perf_counter()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(loaded.module, (), str(path), kwargs=kwargs)
    return time.perf_counter() - started


def runs_at_other_shapes(loaded: LoadedModel, path: Path) -> str:
    """Does the file accept batch 3, sequence 24 (the example is batch 2, sequence 16)?"""
    specs = specs_for(loaded)
    inputs = make_inputs(specs, {"batch": 3, "sequence": 24}, vocab_size=loaded.config.vocab_size)
    runner = onnx_runner(LoadedModel(str(path), ModelKind.ONNX, None, path=path))
    try:
        runner(inputs.tensors)
    except Exception:
        return "no (ONNX Runtime rejects the shape)"
    return "yes"


def export_rows(loaded: LoadedModel, folder: Path) -> list[tuple[object, ...]]:
    ours_path, bare_path = folder / "ours.onnx", folder / "bare.onnx"
    bare_export(loaded, folder / "warmup.onnx")  # pays the exporter's import and first-compile costs
    started = time.perf_counter()
    report = export_onnx(MODEL, ours_path, ExportOnnxSettings(repeats=3, force=True))
    ours_seconds = time.perf_counter() - started
    bare_seconds = bare_export(loaded, bare_path)
    rows = []
    worst = max(d.max_abs or 0.0 for s in report.verification.shapes for d in s.outputs)
    checked = f"{'PASS' if report.passed else 'FAIL'} on {len(report.verification.shapes)} shape sets, " \
              f"max |diff| {worst:.1e}"
    for name, path, seconds, verified in (
            ("mlops export onnx (verified)", ours_path, ours_seconds, checked),
            ("bare torch.onnx.export", bare_path, bare_seconds, "not verified")):
        info = graph_info(path)
        rows.append((name, f"{seconds:.2f} s", ", ".join(v.name for v in info.outputs),
                     ", ".join(str(d) for d in info.inputs[0].dims), runs_at_other_shapes(loaded, path), verified))
    stages = ", ".join(f"{stage} {seconds:.2f} s" for stage, seconds in report.stages.items())
    rows.append(("  our stages", "", "", "", "", stages))
    return rows


def latency_rows(loaded: LoadedModel, onnx_path: Path, seq_len: int, repeats: int,
                 threads: int | None) -> list[tuple[object, ...]]:
    import onnxruntime

    specs = specs_for(loaded)
    eager = torch_runner(loaded, "cpu")
    options = onnxruntime.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as mlops' own runner does
    if threads:
        options.intra_op_num_threads = threads
    ort = onnx_runner(LoadedModel(str(onnx_path), ModelKind.ONNX, None, path=onnx_path), options=options)
    rows = []
    for batch in (1, 8):
        inputs = make_inputs(specs, {"batch": batch, "sequence": seq_len}, vocab_size=loaded.config.vocab_size,
                             pad_token_id=loaded.config.pad_token_id).tensors
        timings = measure_interleaved({"eager": lambda inputs=inputs: eager(inputs),
                                       "ort": lambda inputs=inputs: ort(inputs)}, warmup=5, repeats=repeats)
        diff = float(np.abs(eager(inputs)["logits"] - ort(inputs)["logits"]).max())
        rows.append((f"batch={batch},sequence={seq_len}", render.fmt_ms(timings["eager"].median_ms),
                     render.fmt_ms(timings["eager"].p90_ms), render.fmt_ms(timings["ort"].median_ms),
                     render.fmt_ms(timings["ort"].p90_ms),
                     f"{timings['eager'].median_ms / timings['ort'].median_ms:.2f}x", f"{diff:.2e}"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None,
                        help="intra-op threads for both torch and ONNX Runtime (default: each library's own)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(MODEL)
    console = render.stdout()
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        console.print(render.table(
            f"Export cost, {MODEL} (example batch 2, sequence 16)",
            ("export", "wall time", "outputs", "input_ids dims", "runs at batch 3, seq 24", "verification"),
            export_rows(loaded, folder), numeric=("wall time",)))
        console.print(render.table(
            f"ONNX Runtime vs PyTorch eager, {MODEL}, CPU, threads: torch {torch.get_num_threads()}, "
            f"ORT {args.threads or 'default'}; median of {args.repeats} (interleaved)",
            ("inputs", "eager p50", "eager p90", "ORT p50", "ORT p90", "ORT speed-up", "max |diff|"),
            latency_rows(loaded, folder / "ours.onnx", args.seq_len, args.repeats, args.threads),
            numeric=("eager p50", "eager p90", "ORT p50", "ORT p90", "ORT speed-up", "max |diff|")))


if __name__ == "__main__":
    main()
