"""Weights read tensor by tensor, without building a model: one `WeightSet` over whatever holds them.

A safetensors file, a sharded `*.safetensors.index.json`, a torch zip or legacy pickle (a bare state_dict or a
training checkpoint), a Hugging Face folder or a weights folder (mlops.json) all look alike here: names, dtypes
and shapes from their headers, and `read(name, start, stop)`, which copies a range of one tensor's elements.

Safetensors are read through a memory map whose pages are released after each range
(core/safetensors_file.MappedTensors; not `safe_open`: its mapping keeps every page it touched resident), so a pass
over a model costs a
chunk, not the model. Torch files load with `weights_only=True` and `mmap=True`: tensors stay on disk until read,
but the pages read stay mapped (torch owns the mapping); legacy pickles cannot be mapped and load whole.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlops_cli.core.contract import LoadOptions, ModelRef
from mlops_cli.core.errors import InputError, UnsafeInputError
from mlops_cli.core.formats import HF_CONFIG, Format, detect_format, load_tensor_file
from mlops_cli.core.loading import split_checkpoint, tied_names
from mlops_cli.core.safetensors_file import TO_TORCH, MappedTensors
from mlops_cli.core.sidecar import SIDECAR, read_sidecar

INDEX_SUFFIX = ".index.json"
# Weights a Hugging Face folder may hold, in the order they are preferred (safetensors first: no unpickling).
HF_WEIGHTS = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
              "pytorch_model.bin")
FLOAT_DTYPES = ("float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2")


@dataclass(frozen=True)
class TensorMeta:
    """One tensor of a weight set: its name (after --strip-prefix), where it is stored, and what it is."""

    name: str
    dtype: str  # torch spelling: float32, int64, ...
    shape: tuple[int, ...]
    shard: str  # the weights file holding it (its name inside the set's folder)
    stored_name: str  # its name in that file
    tied_to: str | None = None  # an earlier name sharing its storage (torch files): the same values

    @property
    def numel(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES


class _SafetensorsShard:
    """Ranges of a safetensors file's tensors (core/safetensors_file.MappedTensors: pages released per read)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._mapped = MappedTensors(path)
        self.metadata = self._mapped.header.metadata

    def describe(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        return {name: (TO_TORCH[entry.dtype], entry.shape) for name, entry in self._mapped.header.tensors.items()}

    def read(self, name: str, start: int, stop: int) -> Any:
        return self._mapped.read(name, start, stop)

    def close(self) -> None:
        self._mapped.close()


class _TorchShard:
    """A torch file's state_dict, memory-mapped where torch can (zip archives)."""

    def __init__(self, path: Path, fmt: Format, load: LoadOptions) -> None:
        self.path = path
        state, self.state_key, self.extras = split_checkpoint(load_tensor_file(path, fmt), load.key, path)
        self.state: dict[str, Any] = state
        self.metadata: dict[str, str] = {}

    def describe(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        import torch

        packed = [name for name, value in self.state.items() if not isinstance(value, torch.Tensor)]
        if packed:
            raise InputError(f"{self.path} holds packed int8 weights ({packed[0]}, ...), not plain tensors",
                             hint="Compare or average the float checkpoints, then quantise.")
        return {name: (str(value.dtype).removeprefix("torch."), tuple(value.shape))
                for name, value in self.state.items()}

    def tied(self) -> dict[str, str]:
        """Names whose storage an earlier name already holds (torch.save keeps ties), to that name."""
        return tied_names(self.state)

    def read(self, name: str, start: int, stop: int) -> Any:
        return self.state[name].reshape(-1)[start:stop].clone()

    def close(self) -> None:
        self.state = {}


_Shard = _SafetensorsShard | _TorchShard


@dataclass
class WeightSet:
    """The tensors of one checkpoint, read range by range. Use it as a context manager (files are held open)."""

    reference: str
    kind: str  # what an output like it is: safetensors, torch, sharded, hf-folder, weights-folder
    root: Path  # the folder holding the weights files (the file's folder for a single file)
    tensors: dict[str, TensorMeta]
    shards: dict[str, _Shard]
    index_file: str | None = None  # the sharded index's name inside root
    state_key: str | None = None
    dropped_entries: tuple[str, ...] = ()  # training-checkpoint entries beside the state_dict
    warnings: list[str] = field(default_factory=list)

    @property
    def metadata(self) -> dict[str, str]:
        """The safetensors metadata of the first shard ({} for torch files)."""
        return next(iter(self.shards.values())).metadata if self.shards else {}

    def read(self, name: str, start: int, stop: int) -> Any:
        """Elements [start, stop) of tensor `name`, flattened, in its own dtype (a copy: keep it as long as needed)."""
        meta = self.tensors[name]
        return self.shards[meta.shard].read(meta.stored_name, start, stop)

    def is_safetensors(self, shard: str) -> bool:
        return isinstance(self.shards[shard], _SafetensorsShard)

    def full(self, name: str) -> Any:
        meta = self.tensors[name]
        return self.read(name, 0, meta.numel).reshape(meta.shape)

    def close(self) -> None:
        for shard in self.shards.values():
            shard.close()

    def __enter__(self) -> WeightSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_weights(ref: ModelRef, load: LoadOptions) -> WeightSet:
    """Open what MODEL names as a weight set (InputError, exit 3, for anything that holds no plain weights)."""
    if ref.path is None:
        raise InputError(f"{ref} exists only in memory; this command reads weight files",
                         hint=f"Save it first: mlops zoo save {ref.builtin} DIR")
    path = ref.path
    if path.is_file() and path.name.endswith(INDEX_SUFFIX):
        return _open_files(ref, "sharded", path.parent, _index_files(path), load, index_file=path.name)
    fmt = detect_format(path)
    if fmt == Format.SAFETENSORS or fmt in (Format.TORCH_ZIP, Format.TORCH_LEGACY):
        kind = "safetensors" if fmt == Format.SAFETENSORS else "torch"
        return _open_files(ref, kind, path.parent, {path.name: [path.name]}, load)
    if fmt == Format.HF_FOLDER:
        name = next((n for n in HF_WEIGHTS if (path / n).is_file()), None)
        if name is None:
            raise InputError(f"{path} has {HF_CONFIG} but none of {', '.join(HF_WEIGHTS)}",
                             hint="Point at the weights file inside it.")
        if name.endswith(INDEX_SUFFIX):
            return _open_files(ref, "hf-folder", path, _index_files(path / name), load, index_file=name)
        return _open_files(ref, "hf-folder", path, {name: [name]}, load)
    if fmt == Format.WEIGHTS_FOLDER:
        weights = str(read_sidecar(path).get("weights", "model.safetensors"))
        if (path / weights).resolve().parent != path.resolve():
            raise UnsafeInputError(f"{path / SIDECAR} points outside its folder: {weights}")
        return _open_files(ref, "weights-folder", path, {weights: [weights]}, load)
    raise InputError(f"{path} is {fmt.value}, not a weights file or folder",
                     hint="Give safetensors or torch.save files, a sharded *.safetensors.index.json, a Hugging Face "
                          "folder or a folder saved by mlops.")


def _index_files(index: Path) -> dict[str, list[str]]:
    """{shard file: [tensor names]} from a sharded checkpoint's index, every shard checked to be beside it."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise InputError(f"{index} is not a sharded-checkpoint index: {exc}") from exc
    files: dict[str, list[str]] = {}
    for name, file in weight_map.items():
        if (index.parent / str(file)).resolve().parent != index.parent.resolve():
            raise UnsafeInputError(f"{index} points outside its folder: {file}")
        files.setdefault(str(file), []).append(str(name))
    return files


def _open_files(ref: ModelRef, kind: str, root: Path, files: dict[str, list[str]], load: LoadOptions,
                index_file: str | None = None) -> WeightSet:
    weights = WeightSet(ref.text, kind, root, {}, {}, index_file=index_file)
    try:
        for file in files:
            _add_shard(weights, root / file, load)
    except BaseException:
        weights.close()
        raise
    return weights


def _add_shard(weights: WeightSet, path: Path, load: LoadOptions) -> None:
    if not path.is_file():
        raise InputError(f"{weights.reference}: weights file missing: {path.name}",
                         hint="Copy every shard named by the index beside it.")
    fmt = detect_format(path)
    shard: _Shard
    tied: dict[str, str] = {}
    if fmt == Format.SAFETENSORS:
        shard = _SafetensorsShard(path)
    elif fmt in (Format.TORCH_ZIP, Format.TORCH_LEGACY):
        shard = _TorchShard(path, fmt, load)
        tied = shard.tied()
        weights.state_key = shard.state_key
        weights.dropped_entries = tuple(map(str, shard.extras))
    else:
        raise InputError(f"{path} is {fmt.value}, not a weights file")
    weights.shards[path.name] = shard
    stored = shard.describe()
    for stored_name in stored:
        name = _renamed(stored_name, load.strip_prefix)
        if name in weights.tensors:
            raise InputError(f"{weights.reference}: tensor {name!r} appears twice (in {path.name} and "
                             f"{weights.tensors[name].shard}, or twice once --strip-prefix is applied)")
        dtype, shape = stored[stored_name]
        twin = tied.get(stored_name)
        weights.tensors[name] = TensorMeta(name, dtype, shape, path.name, stored_name,
                                           _renamed(twin, load.strip_prefix) if twin else None)


def _renamed(name: str, prefix: str | None) -> str:
    """A name with --strip-prefix applied (as core.loading.strip_prefix does to a state_dict)."""
    return name[len(prefix):] if prefix and name.startswith(prefix) else name
