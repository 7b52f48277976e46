"""The on-disk format of dynamically quantised (int8) torch models, written by `mlops compress int8`.

A quantised state_dict is a torch zip (safetensors cannot hold quantised tensors) whose quantised layers carry
`<layer>._packed_params._packed_params` entries. An HF folder keeps its float config and records the method in
`quantization.json` beside `model.int8.pt`. `load_int8_state` (the reader) rebuilds the model from the float
architecture; `quantize_torch` applies a layout, which is also how a written state is reloaded.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

from mlops_cli.core.errors import InputError

PACKED = "._packed_params"  # marks the layers of a dynamically quantised state_dict
INT8_WEIGHTS = "model.int8.pt"
QUANTIZATION_INFO = "quantization.json"  # beside the weights of an HF folder whose weights are dynamic-int8


@dataclass(frozen=True)
class Int8Layout:
    """Which modules are quantised (name -> 'linear' | 'embedding'), which Conv1D become Linear first."""

    modules: dict[str, str]
    conv1d: tuple[str, ...]
    per_channel: bool


def quantizable_kind(sub: Any) -> str | None:
    """'linear' (nn.Linear, and GPT-2's Conv1D, a transposed Linear), 'embedding', or None."""
    import torch.nn as nn

    if isinstance(sub, nn.Linear) or (type(sub).__name__ == "Conv1D" and getattr(sub, "weight", None) is not None
                                      and sub.weight.dim() == 2):
        return "linear"
    if isinstance(sub, nn.Embedding):
        return "embedding"
    return None


def quantize_torch(module: Any, plan: Int8Layout) -> Any:
    """Apply a plan in place (Conv1D -> Linear swaps, then dynamic quantisation) and return the module."""
    import torch
    from torch.ao.quantization import (
        default_dynamic_qconfig,
        float_qparams_weight_only_qconfig,
        per_channel_dynamic_qconfig,
        quantize_dynamic,
    )

    for name in plan.conv1d:
        _swap_conv1d(module, name)
    linear = per_channel_dynamic_qconfig if plan.per_channel else default_dynamic_qconfig
    spec = {name: (float_qparams_weight_only_qconfig if kind == "embedding" else linear)
            for name, kind in plan.modules.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the deprecation notices of torch.ao (reported once, in the notes)
        return quantize_dynamic(module, spec, dtype=torch.qint8, inplace=True)


def _swap_conv1d(module: Any, name: str) -> None:
    """transformers' Conv1D is a Linear with a transposed weight; make it the Linear torch can quantise."""
    import torch
    import torch.nn as nn

    parent_name, _, child = name.rpartition(".")
    parent = module.get_submodule(parent_name) if parent_name else module
    conv = getattr(parent, child)
    linear = nn.Linear(conv.weight.shape[0], conv.weight.shape[1], bias=conv.bias is not None)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.t())
        if conv.bias is not None:
            linear.bias.copy_(conv.bias)
    setattr(parent, child, linear)


def load_int8_state(module: Any, state: dict[str, Any]) -> Any:
    """Rebuild a quantised model from its saved state_dict: `module` is the float architecture.

    The state tells which layers are quantised (their `_packed_params` entries) and how (per-channel or
    not); GPT-2 Conv1D layers are turned into Linear first, as when they were quantised.
    """
    names = sorted({key.split(PACKED)[0] for key in state if PACKED in key})
    modules: dict[str, str] = {}
    conv1d: list[str] = []
    per_channel = False
    for name in names:
        try:
            sub = module.get_submodule(name)
        except AttributeError as exc:
            raise InputError(f"the int8 state names a layer the architecture lacks: {name}",
                             hint="Build the same architecture the model was quantised from.") from exc
        kind = quantizable_kind(sub)
        if kind is None:
            raise InputError(f"the int8 state quantises {name}, a {type(sub).__name__}, which mlops cannot rebuild")
        modules[name] = kind
        if type(sub).__name__ == "Conv1D":
            conv1d.append(name)
        packed = state.get(f"{name}{PACKED}{PACKED}")
        if kind == "linear" and isinstance(packed, tuple) and packed and packed[0].qscheme() != _per_tensor():
            per_channel = True
    quantized = quantize_torch(module, Int8Layout(modules, tuple(conv1d), per_channel))
    quantized.load_state_dict(state, strict=True)
    return quantized.eval()


def _per_tensor() -> Any:
    import torch

    return torch.per_tensor_affine
