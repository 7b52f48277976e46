"""A sharded checkpoint through inspect, compress half and summarize: time and memory of each step.

A Llama-shaped model (hidden 512, --layers layers, vocabulary 8000: about 127 MB in fp32 at 8 layers) is
saved with `save_pretrained(max_shard_size=--shard-mb)`. Each command then runs in a fresh process (so one
step's freed memory cannot hide the next one's) under core/timing.PeakMemory, torch and transformers imported
beforehand. Expected: inspect reads the shards' headers only (milliseconds, RSS growth near zero whatever the
size); compress half streams shard by shard; summarize loads the whole model (RSS growth about its fp32 size).

    .venv/bin/python benchmarks/bench_sharded.py [--layers 8] [--shard-mb 16]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mlops_cli import render

STEPS = {
    "inspect": lambda model, out: ["inspect", model, "--json"],
    "compress half": lambda model, out: ["compress", "half", model, "-o", out, "--json"],
    "summarize (loads the model)": lambda model, out: ["summarize", model, "--repeats", "0", "--depth", "1", "--json"],
}


def child(argv: list[str]) -> None:
    """Run one `mlops` command in this process; print its wall time and RSS growth as JSON on stderr. torch and
    transformers are imported first, so the figures are the command's work, not the imports."""
    import torch  # noqa: F401
    import transformers  # noqa: F401

    from mlops_cli.app import main
    from mlops_cli.core.timing import PeakMemory

    sys.argv = ["mlops", *argv]
    with PeakMemory() as memory, contextlib.redirect_stdout(io.StringIO()):
        began = time.perf_counter()
        code = main()
        elapsed = time.perf_counter() - began
    sys.stderr.write(json.dumps({"code": code, "wall_s": elapsed, "growth": memory.growth_bytes}) + "\n")


def make_checkpoint(folder: Path, layers: int, shard_mb: int) -> int:
    """Save the sharded model; returns its parameter count."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=512, intermediate_size=1408, num_hidden_layers=layers,
                                      num_attention_heads=8, num_key_value_heads=4, vocab_size=8000,
                                      max_position_embeddings=256)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(folder, max_shard_size=f"{shard_mb}MB")
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--shard-mb", type=int, default=16)
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    rows = []
    with tempfile.TemporaryDirectory() as temp:
        model, out = Path(temp) / "sharded", Path(temp) / "half"
        parameters = make_checkpoint(model, args.layers, args.shard_mb)
        shards = len(list(model.glob("*.safetensors")))
        size = sum(p.stat().st_size for p in model.glob("*.safetensors"))
        for step, argv in STEPS.items():
            done = subprocess.run([sys.executable, __file__, "--child", *argv(str(model), str(out))],
                                  capture_output=True, text=True, check=True)
            figures = json.loads(done.stderr.strip().splitlines()[-1])
            rows.append((step, "ok" if figures["code"] == 0 else f"exit {figures['code']}",
                         f"{figures['wall_s']:.2f} s", render.fmt_bytes(figures["growth"])))
    render.stdout().print(render.table(
        f"Sharded checkpoint: {render.fmt_count(parameters)} parameters, {shards} shards, {render.fmt_bytes(size)}",
        ("step", "result", "wall (after imports)", "RSS growth"), rows,
        numeric=("wall (after imports)", "RSS growth")))


if __name__ == "__main__":
    main()
