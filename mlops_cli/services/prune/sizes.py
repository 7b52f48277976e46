"""Sizes: the tensors as they would be saved (input dtypes kept), their raw bytes and compressed bytes."""

from __future__ import annotations

import math
import zlib
from typing import Any

from mlops_cli.core.contract import LoadOptions
from mlops_cli.core.formats import Format, read_safetensors_header
from mlops_cli.core.loading import LoadedModel, ModelKind
from mlops_cli.services.prune.report import SizeFigures

GZIP_LEVEL = 1  # the fastest deflate: zeros still compress to almost nothing, at twice gzip -6's speed
BLOCK_BYTES = 64 * 1024  # the sampling unit: larger than deflate's 32 KiB window
SAMPLE_BYTES = 16 * 1024 * 1024  # states up to this size are compressed whole; larger ones sampled to about this
NOT_ESTIMATED = "not estimated (--no-size-estimate)"


def state_for_saving(module: Any, dtypes: dict[str, Any]) -> dict[str, Any]:
    """CPU state_dict in the dtypes of the input file (a loaded fp16 file must not come back as fp32)."""
    state = {}
    for name, tensor in module.state_dict().items():
        tensor = tensor.detach().cpu()
        if name in dtypes and tensor.dtype != dtypes[name]:
            tensor = tensor.to(dtypes[name])
        state[name] = tensor.contiguous()
    return state


def weight_sizes(state: dict[str, Any], *, estimate: bool = True, level: int = GZIP_LEVEL,
                 sample_bytes: int | None = SAMPLE_BYTES) -> SizeFigures:
    """Raw bytes of the tensors (tied tensors once) and an estimate of their gzip size.

    The compressed size is what zeros buy, but deflating a whole model is slow (gzip -6 runs at a few MB/s),
    so a state larger than `sample_bytes` is sampled: every k-th block of 64 KiB of the byte stream, the same
    blocks on every run, compressed as one stream; the ratio found is applied to the raw size. The method is
    stated in the figures. `sample_bytes=None` compresses every byte.
    """
    chunks = _byte_views(state)
    raw = sum(len(chunk) for chunk in chunks)
    if not estimate:
        return SizeFigures(raw, None, "", NOT_ESTIMATED, 0.0)
    stride = 1 if sample_bytes is None or raw <= sample_bytes else math.ceil(raw / sample_bytes)
    compressed, sampled = _deflate_blocks(chunks, level, stride)
    estimated = round(compressed * raw / sampled) if sampled else 0
    codec = f"gzip -{level}"
    if stride == 1:
        return SizeFigures(raw, estimated, codec, "every byte compressed", 1.0)
    share = sampled / raw
    return SizeFigures(raw, estimated, codec, f"1 block of {BLOCK_BYTES // 1024} KiB in {stride} compressed "
                                              f"({share:.1%} of the bytes), the ratio applied to the whole", share)


def _byte_views(state: dict[str, Any]) -> list[Any]:
    """Each tensor's bytes (numpy uint8 views, no copy), in name order, shared tensors once."""
    import torch

    seen: set[tuple[int, tuple[int, ...]]] = set()
    views = []
    for name in sorted(state):
        tensor = state[name]
        key = (tensor.data_ptr(), tuple(tensor.shape))
        if not tensor.numel() or key in seen:
            continue
        seen.add(key)
        views.append(tensor.contiguous().view(-1).view(torch.uint8).numpy())
    return views


def _deflate_blocks(chunks: list[Any], level: int, stride: int) -> tuple[int, int]:
    """(compressed bytes, bytes fed) for every `stride`-th block of the concatenated chunks, one gzip stream."""
    compressor = zlib.compressobj(level, zlib.DEFLATED, 31)  # wbits 31: gzip container
    position = compressed = sampled = 0
    for chunk in chunks:
        offset = 0
        while offset < len(chunk):
            block, within = divmod(position, BLOCK_BYTES)
            take = min(BLOCK_BYTES - within, len(chunk) - offset)
            if block % stride == 0:
                compressed += len(compressor.compress(chunk[offset:offset + take]))
                sampled += take
            offset += take
            position += take
    return compressed + len(compressor.flush()), sampled


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
