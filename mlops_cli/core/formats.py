"""What is this file? Formats are detected from content (magic bytes, archive layout), never extensions.

Also the safe readers for each weights format: safetensors (the header validated by core/safetensors_file.py
before anything is allocated) and torch pickles (always `weights_only=True`, memory-mapped, on CPU).
"""

from __future__ import annotations

import enum
import json
import re
import zipfile
from pathlib import Path
from typing import Any

from mlops_cli.core.errors import InputError, UnsafeInputError
from mlops_cli.core.safetensors_file import ITEMSIZE, looks_like_safetensors, read_header
from mlops_cli.core.safetensors_file import read_safetensors_header as read_safetensors_header  # re-exported
from mlops_cli.core.sidecar import SIDECAR

HF_CONFIG = "config.json"
_TORCH_LEGACY_MAGIC = bytes.fromhex("8a0a6cfc9c46f9206aa850")  # pickled magic number of torch's legacy format
_ONNX_SECOND_FIELDS = {0x12, 0x1A, 0x22, 0x28, 0x32, 0x3A, 0x42, 0x72}  # ModelProto field tags after ir_version
SAFETENSORS_DTYPES = ITEMSIZE  # element size by safetensors dtype; the table lives in core/safetensors_file.py


class Format(str, enum.Enum):
    SAFETENSORS = "safetensors"
    TORCH_ZIP = "torch-zip"
    TORCH_LEGACY = "torch-legacy-pickle"
    TORCHSCRIPT = "torchscript"
    EXPORTED_PROGRAM = "torch-export-pt2"
    AOTI_PACKAGE = "aoti-package"
    ONNX = "onnx"
    NPZ = "numpy-npz"
    HF_FOLDER = "hf-folder"
    WEIGHTS_FOLDER = "weights-folder"


WEIGHT_FORMATS = {Format.SAFETENSORS, Format.TORCH_ZIP, Format.TORCH_LEGACY}
# File names that hold a model's weights in a folder (ours or anyone's): never copied as "extras" beside an
# output, and counted as weights by summaries.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".onnx.data", ".gguf",
                   ".pt2")


def is_weight_file(name: str) -> bool:
    """Weights, or the index of sharded weights (model.safetensors.index.json)."""
    return name.endswith(WEIGHT_SUFFIXES) or name.removesuffix(".index.json").endswith(WEIGHT_SUFFIXES)


def detect_format(path: str | Path) -> Format:
    """Identify a model file or folder by its content; InputError (exit 3) for anything unusable.

    A plain Python pickle (not a torch checkpoint) is never loadable: UnsafeInputError (exit 4) naming what it
    would import when it imports anything, InputError otherwise.
    """
    target = Path(path)
    if not target.exists():
        raise InputError(f"no such file or folder: {target}", hint="Check the path, or use builtin:NAME.")
    if target.is_dir():
        return _detect_folder(target)
    size = target.stat().st_size
    if size == 0:
        raise InputError(f"{target} is empty (0 bytes)", hint="The download or save was interrupted; redo it.")
    with open(target, "rb") as handle:
        head = handle.read(64)
    if head.startswith(b"version https://git-lfs"):
        raise InputError(f"{target} is a Git LFS pointer, not the real file",
                         hint="Run `git lfs pull` (or download the file itself) and try again.")
    if head.startswith(b"PK\x03\x04"):
        return _detect_zip(target)
    if looks_like_safetensors(head, size):
        return Format.SAFETENSORS
    if head[:1] == b"\x80" and _TORCH_LEGACY_MAGIC in head[:16]:
        return Format.TORCH_LEGACY
    if len(head) > 2 and head[0] == 0x08 and head[1] < 0x80 and head[2] in _ONNX_SECOND_FIELDS:
        return Format.ONNX
    if _starts_like_a_pickle(head):
        _refuse_plain_pickle(target)
    raise InputError(f"{target} is not a format mlops understands",
                     hint="Supported: safetensors, torch.save zip/legacy pickles, TorchScript, torch.export "
                          ".pt2, ONNX, and Hugging Face model folders.")


def _starts_like_a_pickle(head: bytes) -> bool:
    """PROTO 2-5 opens every modern pickle; protocols 0-1 open with a container or an import. Anything else is
    not scanned, so other binary formats (.npy opens with STACK_GLOBAL's byte) are not mistaken for pickles."""
    if head[:1] == b"\x80":
        return len(head) > 1 and 2 <= head[1] <= 5
    return head[:1] in (b"c", b"(", b"}", b"]", b")")


def _refuse_plain_pickle(path: Path) -> None:
    """Raise for a file that is a complete pickle: it is not a format mlops reads, and it may carry code."""
    names = pickle_globals(path)
    if names is None:
        return
    if names:
        raise UnsafeInputError(f"{path} is a Python pickle that would import {', '.join(names)} when loaded",
                               hint="mlops never unpickles files. Save only the state_dict with torch.save, or "
                                    "convert the weights to safetensors.")
    raise InputError(f"{path} is a plain Python pickle, not a torch checkpoint",
                     hint="Save the tensors with torch.save or as safetensors.")


