"""`mlops inspect`: what a checkpoint holds, without building (or running) a model.

Safetensors are read from their header alone; torch pickles with weights_only and mmap; TorchScript and
.pt2 archives are listed from their zip directory, never loaded (loading TorchScript runs its code).
"""

from __future__ import annotations

import json
import zipfile
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mlops_cli.core.contract import ModelRef, Report, ServiceOptions
from mlops_cli.core.errors import InputError
from mlops_cli.core.formats import (
    HF_CONFIG,
    SIDECAR,
    WEIGHT_FORMATS,
    Format,
    detect_format,
    load_tensor_file,
    read_safetensors_header,
)
from mlops_cli.core.loading import CHECKPOINT_KEYS, hf_weight_files, is_tensor_dict, storage_identity
from mlops_cli.core.safetensors_file import TO_TORCH
from mlops_cli.core.shards import shard_problems
from mlops_cli.core.sidecar import read_sidecar

LARGEST_SHOWN = 5
CONFIG_FIELDS = ("model_type", "architectures", "vocab_size", "hidden_size", "n_embd", "num_hidden_layers",
                 "n_layer", "num_attention_heads", "n_head", "intermediate_size", "max_position_embeddings",
                 "n_positions", "num_labels", "id2label", "image_size", "dtype", "torch_dtype", "transformers_version")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    tied_to: str | None = None  # an earlier name whose storage this tensor shares (stored once, counted once)


@dataclass(frozen=True)
class DtypeTotal:
    dtype: str
    tensors: int
    elements: int
    nbytes: int


@dataclass(frozen=True, kw_only=True)
class InspectOptions(ServiceOptions):
    """Nothing to choose: inspect reads files without loading a model (the loading options do not apply)."""


@dataclass(frozen=True, kw_only=True)
class InspectReport(Report):
    path: str
    format: str
    file_bytes: int
    tensor_count: int
    element_count: int
    tensor_bytes: int
    dtypes: tuple[DtypeTotal, ...]
    largest: tuple[TensorInfo, ...]
    state_key: str | None = None
    checkpoint_entries: dict[str, str] = field(default_factory=dict)  # non-weight keys -> summary
    metadata: dict[str, str] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    files: dict[str, int] = field(default_factory=dict)  # folder/archive members -> bytes
    graph: dict[str, Any] = field(default_factory=dict)  # ONNX: opset, inputs, outputs, nodes
    notes: tuple[str, ...] = ()


def run(ref: ModelRef, options: InspectOptions) -> InspectReport:
    """Describe the checkpoint file or folder `ref` names."""
    return inspect_path(ref)


def inspect_path(reference: str | ModelRef) -> InspectReport:
    """Describe a checkpoint file or folder (used by `summarize` and `view` for sizes and graph facts too)."""
    ref = ModelRef.parse(reference)
    if ref.path is None:
        raise InputError("inspect reads files; built-in models exist only in memory",
                         hint=f"Save one first: mlops zoo save {ref.builtin} DIR")
    path = ref.path
    fmt = detect_format(path)
    if fmt == Format.HF_FOLDER or fmt == Format.WEIGHTS_FOLDER:
        return _inspect_folder(path, fmt)
    if fmt == Format.SAFETENSORS:
        tensors, metadata = read_safetensors_header(path)
        infos = [_safetensors_info(n, i) for n, i in tensors.items()]
        return _report(path, fmt, infos, metadata=metadata)
    if fmt in WEIGHT_FORMATS:
        return _inspect_torch_pickle(path, fmt)
    if fmt == Format.ONNX:
        return _inspect_onnx(path)
    return _inspect_archive(path, fmt)


def _report(path: Path, fmt: Format, infos: list[TensorInfo], **extra: Any) -> InspectReport:
    totals: dict[str, list[int]] = {}
    elements = 0
    for info in infos:
        count = 1
        for dim in info.shape:
            count *= dim
        elements += count
        entry = totals.setdefault(info.dtype, [0, 0, 0])
        entry[0] += 1
        entry[1] += count
        entry[2] += info.nbytes
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size
    return InspectReport(
        path=str(path), format=fmt.value, file_bytes=size, tensor_count=len(infos), element_count=elements,
        tensor_bytes=sum(i.nbytes for i in infos if i.tied_to is None),
        dtypes=tuple(DtypeTotal(d, *v) for d, v in sorted(totals.items(), key=lambda kv: -kv[1][2])),
        largest=tuple(sorted(infos, key=lambda i: -i.nbytes)[:LARGEST_SHOWN]), **extra)


