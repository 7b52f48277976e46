"""ONNX past 2 GB, for real: a GPT-2-shaped model of about 2.3 GB (fp32) through export onnx, verify-parity,
summarize and compress half, each timed with its peak RSS.

CI tests the external-data path with a lowered threshold on a tiny model (tests/test_external_data.py); this
script checks that the real thing works: protobuf cannot hold a file over 2 GiB, so the export must write
`model.onnx` + `model.onnx.data`, and every reader and writer downstream must follow. The weights are random
(built on the meta device, then filled in place with a normal distribution: no slow default initialisation) and
saved as a Hugging Face folder. Each command runs as `python -m mlops_cli` in its own process; its wall time,
CPU time and peak RSS (the kernel's ru_maxrss of that process, imports included) come from os.wait4.

    .venv/bin/python benchmarks/bench_onnx_external.py [--layers 26] [--hidden 1280] [--keep DIR]

The default (26 layers, hidden 1280, vocabulary 50257, tied head) has 576 M parameters: 2.30 GB in fp32.
Needs about 10 GB of RAM and 8 GB of disk in the temporary folder (or --keep DIR, which is not removed).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from mlops_cli import render


def build_model(folder: Path, layers: int, hidden: int) -> int:
    """Save a random GPT-2-shaped model as a Hugging Face folder; returns its parameter count."""
    import torch
    import transformers

    config = transformers.GPT2Config(n_embd=hidden, n_layer=layers, n_head=hidden // 64, vocab_size=50257,
                                     n_positions=1024)
    with torch.device("meta"):
        model = transformers.GPT2LMHeadModel(config)
    model.to_empty(device="cpu")
    model.tie_weights()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".ln_" in name or name.startswith("transformer.ln_f"):
                parameter.fill_(1.0 if name.endswith("weight") else 0.0)
            elif name.endswith("bias"):
                parameter.zero_()
            else:
                parameter.normal_(0.0, 0.02, generator=generator)
    model.eval()
    model.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def run_measured(argv: list[str], env: dict[str, str]) -> dict[str, object]:
    """One `mlops` command in a fresh process: exit code, wall and CPU seconds, peak RSS (os.wait4's rusage of
    that process alone; subprocess would reap it without one), and its JSON report."""
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        pid = os.posix_spawn(sys.executable, [sys.executable, "-m", "mlops_cli", *argv], env,
                             file_actions=[(os.POSIX_SPAWN_DUP2, out.fileno(), 1),
                                           (os.POSIX_SPAWN_DUP2, err.fileno(), 2)])
        _, status, usage = os.wait4(pid, 0)
        wall = time.perf_counter() - started
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    try:
        report = json.loads(stdout)
    except json.JSONDecodeError:
        report = None
    return {"code": os.waitstatus_to_exitcode(status), "wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime,
            "peak_rss": usage.ru_maxrss * 1024, "report": report, "stderr": stderr[-3000:]}


def steps(folder: Path, work: Path) -> dict[str, list[str]]:
    onnx_file, half = work / "model.onnx", work / "half" / "model.onnx"
    return {
        "export onnx": ["export", "onnx", str(folder), "-o", str(onnx_file), "--optimize", "none", "--repeats", "0",
                        "--json"],
        "verify-parity": ["verify-parity", str(folder), str(onnx_file), "--repeats", "0", "--json"],
        "summarize": ["summarize", str(onnx_file), "--repeats", "1", "--warmup", "0", "--json"],
        "compress half": ["compress", "half", str(onnx_file), "-o", str(half), "--json"],
    }


def files_of(path: Path) -> str:
    files = sorted(path.parent.glob(f"{path.name}*"))
    return ", ".join(f"{p.name} {render.fmt_bytes(p.stat().st_size)}" for p in files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=26)
    parser.add_argument("--hidden", type=int, default=1280)
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temporary one)")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench-onnx-external-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "COLUMNS": "160", "NO_COLOR": "1"}
    rows = []
    try:
        began = time.perf_counter()
        parameters = build_model(work / "hf", args.layers, args.hidden)
        weights = sum(p.stat().st_size for p in (work / "hf").glob("*.safetensors"))
        print(f"built {parameters:,} parameters ({weights / 1e9:.2f} GB) in {time.perf_counter() - began:.1f} s",
              flush=True)
        for step, argv in steps(work / "hf", work).items():
            figures = run_measured(argv, env)
            report = figures["report"] if isinstance(figures["report"], dict) else {}
            verdict = "ok" if figures["code"] == 0 else f"exit {figures['code']}"
            print(json.dumps({"step": step, "code": figures["code"], "wall_s": round(figures["wall_s"], 1),
                              "cpu_s": round(figures["cpu_s"], 1), "peak_rss": figures["peak_rss"],
                              "passed": report.get("passed")}), flush=True)
            if figures["code"] != 0:
                print(figures["stderr"], file=sys.stderr, flush=True)
            rows.append((step, verdict, f"{figures['wall_s']:.1f} s", f"{figures['cpu_s']:.1f} s",
                         render.fmt_bytes(figures["peak_rss"]), _what(step, report, work)))
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    render.stdout().print(render.table(
        f"ONNX past 2 GB: GPT-2 shape, {args.layers} layers, hidden {args.hidden}: {render.fmt_count(parameters)} "
        f"parameters, {render.fmt_bytes(weights)} of fp32 safetensors",
        ("step", "result", "wall", "CPU", "peak RSS", "what it wrote or said"), rows,
        numeric=("wall", "CPU", "peak RSS")))


def _what(step: str, report: dict[str, object], work: Path) -> str:
    """One line of facts from the step's JSON report and the files on disk."""
    if step == "export onnx" and (work / "model.onnx").exists():
        return f"{files_of(work / 'model.onnx')}; external_data={report.get('external_data')}"
    if step == "verify-parity":
        return str(report.get("verdict", ""))[:90]
    if step == "summarize" and isinstance(report.get("onnx"), dict):
        return f"external data {report['onnx'].get('external_data')}"  # type: ignore[union-attr]
    if step == "compress half" and (work / "half" / "model.onnx").exists():
        return f"{files_of(work / 'half' / 'model.onnx')}; {str(report.get('verdict', ''))[:60]}"
    return str(report.get("verdict", ""))[:90]


if __name__ == "__main__":
    main()