_PICKLE_MAX_OPS = 1_000_000  # longer pickles are not scanned: they are refused as unknown content (exit 3)
_PICKLE_BIG_READ = 1 << 20
_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"}
_GET_OPS = {"GET", "BINGET", "LONG_BINGET"}
_PUT_OPS = {"PUT", "BINPUT", "LONG_BINPUT"}


class _Skipped(bytes):
    """Stands for a large payload that the scan seeks over: empty, but as long as the bytes it replaces."""

    length: int

    def __new__(cls, length: int) -> _Skipped:
        skipped = super().__new__(cls)
        skipped.length = length
        return skipped

    def __len__(self) -> int:
        return self.length


class _PickleScanFile:
    """The file as `pickletools.genops` reads it, except that big payloads (tensor bytes) are skipped, not read,
    and lines are bounded, so scanning a large file costs neither its size in memory nor a full read."""

    def __init__(self, handle: Any, size: int) -> None:
        self.handle, self.size = handle, size

    def read(self, count: int) -> bytes:
        if count <= _PICKLE_BIG_READ:
            return bytes(self.handle.read(count))
        if self.handle.tell() + count > self.size:
            return b""  # genops reports the truncation
        self.handle.seek(count, 1)
        return _Skipped(count)

    def readline(self) -> bytes:
        return bytes(self.handle.readline(_PICKLE_BIG_READ))

    def tell(self) -> int:
        return int(self.handle.tell())


class _PickleImports:
    """Follows the strings a pickle pushes and memoizes, to name what GLOBAL, INST and STACK_GLOBAL import."""

    def __init__(self) -> None:
        self.names: set[str] = set()
        self.pushed: list[str | None] = []  # what each op left on top of the stack, when it was a string
        self.memo: dict[int, str | None] = {}

    def see(self, op: str, arg: Any) -> None:
        if op in ("GLOBAL", "INST"):
            self.names.add(str(arg).replace(" ", "."))
        elif op == "STACK_GLOBAL":
            module, name = [None, None, *self.pushed][-2:]
            self.names.add(f"{module}.{name}" if module and name else "a computed name")
        if op in _STRING_OPS:
            self.pushed.append(str(arg))
        elif op in _GET_OPS:
            self.pushed.append(self.memo.get(arg))
        elif op in _PUT_OPS or op == "MEMOIZE":
            self.memo[arg if op in _PUT_OPS else len(self.memo)] = self.pushed[-1] if self.pushed else None
        elif op not in ("PROTO", "FRAME"):
            self.pushed.append(None)


def pickle_globals(path: str | Path) -> list[str] | None:
    """What a pickle file would import when unpickled, found by reading its opcodes, never by running it.

    None when the file is not one complete pickle (or too long to scan).
    """
    import pickletools
    import struct

    target = Path(path)
    imports = _PickleImports()
    with open(target, "rb") as handle:
        scan: Any = _PickleScanFile(handle, target.stat().st_size)
        try:
            for count, (op, arg, _) in enumerate(pickletools.genops(scan)):
                if op.name == "STOP":
                    return sorted(imports.names)
                if count >= _PICKLE_MAX_OPS:
                    return None
                imports.see(op.name, arg)
        except (ValueError, TypeError, OverflowError, EOFError, struct.error):
            return None
    return None


def _detect_folder(folder: Path) -> Format:
    if (folder / HF_CONFIG).is_file():
        return Format.HF_FOLDER
    if (folder / SIDECAR).is_file():
        return Format.WEIGHTS_FOLDER
    raise InputError(f"{folder} is a folder without {HF_CONFIG} (not a Hugging Face model folder)",
                     hint="Point at the weights file inside it, or at a folder made by save_pretrained.")


def _detect_zip(path: Path) -> Format:
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            archive_format = next((n for n in names if n.endswith("/archive_format") or n == "archive_format"), None)
            format_text = archive.read(archive_format).decode(errors="replace").strip() if archive_format else ""
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise InputError(f"{path} is a corrupt or truncated zip archive ({exc})",
                         hint="Re-save or re-download the file.") from exc
    if any("/aotinductor/" in n or n.startswith("data/aotinductor") for n in names):
        return Format.AOTI_PACKAGE
    if format_text == "pt2" or any(n.endswith("models/model.json") for n in names):
        return Format.EXPORTED_PROGRAM
    if any("/code/" in n or n.endswith("constants.pkl") for n in names):
        return Format.TORCHSCRIPT
    if any(n.endswith("data.pkl") for n in names):
        return Format.TORCH_ZIP
    if names and all(n.endswith(".npy") for n in names):
        return Format.NPZ
    raise InputError(f"{path} is a zip archive but not one mlops understands (no data.pkl, code/ or .pt2 layout)")


# ---------------------------------------------------------------- torch pickles

_GLOBAL_PATTERN = re.compile(r"GLOBAL ([\w.]+)|global[s]? [`'\"]?([\w.]+\.[\w]+)")