def _safetensors_info(name: str, info: dict[str, Any]) -> TensorInfo:
    dtype = TO_TORCH.get(info["dtype"], info["dtype"].lower())
    return TensorInfo(name, dtype, tuple(info["shape"]), info["nbytes"])


def _tensor_infos(state_dict: dict[str, Any]) -> list[TensorInfo]:
    """One row per tensor; the packed (weight, bias) pairs of an int8 state_dict count as their tensors, and
    tied tensors (one storage under two names, as torch.save stores GPT-2's lm_head/wte) name their twin."""
    import torch

    infos = []
    seen: dict[tuple[Any, ...], str] = {}
    for name, value in state_dict.items():
        parts = [(name, value)] if isinstance(value, torch.Tensor) else [
            (f"{name}.{i}", part) for i, part in enumerate(value if isinstance(value, (tuple, list)) else ())
            if isinstance(part, torch.Tensor)]
        for part_name, tensor in parts:
            identity = storage_identity(tensor)
            tied_to = seen.get(identity) if identity else None
            if identity and tied_to is None:
                seen[identity] = part_name
            infos.append(TensorInfo(part_name, str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape),
                                    tensor.numel() * tensor.element_size(), tied_to))
    return infos


def _state_infos(content: Any) -> tuple[list[TensorInfo], str | None]:
    """The tensors of a loaded pickle: the whole dict, or the state_dict under a well-known checkpoint key."""
    if is_tensor_dict(content):
        return _tensor_infos(content), None
    if not isinstance(content, dict):
        return [], None
    state_key = next((k for k in CHECKPOINT_KEYS if is_tensor_dict(content.get(k))), None)
    return (_tensor_infos(content[state_key]) if state_key else []), state_key


def _inspect_torch_pickle(path: Path, fmt: Format) -> InspectReport:
    content = load_tensor_file(path, fmt)
    if is_tensor_dict(content):
        return _report(path, fmt, _tensor_infos(content))
    if not isinstance(content, dict):
        return _report(path, fmt, [], notes=(f"holds a {type(content).__name__}, not a dict",))
    infos, state_key = _state_infos(content)
    entries = {str(k): summarize_value(v) for k, v in content.items() if k != state_key}
    notes = () if state_key else ("no state_dict found under a well-known key; use --key with other commands",)
    return _report(path, fmt, infos, state_key=state_key, checkpoint_entries=entries, notes=notes)


def summarize_value(value: Any) -> str:
    """A one-line description of a training-checkpoint entry (epoch, optimizer, scheduler, ...)."""
    import torch

    if isinstance(value, (int, float, str, bool)) or value is None:
        return repr(value)
    if isinstance(value, torch.Tensor):
        return f"tensor {str(value.dtype).removeprefix('torch.')}{list(value.shape)}"
    if isinstance(value, dict):
        if "state" in value and "param_groups" in value:  # an optimizer state_dict
            groups = value["param_groups"]
            hyper = {k: v for k, v in (groups[0].items() if groups else []) if k in ("lr", "momentum", "weight_decay")}
            return f"optimizer state: {len(value['state'])} parameter states, {len(groups)} group(s) {hyper}"
        if is_tensor_dict(value):
            return f"state_dict with {len(value)} tensors"
        keys = ", ".join(map(str, list(value)[:6]))
        return f"dict with {len(value)} keys ({keys}{', ...' if len(value) > 6 else ''})"
    if isinstance(value, (list, tuple)):
        return f"{type(value).__name__} of {len(value)} items"
    return type(value).__name__


