"""Streaming safetensors -> safetensors conversion: tensor by tensor, chunk by chunk, memory-mapped.

The output header is computed up front from the input header (names, shapes, new dtypes), then each
tensor is read in ranges through core/safetensors_file.MappedTensors (a memory map whose pages are given back
after each range), cast and appended, so peak memory stays near one range however big the model is.
`safetensors.safe_open` is not used for reading: its mapping keeps every page it touched resident, so the
process's peak RSS grows to the file's size (measured reading a 200 MiB file once, tensor by tensor:
+214 MiB through safe_open, +27 MiB through the released map). The casts reuse their buffers
(cast.ChunkCaster). benchmarks/bench_compress_streaming.py compares the whole conversion
with a naive load-convert-save.

The output is the file `safetensors.torch.save_file` writes for the same tensors and metadata: same
tensor order (by dtype, then name), same offsets, header padded with spaces to 8 bytes.
"""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

from mlops_cli.core.safetensors_file import (
    CHUNK_ELEMENTS,
    FROM_TORCH,
    ITEMSIZE,
    TO_TORCH,
    MappedTensors,
    write_tensors,
)
from mlops_cli.services.compress.cast import CastCounts, ChunkCaster, TensorSafety, plan_tensor, tensor_safety
from mlops_cli.services.compress.keep import KeepRules


def stream_convert(source: Path, destination: Path, target: str, keep: KeepRules,
                   chunk_elements: int = CHUNK_ELEMENTS) -> list[TensorSafety]:
    """Write `source` with its floating tensors cast to `target` into `destination` (a new file)."""
    import torch

    safety: dict[str, TensorSafety] = {}
    caster = ChunkCaster(target, chunk_elements)
    with MappedTensors(source) as mapped, open(destination, "wb") as out:
        entries = mapped.header.tensors  # validated: sizes, offsets and tiling against the file
        plans = {name: plan_tensor(name, TO_TORCH[entry.dtype], target, keep) for name, entry in entries.items()}
        layout = {name: (FROM_TORCH[target] if plans[name].convert else entry.dtype, entry.shape)
                  for name, entry in entries.items()}

        def write_tensor(name: str, handle: BinaryIO) -> None:
            entry, plan = entries[name], plans[name]
            counts = CastCounts() if plan.convert else None
            for chunk in mapped.ranges(name, caster.capacity):
                written = caster.cast(chunk, counts) if counts is not None else chunk
                handle.write(memoryview(written.view(torch.uint8).numpy()))
            source_dtype = TO_TORCH[entry.dtype]
            output_dtype = target if plan.convert else source_dtype
            safety[name] = tensor_safety(name, entry.shape, source_dtype, output_dtype, plan,
                                         (ITEMSIZE[entry.dtype], ITEMSIZE[layout[name][0]]), counts)

        write_tensors(out, layout, mapped.header.metadata, write_tensor)
    return [safety[name] for name in entries]  # in the input's order
