"""Everything mlops knows about the safetensors layout: the one header reader, the one writer, the dtype table.

A safetensors file is an 8-byte little-endian header length, a JSON header naming each tensor's dtype, shape
and byte range in the data section, then the data. The reader validates the header against the file before
anything is allocated, and refuses what the safetensors library would refuse *and* what parsers disagree on
(duplicate keys, overlapping or gapped ranges), so no file means one thing to mlops and another to a loader.
The writer produces the layout `safetensors.torch.save_file` writes (tensors by dtype then name, header padded
with spaces to 8 bytes) with sorted metadata, atomically, so identical tensors give byte-identical files.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import struct
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from mlops_cli.core.errors import InputError, OutputError

MAX_HEADER = 100 * 1024 * 1024  # what the safetensors library accepts
METADATA_KEY = "__metadata__"
Layout = Mapping[str, tuple[str, Sequence[int]]]  # {name: (safetensors dtype, shape)}: what a header declares


@dataclass(frozen=True)
class Dtype:
    """One safetensors dtype: its name in headers, the torch dtype's name and the size of an element."""

    name: str
    torch: str
    itemsize: int


# In the order safetensors' own writer places tensors (by dtype in this order, then by name).
DTYPES: dict[str, Dtype] = {dtype.name: dtype for dtype in (
    Dtype("U64", "uint64", 8), Dtype("I64", "int64", 8), Dtype("F64", "float64", 8), Dtype("F32", "float32", 4),
    Dtype("U32", "uint32", 4), Dtype("I32", "int32", 4), Dtype("BF16", "bfloat16", 2), Dtype("F16", "float16", 2),
    Dtype("U16", "uint16", 2), Dtype("I16", "int16", 2), Dtype("F8_E4M3", "float8_e4m3fn", 1),
    Dtype("F8_E5M2", "float8_e5m2", 1), Dtype("I8", "int8", 1), Dtype("U8", "uint8", 1), Dtype("BOOL", "bool", 1),
)}
ITEMSIZE = {name: dtype.itemsize for name, dtype in DTYPES.items()}  # "F32" -> 4
TO_TORCH = {name: dtype.torch for name, dtype in DTYPES.items()}  # "F32" -> "float32"
FROM_TORCH = {dtype.torch: name for name, dtype in DTYPES.items()}  # "float32" -> "F32"
WRITE_ORDER = tuple(DTYPES)
CHUNK_ELEMENTS = 1024 * 1024  # tensors are streamed in ranges of this many elements (4 MiB of fp32)


def torch_dtype(name: str) -> Any:
    """torch's dtype object for a torch dtype name ("float16" -> torch.float16)."""
    import torch

    return getattr(torch, name)


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a header: `begin`/`end` are offsets into the data section."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class Header:
    """A validated header: tensors in the header's order, metadata, and where the data section starts."""

    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]
    data_start: int


# ---------------------------------------------------------------- reading


def looks_like_safetensors(head: bytes, size: int) -> bool:
    """A cheap sniff on a file's first bytes (format detection); `read_header` does the validation."""
    if len(head) < 10:
        return False
    (header_len,) = struct.unpack("<Q", head[:8])
    return head[8:9] == b"{" and 8 + header_len <= size


def read_header(path: str | Path) -> Header:
    """Parse and validate a safetensors header without reading any tensor data (InputError, exit 3).

    Every declared size and offset is checked against the real file size, so a tiny file cannot make us
    allocate gigabytes; the tensors must tile the data section exactly, as the safetensors library requires.
    """
    target = Path(path)
    size = target.stat().st_size
    with open(target, "rb") as handle:
        raw_len = handle.read(8)
        if len(raw_len) < 8:
            raise InputError(f"{target} is truncated: no safetensors header")
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len > min(size - 8, MAX_HEADER):
            raise InputError(f"{target} declares a {header_len}-byte header but the file has {size} bytes",
                             hint="The file is truncated or not safetensors.")
        header = _parse_json(target, handle.read(header_len))
    metadata = _metadata(target, header.pop(METADATA_KEY, None))
    tensors = {name: _entry(target, name, info) for name, info in header.items()}
    _check_tiling(target, tensors.values(), size - 8 - header_len)
    return Header(tensors=tensors, metadata=metadata, data_start=8 + header_len)


def read_safetensors_header(path: str | Path) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """(tensors, metadata) with tensors as name -> {dtype, shape, nbytes}: the summary most callers need."""
    header = read_header(path)
    tensors = {name: {"dtype": entry.dtype, "shape": list(entry.shape), "nbytes": entry.nbytes}
               for name, entry in header.tensors.items()}
    return tensors, header.metadata