def _inspect_folder(folder: Path, fmt: Format) -> InspectReport:
    files = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}
    config_path = folder / (HF_CONFIG if fmt == Format.HF_FOLDER else SIDECAR)
    raw = read_sidecar(folder, config_path.name) if fmt == Format.WEIGHTS_FOLDER else _read_json_object(config_path)
    config = {k: raw[k] for k in CONFIG_FIELDS if k in raw} if fmt == Format.HF_FOLDER else raw
    infos: list[TensorInfo] = []
    metadata: dict[str, str] = {}
    notes: list[str] = []
    skipped = {path.name for path in hf_weight_files(folder)[1]} if fmt == Format.HF_FOLDER else set()
    if skipped:
        notes.append(f"not read: {', '.join(sorted(skipped))} (safetensors are present; loaders use those)")
    for name in files:
        member = folder / name
        if name in skipped:
            continue
        if name.endswith(".safetensors"):
            tensors, metadata = read_safetensors_header(member)
            infos += [_safetensors_info(n, i) for n, i in tensors.items()]
        elif name.endswith((".bin", ".pt", ".pth")):
            pickled, _ = _state_infos(load_tensor_file(member))
            infos += pickled
            notes.append(f"{name}: {len(pickled)} tensors (torch pickle, loaded weights_only)")
    notes += shard_problems(folder, {info.name for info in infos})
    if not infos and not notes:
        notes.append("no weight files found in the folder")
    tokenizer_files = [n for n in files if n.startswith("tokenizer") or n in ("vocab.txt", "vocab.json", "merges.txt")]
    if tokenizer_files:
        notes.append(f"tokenizer files: {', '.join(tokenizer_files)}")
    return _report(folder, fmt, infos, metadata=metadata, config=config, files=files, notes=tuple(notes))


def _read_json_object(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path} could not be read: {exc}") from exc
    if not isinstance(raw, dict):
        raise InputError(f"{path} is malformed: it is not a JSON object")
    return raw


def _inspect_onnx(path: Path) -> InspectReport:
    import onnx

    from mlops_cli.core.loading import check_onnx_external_data

    check_onnx_external_data(path)
    model = onnx.load(str(path), load_external_data=False)
    infos = []
    external = []
    for init in model.graph.initializer:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(init.data_type)
        shape = tuple(int(d) for d in init.dims)
        count = 1
        for dim in shape:
            count *= dim
        infos.append(TensorInfo(init.name, str(dtype), shape, count * dtype.itemsize))
        if init.data_location == onnx.TensorProto.EXTERNAL:
            external.append(init.name)

    def describe(value: Any) -> str:
        tensor = value.type.tensor_type
        dims = [d.dim_param or str(d.dim_value) for d in tensor.shape.dim]
        return f"{onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type)}[{', '.join(dims)}]"

    graph = {
        "opset": {entry.domain or "ai.onnx": entry.version for entry in model.opset_import},
        "ir_version": model.ir_version,
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "inputs": {v.name: describe(v) for v in model.graph.input},
        "outputs": {v.name: describe(v) for v in model.graph.output},
        "nodes": len(model.graph.node),
        "ops": dict(Counter(node.op_type for node in model.graph.node).most_common()),
        "external_data_tensors": len(external),
    }
    return _report(path, Format.ONNX, infos, graph=graph)


def _inspect_archive(path: Path, fmt: Format) -> InspectReport:
    """TorchScript / .pt2 / AOTI: list the zip, never load it (TorchScript would run code)."""
    with zipfile.ZipFile(path) as archive:
        members = {info.filename: info.file_size for info in archive.infolist()}
    data = {n: s for n, s in members.items() if "/data/" in n and not n.endswith((".json", ".pkl"))}
    code = [n for n in members if "/code/" in n and n.endswith(".py")]
    notes = [f"{len(data)} weight storages, {sum(data.values())} bytes (dtypes and shapes need loading)"]
    if fmt == Format.TORCHSCRIPT:
        notes.append(f"{len(code)} code file(s): TorchScript runs code when loaded; other commands need --trust-code")
    report = _report(path, fmt, [], files=dict(sorted(members.items(), key=lambda kv: -kv[1])[:20]), notes=tuple(notes))
    return replace(report, tensor_bytes=sum(data.values()))
