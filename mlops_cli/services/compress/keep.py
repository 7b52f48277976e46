"""Which floating tensors `compress half` leaves as they are: normalisation layers, and what `--keep-fp32` names.

Normalisation layers are found by module type whenever mlops can build the model (Hugging Face folders, weights
files with `--arch`, mlops weights folders): torch's BatchNorm*, InstanceNorm*, LayerNorm, GroupNorm, RMSNorm,
and any class whose name ends in Norm (transformers' LlamaRMSNorm, T5LayerNorm, torchvision's FrozenBatchNorm2d).
Names can only guess: EfficientNet's `_bn0` and `_blocks.0._bn1` escape every sensible pattern. So the name
patterns are the fallback, for bare weight files and ONNX graphs, and for tensors the built module does not know
(a checkpoint saved under older names). Each kept tensor records which of the two chose it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from mlops_cli.core.errors import UsageError

# Normalisation layers by name (the fallback): BERT/ViT `LayerNorm`/`layernorm_*`, `norm1`, `rms_norm`,
# `batch_norm`, GPT-2 `ln_1`/`ln_f`, torchvision-style `bn1`. Applied to tensor names and ONNX node/initializer names.
DEFAULT_KEEP_FP32 = (r"(?i)norm", r"(^|[./_])ln_(\d+|f)([./]|$)", r"(^|[./])bn\d*([./]|$)")
# A class named like a normalisation layer: LayerNorm, RMSNorm, BatchNorm2d, InstanceNorm1d, T5LayerNorm...
NORM_CLASS_NAME = re.compile(r"Norm(\d[dD])?$")
BY_MODULE_TYPE = "module type"
BY_NAME = "name"
BY_OP_TYPE = "op type"  # ONNX: used only by nodes whose op type stays float32 (normalisations, the converter's list)
NORM_TYPES_TEXT = "BatchNorm*, InstanceNorm*, LayerNorm, GroupNorm, RMSNorm and classes named *Norm"


@dataclass(frozen=True)
class KeepDecision:
    """Why one tensor stays as it is, and what chose it (`module type` or `name`)."""

    reason: str
    by: str


@dataclass(frozen=True)
class KeepRules:
    """`--keep-fp32` patterns, plus the normalisation tensors of the built module (when one could be built)."""

    patterns: tuple[str, ...]  # the default name patterns (when defaults are on), then the user's
    defaults_used: bool
    user_patterns: tuple[str, ...] = ()
    norm_tensors: Mapping[str, str] = field(default_factory=dict)  # tensor name -> its module's class
    module_names: frozenset[str] = frozenset()  # every tensor name of the built module
    strip_prefix: str | None = None  # file names carry this prefix, module names do not

    @classmethod
    def build(cls, user_patterns: Iterable[str] | None, use_defaults: bool, module: Any = None,
              strip_prefix: str | None = None) -> KeepRules:
        user = tuple(user_patterns or ())
        for pattern in user:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise UsageError(f"--keep-fp32 {pattern!r} is not a valid regular expression: {exc}") from exc
        patterns = (DEFAULT_KEEP_FP32 if use_defaults else ()) + user
        if module is None:
            return cls(patterns, use_defaults, user)
        norms = norm_tensors(module) if use_defaults else {}
        names = frozenset(module.state_dict())
        return cls(patterns, use_defaults, user, norms, names, strip_prefix)

    @property
    def by_module_type(self) -> bool:
        """The default keep list comes from module types (a module was built), not from names."""
        return self.defaults_used and bool(self.module_names)

    def match(self, name: str) -> KeepDecision | None:
        """Why this tensor (named as in the file) stays as it is, or None when it is converted."""
        module_name = name.removeprefix(self.strip_prefix) if self.strip_prefix else name
        if module_name in self.norm_tensors:
            return KeepDecision(f"kept: {self.norm_tensors[module_name]} module", BY_MODULE_TYPE)
        pattern = next((p for p in self.user_patterns if re.search(p, name)), None)
        if pattern is not None:
            return KeepDecision(f"kept: matches --keep-fp32 {pattern}", BY_NAME)
        if self.defaults_used and module_name not in self.module_names:
            pattern = next((p for p in DEFAULT_KEEP_FP32 if re.search(p, name)), None)
            if pattern is not None:
                return KeepDecision(f"kept: name matches {pattern}", BY_NAME)
        return None

    def describe(self) -> str:
        """One line: how the kept tensors were chosen."""
        parts = []
        if self.by_module_type:
            parts.append(f"normalisation modules by type ({NORM_TYPES_TEXT}); names "
                         f"({', '.join(DEFAULT_KEEP_FP32)}) only for tensors the module does not have")
        elif self.defaults_used:
            parts.append(f"normalisation layers by name ({', '.join(DEFAULT_KEEP_FP32)}): no model could be "
                         "built to tell module types (pass --arch for a weights file)")
        if self.user_patterns:
            parts.append(f"--keep-fp32 {', '.join(self.user_patterns)}")
        return "; ".join(parts) or "nothing kept (--no-default-keep)"


def is_norm_module(module: Any) -> bool:
    """torch's normalisation layers, and any class named like one (transformers' *RMSNorm, *LayerNorm)."""
    import torch.nn as nn

    torch_norms = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.LocalResponseNorm)
    return isinstance(module, torch_norms) or bool(NORM_CLASS_NAME.search(type(module).__name__))


def norm_tensors(module: Any) -> dict[str, str]:
    """{tensor name: class} for the parameters and buffers that normalisation modules own directly."""
    found: dict[str, str] = {}
    for prefix, sub in module.named_modules():
        if not is_norm_module(sub):
            continue
        owned = [*sub.named_parameters(recurse=False), *sub.named_buffers(recurse=False)]
        for name, _ in owned:
            found[f"{prefix}.{name}" if prefix else name] = type(sub).__name__
    return found
