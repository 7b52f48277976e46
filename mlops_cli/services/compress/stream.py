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
import json
import mmap
import struct
from pathlib import Path
from typing import Any, BinaryIO

from mlops_cli.core.formats import SAFETENSORS_DTYPES, read_safetensors_header
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

ST_TO_TORCH = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
               "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "U16": "uint16",
               "U32": "uint32", "U64": "uint64", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
TORCH_TO_ST = {value: key for key, value in ST_TO_TORCH.items()}
# The order safetensors' own writer gives tensors (by dtype, this order, then by name).
WRITE_ORDER = ("U64", "I64", "F64", "F32", "U32", "I32", "BF16", "F16", "U16", "I16", "F8_E4M3", "F8_E5M2",
               "I8", "U8", "BOOL")


def raw_entries(path: Path) -> tuple[int, dict[str, dict[str, Any]], dict[str, str]]:
    """(data start, {name: header entry with data_offsets}, metadata), after full header validation."""
    _, metadata = read_safetensors_header(path)  # validates sizes and offsets against the file first
    with open(path, "rb") as handle:
        (header_len,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(header_len))
    header.pop("__metadata__", None)
    return 8 + header_len, header, metadata


def output_header(entries: dict[str, tuple[str, list[int]]], metadata: dict[str, str]) -> tuple[bytes, list[str]]:
    """The header bytes (padded to 8) and the tensor write order for {name: (safetensors dtype, shape)}."""
    rank = {dtype: index for index, dtype in enumerate(WRITE_ORDER)}
    order = sorted(entries, key=lambda name: (rank[entries[name][0]], name))
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name in order:
        dtype, shape = entries[name]
        count = 1
        for dim in shape:
            count *= int(dim)
        size = count * SAFETENSORS_DTYPES[dtype]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return raw, order


def stream_convert(source: Path, destination: Path, target: str, keep: KeepRules,
                   chunk_elements: int = CHUNK_ELEMENTS) -> list[TensorSafety]:
    """Write `source` with its floating tensors cast to `target` into `destination` (a new file)."""
    data_start, entries, metadata = raw_entries(source)
    plans = {name: plan_tensor(name, ST_TO_TORCH[info["dtype"]], target, keep) for name, info in entries.items()}
    out_types = {name: (TORCH_TO_ST[target] if plans[name].convert else info["dtype"], info["shape"])
                 for name, info in entries.items()}
    header, order = output_header(out_types, metadata)
    safety: dict[str, TensorSafety] = {}
    caster = ChunkCaster(target, chunk_elements)
    with open(source, "rb") as raw_in, open(destination, "wb") as out:
        out.write(struct.pack("<Q", len(header)))
        out.write(header)
        # ACCESS_COPY: a writable (copy-on-write, never written) view, which torch.frombuffer takes without warning
        has_data = source.stat().st_size > data_start
        mapped = mmap.mmap(raw_in.fileno(), 0, access=mmap.ACCESS_COPY) if has_data else None
        try:
            for name in order:
                info = entries[name]
                plan = plans[name]
                begin, end = (data_start + offset for offset in info["data_offsets"])
                counts = _copy_tensor(mapped, begin, end, info["dtype"], caster if plan.convert else None, out)
                source_dtype = ST_TO_TORCH[info["dtype"]]
                output_dtype = target if plan.convert else source_dtype
                safety[name] = tensor_safety(name, tuple(info["shape"]), source_dtype, output_dtype, plan,
                                             (SAFETENSORS_DTYPES[info["dtype"]],
                                              SAFETENSORS_DTYPES[out_types[name][0]]), counts)
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
    itemsize = SAFETENSORS_DTYPES[st_dtype]
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

    source_dtype = torch_dtype(ST_TO_TORCH[st_dtype])
    itemsize = SAFETENSORS_DTYPES[st_dtype]
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
