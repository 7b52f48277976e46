"""Sizes: the tensors as they would be saved (input dtypes kept), their raw bytes and compressed bytes."""

from __future__ import annotations

import zlib
from typing import Any

from mlops_cli.core.contract import LoadOptions
from mlops_cli.core.formats import Format, read_safetensors_header
from mlops_cli.core.loading import LoadedModel, ModelKind
from mlops_cli.services.prune.report import SizeFigures

GZIP_LEVEL = 6  # what `gzip` uses by default


def state_for_saving(module: Any, dtypes: dict[str, Any]) -> dict[str, Any]:
    """CPU state_dict in the dtypes of the input file (a loaded fp16 file must not come back as fp32)."""
    state = {}
    for name, tensor in module.state_dict().items():
        tensor = tensor.detach().cpu()
        if name in dtypes and tensor.dtype != dtypes[name]:
            tensor = tensor.to(dtypes[name])
        state[name] = tensor.contiguous()
    return state


def weight_sizes(state: dict[str, Any]) -> SizeFigures:
    """Raw bytes and gzip -6 bytes of the tensors (tied tensors once), streamed through zlib."""
    import torch

    compressor = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31)  # wbits 31: gzip container
    seen: set[tuple[int, tuple[int, ...]]] = set()
    raw = compressed = 0
    for name in sorted(state):
        tensor = state[name]
        key = (tensor.data_ptr(), tuple(tensor.shape))
        if key in seen and tensor.numel():
            continue
        seen.add(key)
        data = tensor.contiguous().view(-1).view(torch.uint8).numpy() if tensor.numel() else b""
        raw += len(data)
        compressed += len(compressor.compress(data))
    compressed += len(compressor.flush())
    return SizeFigures(raw, compressed)


def file_dtypes(loaded: LoadedModel, load: LoadOptions) -> dict[str, Any]:
    """dtype of every weight in the input file (plain modules), so the output keeps them."""
    import torch

    if loaded.kind != ModelKind.MODULE or loaded.path is None:
        return {}
    from mlops_cli.core.formats import load_tensor_file
    from mlops_cli.core.loading import split_checkpoint, strip_prefix

    if loaded.format == Format.SAFETENSORS:
        header, _ = read_safetensors_header(loaded.path)
        names = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
        dtypes = {k: names[v["dtype"]] for k, v in header.items() if v["dtype"] in names}
        return strip_prefix(dtypes, load.strip_prefix)
    content = load_tensor_file(loaded.path, loaded.format)
    state, _, _ = split_checkpoint(content, load.key, loaded.path)
    return {k: v.dtype for k, v in strip_prefix(state, load.strip_prefix).items() if v.is_floating_point()}
