"""Streaming safetensors -> safetensors conversion: tensor by tensor, chunk by chunk, memory-mapped.

The output header is computed up front from the input header (names, shapes, new dtypes), then each
tensor is read through a memory map, cast in chunks and appended. Pages of the input are released
(`madvise(MADV_DONTNEED)`) once a chunk is written, so peak memory stays near one chunk however big
the model is. `safetensors.safe_open` is not used for reading: its mapping keeps every page it touched
resident, so the process's peak RSS grows to the file's size (measured reading a 200 MiB file once,
tensor by tensor: +214 MiB through safe_open, +27 MiB through this map). The casts reuse their buffers
(cast.ChunkCaster). benchmarks/bench_compress_streaming.py compares the whole conversion
with a naive load-convert-save.

The output is the file `safetensors.torch.save_file` writes for the same tensors and metadata: same
tensor order (by dtype, then name), same offsets, header padded with spaces to 8 bytes.
"""

from __future__ import annotations

import contextlib
import mmap
from pathlib import Path
from typing import BinaryIO

from mlops_cli.core.safetensors_file import FROM_TORCH, ITEMSIZE, TO_TORCH, read_header, write_tensors
from mlops_cli.services.compress.cast import (
    CHUNK_ELEMENTS,
    CastCounts,
    ChunkCaster,
    TensorSafety,
    plan_tensor,
    tensor_safety,
    torch_dtype,
)
from mlops_cli.services.compress.keep import KeepRules


def stream_convert(source: Path, destination: Path, target: str, keep: KeepRules,
                   chunk_elements: int = CHUNK_ELEMENTS) -> list[TensorSafety]:
    """Write `source` with its floating tensors cast to `target` into `destination` (a new file)."""
    header = read_header(source)  # validated: sizes, offsets and tiling against the file
    entries = header.tensors
    plans = {name: plan_tensor(name, TO_TORCH[entry.dtype], target, keep) for name, entry in entries.items()}
    layout = {name: (FROM_TORCH[target] if plans[name].convert else entry.dtype, entry.shape)
              for name, entry in entries.items()}
    safety: dict[str, TensorSafety] = {}
    caster = ChunkCaster(target, chunk_elements)
    with open(source, "rb") as raw_in, open(destination, "wb") as out:
        # ACCESS_COPY: a writable (copy-on-write, never written) view, which torch.frombuffer takes without warning
        has_data = source.stat().st_size > header.data_start
        mapped = mmap.mmap(raw_in.fileno(), 0, access=mmap.ACCESS_COPY) if has_data else None

        def write_tensor(name: str, handle: BinaryIO) -> None:
            entry, plan = entries[name], plans[name]
            begin, end = header.data_start + entry.begin, header.data_start + entry.end
            counts = _copy_tensor(mapped, begin, end, entry.dtype, caster if plan.convert else None, handle)
            source_dtype = TO_TORCH[entry.dtype]
            output_dtype = target if plan.convert else source_dtype
            safety[name] = tensor_safety(name, entry.shape, source_dtype, output_dtype, plan,
                                         (ITEMSIZE[entry.dtype], ITEMSIZE[layout[name][0]]), counts)

        try:
            write_tensors(out, layout, header.metadata, write_tensor)
        finally:
            if mapped is not None:
                mapped.close()
    return [safety[name] for name in entries]  # in the input's order


def _copy_tensor(mapped: mmap.mmap | None, begin: int, end: int, st_dtype: str, caster: ChunkCaster | None,
                 out: BinaryIO) -> CastCounts | None:
    """Append one tensor's bytes to `out`, cast by `caster` when given; returns the cast's counts."""
    counts = CastCounts() if caster else None
    if mapped is None or end == begin:
        return counts
    itemsize = ITEMSIZE[st_dtype]
    step = (caster.capacity if caster else CHUNK_ELEMENTS) * itemsize
    for start in range(begin, end, step):
        stop = min(start + step, end)
        if caster is None:
            out.write(mapped[start:stop])
        else:
            _cast_chunk(mapped, start, stop, st_dtype, caster, out, counts)  # type: ignore[arg-type]
        _release(mapped, start, stop)
    return counts


def _cast_chunk(mapped: mmap.mmap, start: int, stop: int, st_dtype: str, caster: ChunkCaster, out: BinaryIO,
                counts: CastCounts) -> None:
    import torch

    source_dtype = torch_dtype(TO_TORCH[st_dtype])
    itemsize = ITEMSIZE[st_dtype]
    if start % itemsize:  # an unaligned tensor (a foreign writer): copy the chunk to aligned memory first
        chunk = torch.frombuffer(bytearray(mapped[start:stop]), dtype=source_dtype)
    else:
        chunk = torch.frombuffer(mapped, dtype=source_dtype, count=(stop - start) // itemsize, offset=start)
    out.write(caster.cast(chunk, counts).view(torch.uint8).numpy())
    del chunk


def _release(mapped: mmap.mmap, start: int, stop: int) -> None:
    """Give the pages of a processed range back, so they do not accumulate in the process's memory."""
    if not hasattr(mapped, "madvise"):
        return
    page = mmap.PAGESIZE
    first = (start // page) * page
    with contextlib.suppress(OSError, ValueError):  # unsupported here: the kernel reclaims the pages itself
        mapped.madvise(mmap.MADV_DONTNEED, first, stop - first)
