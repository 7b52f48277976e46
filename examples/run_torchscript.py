"""Run a TorchScript archive written by `mlops export jit`, with nothing but torch and numpy.

    mlops export jit builtin:tiny-bert -o bert.pt
    python examples/run_torchscript.py bert.pt --batch 3 --sequence 8
    python examples/run_torchscript.py bert.pt --inputs inputs.npz     # real inputs, keyed by input name

The archive describes its own interface in extra/mlops.json (written by mlops): the positional order of the
inputs, their dtypes and which dims are named (batch, sequence, ...). This script reads it, builds inputs at
the sizes asked for (or takes them from an .npz file), runs the model and prints every output.
Loading a TorchScript archive runs the code inside it: only run archives you trust.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import numpy as np
import torch

METADATA_FILE = "mlops.json"


def load_archive(path: str) -> tuple[Any, dict[str, Any]]:
    """The scripted module (eval mode, CPU) and its interface description."""
    extra_files = {METADATA_FILE: ""}
    module = torch.jit.load(path, map_location="cpu", _extra_files=extra_files)
    if not extra_files[METADATA_FILE]:
        raise SystemExit(f"{path} has no extra/{METADATA_FILE}: was it written by `mlops export jit`?")
    return module.eval(), json.loads(extra_files[METADATA_FILE])


def make_inputs(interface: dict[str, Any], sizes: dict[str, int], seed: int = 0) -> list[torch.Tensor]:
    """One tensor per input, in positional order. Named dims take `sizes` (else their export size).

    Masks are all ones (no padding), token type ids zeros, other integer inputs random ids in [5, 100),
    float inputs standard normal.
    """
    generator = torch.Generator().manual_seed(seed)
    tensors = []
    for spec in interface["inputs"]:
        shape = [sizes.get(dim, size) if not dim.isdigit() else int(dim)
                 for dim, size in zip(spec["dims"], spec["example_shape"], strict=True)]
        dtype = getattr(torch, spec["dtype"])
        if dtype.is_floating_point:
            tensors.append(torch.randn(shape, generator=generator, dtype=dtype))
        elif "mask" in spec["name"]:
            tensors.append(torch.ones(shape, dtype=dtype))
        elif "type" in spec["name"]:
            tensors.append(torch.zeros(shape, dtype=dtype))
        else:
            tensors.append(torch.randint(5, 100, shape, generator=generator, dtype=dtype))
    return tensors


def inputs_from_file(interface: dict[str, Any], path: str) -> list[torch.Tensor]:
    """Inputs from an .npz file whose keys are the input names."""
    with np.load(path, allow_pickle=False) as archive:
        missing = [spec["name"] for spec in interface["inputs"] if spec["name"] not in archive.files]
        if missing:
            raise SystemExit(f"{path} lacks input(s): {', '.join(missing)}")
        return [torch.from_numpy(archive[spec["name"]]) for spec in interface["inputs"]]


def run(module: Any, tensors: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Call the archive positionally; name its outputs (a dict from HF models, a tensor or a tuple otherwise)."""
    with torch.inference_mode():
        output = module(*tensors)
    if isinstance(output, torch.Tensor):
        return {"output": output}
    if isinstance(output, dict):
        return dict(output)
    return {f"output_{i}": value for i, value in enumerate(output)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("archive", help="TorchScript .pt written by `mlops export jit`")
    parser.add_argument("--batch", type=int, help="batch size (default: the export size)")
    parser.add_argument("--sequence", type=int, help="sequence length for text models (default: the export size)")
    parser.add_argument("--inputs", help="an .npz file with real inputs, keyed by input name")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    module, interface = load_archive(args.archive)
    sizes = {name: value for name, value in (("batch", args.batch), ("sequence", args.sequence)) if value}
    tensors = inputs_from_file(interface, args.inputs) if args.inputs else make_inputs(interface, sizes, args.seed)
    print(f"{args.archive}: exported from {interface['source']} ({interface['mode']})")
    for spec, tensor in zip(interface["inputs"], tensors, strict=True):
        print(f"  input  {spec['name']}: {spec['dtype']} {list(tensor.shape)}")
    for name, value in run(module, tensors).items():
        first = ", ".join(f"{v:.6g}" for v in value.flatten()[:4].tolist())
        print(f"  output {name}: {str(value.dtype).removeprefix('torch.')} {list(value.shape)} first=[{first}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
