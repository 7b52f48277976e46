"""A sharded checkpoint through inspect, compress half and summarize: time and memory of each step.

A Llama-shaped model (by default hidden 512, 8 layers, vocabulary 8000: about 127 MB in fp32) with random weights
(built on the meta device and filled in place: no slow default initialisation) is saved with
`save_pretrained(max_shard_size=--shard-mb)`: `model.safetensors.index.json` plus its shards. Each command then
runs in a fresh process (so one step's freed memory cannot hide the next one's) under core/timing.PeakMemory,
torch and transformers imported beforehand: "RSS growth" is the command's own peak above that baseline, set
against the largest tensor (the issue's goal for streaming: growth <= largest tensor + a constant). The written
index is checked: every tensor of the source, each in a shard that exists, fp16 where it was fp32, and a
`total_size` equal to the shards' tensor bytes.

Expected: inspect reads the shards' headers only (milliseconds, RSS growth near zero whatever the size);
`compress half --no-check --no-default-keep` streams shard by shard in chunks; `--no-check` alone also loads the
model for its keep rules (norm layers by module type), but transformers memory-maps the shards, so the weights it
never touches stay out of RSS; summarize runs the whole model (RSS growth about its fp32 size).

    .venv/bin/python benchmarks/bench_sharded.py [--layers 8] [--shard-mb 16]
    .venv/bin/python benchmarks/bench_sharded.py --hidden 2048 --intermediate 5632 --layers 14 --vocab 32000 \
        --shard-mb 800   # 762 M parameters, 3.05 GB in 4 shards
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
    "compress half --no-check --no-default-keep": lambda model, out: [
        "compress", "half", model, "-o", out, "--no-check", "--no-default-keep", "--force", "--json"],
    "compress half --no-check": lambda model, out: ["compress", "half", model, "-o", out, "--no-check", "--force",
                                                    "--json"],
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
    sys.stderr.write(json.dumps({"code": code, "wall_s": elapsed, "growth": memory.growth_bytes, "peak": memory.peak})
                     + "\n")


def make_checkpoint(folder: Path, args: argparse.Namespace) -> int:
    """Save the sharded model (random normal weights, norms at one); returns its parameter count."""
    import torch
    import transformers

    config = transformers.LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate,
                                      num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                                      num_key_value_heads=max(1, args.hidden // 256), vocab_size=args.vocab,
                                      max_position_embeddings=256)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.fill_(1.0)
            else:
                parameter.normal_(0.0, 0.02, generator=generator)
    model.save_pretrained(folder, max_shard_size=f"{args.shard_mb}MB")
    return sum(p.numel() for p in model.parameters())


def largest_tensor(folder: Path) -> int:
    """Bytes of the biggest tensor in the shards (from their headers)."""
    from mlops_cli.core.formats import read_safetensors_header

    return max(info["nbytes"] for shard in folder.glob("*.safetensors")
               for info in read_safetensors_header(shard)[0].values())


def check_index(source: Path, written: Path) -> str:
    """Is the written index valid? Same tensors as the source's, shards present, fp16 where the source was
    fp32, total_size equal to the shards' tensor bytes. Returns "valid (...)" or what is wrong."""
    from mlops_cli.core.formats import read_safetensors_header

    name = "model.safetensors.index.json"
    before, after = (json.loads((folder / name).read_text(encoding="utf-8")) for folder in (source, written))
    if set(after["weight_map"]) != set(before["weight_map"]):
        return "invalid: tensor names differ from the source's"
    shards = sorted(set(after["weight_map"].values()))
    if not all((written / shard).is_file() for shard in shards):
        return "invalid: a shard it names is missing"
    headers = {shard: read_safetensors_header(written / shard)[0] for shard in shards}
    misplaced = [t for t, shard in after["weight_map"].items() if t not in headers[shard]]
    if misplaced:
        return f"invalid: {len(misplaced)} tensor(s) not in the shard the index names"
    total = sum(info["nbytes"] for header in headers.values() for info in header.values())
    if after["metadata"]["total_size"] != total:
        return f"invalid: total_size {after['metadata']['total_size']} != {total}"
    dtypes = sorted({info["dtype"] for header in headers.values() for info in header.values()})
    return f"valid ({len(shards)} shards, {len(after['weight_map'])} tensors, {'/'.join(dtypes)}, {total:,} B)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1408)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--shard-mb", type=int, default=16)
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    rows = []
    with tempfile.TemporaryDirectory() as temp:
        model, out = Path(temp) / "sharded", Path(temp) / "half"
        began = time.perf_counter()
        parameters = make_checkpoint(model, args)
        shards = len(list(model.glob("*.safetensors")))
        size = sum(p.stat().st_size for p in model.glob("*.safetensors"))
        largest = largest_tensor(model)
        print(f"built {parameters:,} parameters, {size / 1e9:.2f} GB in {shards} shards, largest tensor "
              f"{largest / 1e6:.0f} MB, in {time.perf_counter() - began:.1f} s", flush=True)
        for step, argv in STEPS.items():
            done = subprocess.run([sys.executable, __file__, "--child", *argv(str(model), str(out))],
                                  capture_output=True, text=True, check=True)
            figures = json.loads(done.stderr.strip().splitlines()[-1])
            index = check_index(model, out) if step.startswith("compress") and figures["code"] == 0 else ""
            print(json.dumps({"step": step, **figures, "index": index}), flush=True)
            rows.append((step, "ok" if figures["code"] == 0 else f"exit {figures['code']}",
                         f"{figures['wall_s']:.2f} s", render.fmt_bytes(figures["growth"]),
                         f"{figures['growth'] / largest:.2f}" if figures["growth"] is not None else "-", index))
    render.stdout().print(render.table(
        f"Sharded checkpoint: {render.fmt_count(parameters)} parameters, {shards} shards, {render.fmt_bytes(size)}, "
        f"largest tensor {render.fmt_bytes(largest)}",
        ("step", "result", "wall (after imports)", "RSS growth", "growth / largest tensor", "written index"), rows,
        numeric=("wall (after imports)", "RSS growth", "growth / largest tensor")))


if __name__ == "__main__":
    main()
