"""The on-disk format of a structurally pruned (shrunk) model: a weights folder whose mlops.json names
`REBUILD_ARCH` with the base architecture and every tensor shape and size attribute that differs from it.

`rebuild` is that factory: it builds the base architecture, then gives it the pruned shapes; the loader fills
in the weights afterwards, strictly. Only mlops' built-in architectures are built without `trust_code`, so a
shrunk model's mlops.json cannot be used to run arbitrary code.
"""

from __future__ import annotations

from typing import Any

from mlops_cli.core.errors import UnsafeInputError

REBUILD_ARCH = "mlops_cli.core.pruned:rebuild"


def rebuild(arch: str, arch_kwargs: dict[str, Any] | None = None, shapes: dict[str, list[int]] | None = None,
            attributes: dict[str, dict[str, Any]] | None = None, trust_code: bool = False) -> Any:
    """Factory named in the mlops.json of a shrunk model: build `arch`, then give it the pruned shapes.

    The loader fills in the weights afterwards (strictly). Only mlops' own architectures are built without
    `trust_code`, so a shrunk model's mlops.json cannot be used to run arbitrary code.
    """
    import torch

    from mlops_cli.core.loading import build_architecture
    from mlops_cli.core.zoo import ARCH_PATHS

    if arch not in ARCH_PATHS.values() and not trust_code:
        raise UnsafeInputError(f"this pruned model is built on {arch}, which would run code from outside mlops",
                               hint=f"If you trust it, load it with --arch {REBUILD_ARCH} and --arch-kwargs holding "
                                    "the arch_kwargs of its mlops.json plus \"trust_code\": true.")
    module = build_architecture(arch, dict(arch_kwargs or {}))
    for name, values in (attributes or {}).items():
        child = module.get_submodule(name)
        for attr, value in values.items():
            setattr(child, attr, tuple(value) if isinstance(value, list) else value)
    for name, shape in (shapes or {}).items():
        owner_name, _, tensor_name = name.rpartition(".")
        owner = module.get_submodule(owner_name)
        current = getattr(owner, tensor_name)
        resized = torch.empty(shape, dtype=current.dtype)
        if isinstance(current, torch.nn.Parameter):
            setattr(owner, tensor_name, torch.nn.Parameter(resized, requires_grad=current.requires_grad))
        else:
            owner.register_buffer(tensor_name, resized)
    return module