class _DuplicateKeys(ValueError):
    def __init__(self, keys: list[str]) -> None:
        super().__init__(", ".join(keys))
        self.keys = keys


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json.loads keeps the last of repeated keys (so does the safetensors library); other parsers keep the
    first. A file that means two things is refused instead."""
    repeated = sorted(key for key, count in Counter(key for key, _ in pairs).items() if count > 1)
    if repeated:
        raise _DuplicateKeys(repeated)
    return dict(pairs)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _parse_json(target: Path, raw: bytes) -> dict[str, Any]:
    try:
        # Decoded explicitly: json.loads(bytes) would also accept UTF-16/32, which safetensors does not.
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_object, parse_constant=_no_constant)
    except _DuplicateKeys as exc:
        raise InputError(f"{target}: the safetensors header repeats {', '.join(map(repr, exc.keys))}",
                         hint="Readers disagree on which entry wins, so mlops refuses the file; re-save it.") from exc
    except (UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"{target} has a corrupt safetensors header ({exc})") from exc
    if not isinstance(header, dict):
        raise InputError(f"{target} has a corrupt safetensors header (not an object)")
    return header


def _metadata(target: Path, metadata: Any) -> dict[str, str]:
    if metadata is None:
        return {}
    if not isinstance(metadata, dict) or not all(isinstance(value, str) for value in metadata.values()):
        raise InputError(f"{target}: the safetensors {METADATA_KEY} must map names to strings")
    return dict(metadata)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**64


def _entry(target: Path, name: str, info: Any) -> TensorEntry:
    try:
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    except (KeyError, TypeError) as exc:
        raise InputError(f"{target}: tensor {name!r} has a malformed header entry") from exc
    if not (isinstance(shape, list) and all(map(_is_count, shape))
            and isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))):
        raise InputError(f"{target}: tensor {name!r} has a malformed header entry "
                         f"(shape {shape!r}, data_offsets {offsets!r})")
    if dtype not in DTYPES:
        raise InputError(f"{target}: tensor {name!r} has unsupported dtype {dtype}")
    begin, end = offsets
    if begin > end:
        raise InputError(f"{target}: tensor {name!r} has reversed data offsets [{begin}, {end})",
                         hint="The file is corrupt; re-download it.")
    count = 1
    for dim in shape:
        count *= dim
    if end - begin != count * ITEMSIZE[dtype]:
        raise InputError(f"{target}: tensor {name!r} declares {count * ITEMSIZE[dtype]} bytes at [{begin}, {end})",
                         hint="The file is corrupt; re-download it.")
    return TensorEntry(name=name, dtype=dtype, shape=tuple(shape), begin=begin, end=end)


def _check_tiling(target: Path, entries: Iterable[TensorEntry], data_size: int) -> None:
    """The tensors must cover the data section exactly, back to back: an overlap lets two names share bytes,
    a gap hides bytes no tensor owns (both are refused by the safetensors library too)."""
    position, previous = 0, None
    for entry in sorted(entries, key=lambda e: (e.begin, e.end)):
        if entry.end > data_size:
            raise InputError(f"{target}: tensor {entry.name!r} declares {entry.nbytes} bytes at "
                             f"[{entry.begin}, {entry.end}) but the data section has {data_size} bytes",
                             hint="The file is truncated or corrupt; re-download it.")
        if entry.begin < position:
            raise InputError(f"{target}: tensors {previous!r} and {entry.name!r} overlap at bytes "
                             f"[{entry.begin}, {min(position, entry.end)}) of the data section",
                             hint="Two names would share the same bytes; mlops refuses such files.")
        if entry.begin > position:
            raise InputError(f"{target}: bytes [{position}, {entry.begin}) of the data section, before tensor "
                             f"{entry.name!r}, belong to no tensor",
                             hint="The file is corrupt or was altered; re-download it.")
        position, previous = entry.end, entry.name
    if position != data_size:
        raise InputError(f"{target}: the data section has {data_size - position} bytes after the last tensor "
                         f"({previous!r}) that belong to no tensor",
                         hint="The file is corrupt or was altered; re-download it.")


# ---------------------------------------------------------------- writing


def encode_header(layout: Layout, metadata: Mapping[str, str] | None = None) -> tuple[bytes, list[str]]:
    """The header bytes (padded with spaces to 8) and the data order for {name: (safetensors dtype, shape)}.

    The layout is safetensors' own (tensors by dtype, then by name); metadata keys are sorted, since the
    library writes them in hash order and two saves of the same tensors would otherwise differ.
    """
    rank = {dtype: index for index, dtype in enumerate(WRITE_ORDER)}
    order = sorted(layout, key=lambda name: (rank[layout[name][0]], name))
    header: dict[str, Any] = {METADATA_KEY: {key: metadata[key] for key in sorted(metadata)}} if metadata else {}
    offset = 0
    for name in order:
        dtype, shape = layout[name]
        count = 1
        for dim in shape:
            count *= int(dim)
        size = count * ITEMSIZE[dtype]
        header[name] = {"dtype": dtype, "shape": [int(dim) for dim in shape], "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return raw + b" " * (-len(raw) % 8), order


def write_tensors(handle: BinaryIO, layout: Layout, metadata: Mapping[str, str] | None,
                  write_tensor: Callable[[str, BinaryIO], None]) -> list[str]:
    """Write a whole safetensors file to `handle`; `write_tensor(name, handle)` appends one tensor's bytes.

    Returns the data order. A tensor whose bytes do not match its declared size is a bug: OutputError.
    """
    header, order = encode_header(layout, metadata)
    handle.write(struct.pack("<Q", len(header)))
    handle.write(header)
    for name in order:
        dtype, shape = layout[name]
        expected = ITEMSIZE[dtype]
        for dim in shape:
            expected *= int(dim)
        start = handle.tell()
        write_tensor(name, handle)
        if handle.tell() - start != expected:
            raise OutputError(f"tensor {name!r}: wrote {handle.tell() - start} bytes, its header says {expected}")
    return order


def tensor_layout(tensors: Mapping[str, Any]) -> Layout:
    """{name: (safetensors dtype, shape)} for torch tensors; a dtype safetensors cannot hold is OutputError."""
    layout: dict[str, tuple[str, Sequence[int]]] = {}
    for name, tensor in tensors.items():
        torch_name = str(tensor.dtype).removeprefix("torch.")
        if torch_name not in FROM_TORCH:
            raise OutputError(f"tensor {name!r} has dtype {torch_name}, which safetensors cannot store")
        layout[name] = (FROM_TORCH[torch_name], tuple(tensor.shape))
    return layout


def save_safetensors(tensors: Mapping[str, Any], path: str | Path, metadata: Mapping[str, str] | None = None,
                     force: bool = False, inputs: Iterable[str | Path] = ()) -> Path:
    """Write torch tensors as safetensors, atomically and reproducibly, one tensor in memory at a time.

    Tensors sharing storage are written as separate copies (the file has no notion of sharing).
    """
    import torch

    from mlops_cli.core.io import atomic_file  # io re-exports this writer: import it here, not at module level

    def write_tensor(name: str, handle: BinaryIO) -> None:
        tensor = tensors[name].detach().to("cpu").contiguous().reshape(-1)
        handle.write(memoryview(tensor.view(torch.uint8).numpy()))

    with atomic_file(path, force, inputs) as temp, open(temp, "wb") as handle:
        write_tensors(handle, tensor_layout(tensors), metadata, write_tensor)
    return Path(path)



# ---------------------------------------------------------------- streaming reads


class MappedTensors:
    """A safetensors file's tensors read in element ranges through a private memory map; the pages of each
    range are given back after the read, so memory follows the range, not the file (shards of any size).

    ACCESS_COPY gives a writable (copy-on-write, never written) view, which torch.frombuffer takes without warning.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.header = read_header(self.path)
        with open(self.path, "rb") as handle:  # the map keeps its own reference to the file
            has_data = self.path.stat().st_size > self.header.data_start
            self._mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY) if has_data else None

    def __enter__(self) -> MappedTensors:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def read(self, name: str, start: int = 0, stop: int | None = None) -> Any:
        """Elements [start, stop) of tensor `name`, flattened, as a torch tensor that owns its memory."""
        with self._view(name, start, stop) as view:
            return view.clone()

    def ranges(self, name: str, elements: int = CHUNK_ELEMENTS) -> Iterator[Any]:
        """Tensor `name` as consecutive flat ranges of at most `elements` elements. Each is a view into the map,
        valid until the next one is asked for (its pages are given back then): use it or copy it."""
        total = self.header.tensors[name].nbytes // ITEMSIZE[self.header.tensors[name].dtype]
        for start in range(0, total, max(1, elements)):
            with self._view(name, start, min(start + elements, total)) as view:
                yield view

    @contextlib.contextmanager
    def _view(self, name: str, start: int, stop: int | None) -> Iterator[Any]:
        import torch

        entry = self.header.tensors[name]
        dtype, itemsize = torch_dtype(TO_TORCH[entry.dtype]), ITEMSIZE[entry.dtype]
        stop = entry.nbytes // itemsize if stop is None else stop
        begin = self.header.data_start + entry.begin + start * itemsize
        end = begin + (stop - start) * itemsize
        if self._mapped is None or end == begin:
            yield torch.empty(0, dtype=dtype)
            return
        if begin % itemsize:  # a foreign writer left the tensor unaligned: copy its bytes first
            yield torch.frombuffer(bytearray(self._mapped[begin:end]), dtype=dtype)
            return
        view = torch.frombuffer(self._mapped, dtype=dtype, count=stop - start, offset=begin)
        try:
            yield view
        finally:
            del view
            self._release(begin, end)

    def _release(self, begin: int, end: int) -> None:
        if self._mapped is None or not hasattr(self._mapped, "madvise"):
            return
        first = (begin // mmap.PAGESIZE) * mmap.PAGESIZE
        with contextlib.suppress(OSError, ValueError):  # unsupported here: the kernel reclaims the pages itself
            self._mapped.madvise(mmap.MADV_DONTNEED, first, end - first)

    def close(self) -> None:
        with contextlib.suppress(BufferError):
            if self._mapped is not None:
                self._mapped.close()