def torch_load_weights(path: str | Path) -> Any:
    """`torch.load` with weights_only=True, memory-mapped, onto the CPU; never a full unpickle.

    A refused global means the file holds code or an unknown class: UnsafeInputError (exit 4) naming it.
    """
    import pickle
    import warnings

    import torch

    target = Path(path)
    # torch.load picks a loader by extension (".safetensors" -> safetensors); we go by content, so a torch
    # file with that name is read through a file handle (no mmap then: torch needs a path for it).
    by_handle = target.name.endswith(".safetensors")
    mmap = detect_format(target) == Format.TORCH_ZIP and not by_handle
    try:
        with warnings.catch_warnings():  # torch's own notes on quantised (int8) storages are not the user's business
            warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated")
            warnings.filterwarnings("ignore", message=".*quantized tensor creation functions")
            if by_handle:
                with open(target, "rb") as handle:
                    return torch.load(handle, map_location="cpu", weights_only=True)
            return torch.load(target, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        names = sorted({a or b for a, b in _GLOBAL_PATTERN.findall(text)})
        if "weights_only" in text or names:
            raise UnsafeInputError(
                f"{target} holds Python objects that a safe load refuses: {', '.join(names) or 'unknown globals'}",
                hint="Save only the state_dict (torch.save(model.state_dict(), ...)) or convert to safetensors. "
                     "mlops never falls back to full unpickling.") from exc
        raise InputError(f"{target} is a corrupt torch pickle ({text.splitlines()[0]})") from exc
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{target} could not be read as a torch checkpoint: {first_line}",
                         hint="The file is truncated or corrupt; re-save or re-download it.") from exc


def load_tensor_file(path: str | Path, fmt: Format | None = None) -> Any:
    """Load a weights file (safetensors or torch pickle) as Python objects holding CPU tensors."""
    fmt = fmt or detect_format(path)
    if fmt == Format.SAFETENSORS:
        read_header(path)  # validated before the library allocates anything
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:  # safetensors raises its own SafetensorError
            raise InputError(f"{path} could not be read as safetensors: {exc}") from exc
    if fmt in (Format.TORCH_ZIP, Format.TORCH_LEGACY):
        return torch_load_weights(path)
    raise InputError(f"{path} is {fmt.value}, not a weights file")


# ---------------------------------------------------------------- torch.export archives and mlops metadata

_PT2_CONFIGS = ("_weights_config.json", "_constants_config.json")
_PT2_UNSAFE_CONSTANTS = ("custom_obj", "opaque_obj")
ARCHIVE_METADATA = "extra/mlops.json"  # written into TorchScript/.pt2 archives by `mlops export jit/pt2`


def check_exported_archive(path: str | Path) -> None:
    """Refuse a .pt2 whose loading would unpickle arbitrary objects (exit 4).

    `torch.export.load` unpickles weights/constants marked `use_pickle`, custom and opaque objects, and
    falls back to `weights_only=False` for any pickle that a safe load rejects. We accept the archive only
    when none of that can happen: no such entries, and every pickle inside loads with `weights_only=True`.
    """
    import io
    import pickle

    import torch

    target = Path(path)
    with zipfile.ZipFile(target) as archive:
        for name in archive.namelist():
            if name.endswith(_PT2_CONFIGS):
                config = json.loads(archive.read(name)).get("config", {})
                for entry, meta in config.items():
                    path_name = str(meta.get("path_name", ""))
                    if meta.get("use_pickle") or path_name.startswith(_PT2_UNSAFE_CONSTANTS):
                        raise UnsafeInputError(
                            f"{target}: {entry!r} is stored as a pickled Python object, which loading would run",
                            hint="Pass --trust-code if you trust where the file came from.")
            elif name.endswith((".pt", ".pkl")):
                try:
                    torch.load(io.BytesIO(archive.read(name)), weights_only=True, map_location="cpu")
                except (pickle.UnpicklingError, RuntimeError) as exc:
                    raise UnsafeInputError(
                        f"{target}: {name} holds Python objects a safe load refuses",
                        hint="Pass --trust-code if you trust where the file came from.") from exc


def read_archive_metadata(path: str | Path) -> dict[str, Any]:
    """The `extra/mlops.json` that `mlops export jit/pt2` store in their archives ({} when absent).

    Read straight from the zip: nothing is unpickled and no TorchScript code runs.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            name = next((n for n in archive.namelist() if n.endswith(ARCHIVE_METADATA)), None)
            data = json.loads(archive.read(name)) if name else {}
    except (zipfile.BadZipFile, OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def metadata_input_specs(metadata: dict[str, Any]) -> tuple[str, ...]:
    """`--input` style specs from archive metadata: named dims keep their example size (batch=2)."""
    specs = []
    for spec in metadata.get("inputs") or []:
        try:
            dims = [str(dim) if str(dim).isdigit() else f"{dim}={size}"
                    for dim, size in zip(spec["dims"], spec["example_shape"], strict=True)]
            specs.append(f"{spec['name']}:{spec['dtype']}[{','.join(dims)}]")
        except (KeyError, TypeError, ValueError):
            return ()
    return tuple(specs)
