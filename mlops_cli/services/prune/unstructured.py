"""Unstructured and Ln-structured pruning (torch.nn.utils.prune): zeros written into dense tensors.

Pruning is always made permanent (`prune.remove`): no `weight_orig`/`weight_mask` pairs (which double the
file) reach the output.
"""

from __future__ import annotations

from typing import Any

from mlops_cli.core.errors import UsageError
from mlops_cli.services.prune.report import LayerChange


def apply_pruning(module: Any, targets: list[str], method: str, amount: float, n: float = 2.0,
                  dim: int | None = None, seed: int = 0) -> None:
    """Prune the `weight` of each target in place, then make it permanent (no weight_orig/weight_mask left)."""
    import torch
    import torch.nn.utils.prune as prune

    modules = dict(module.named_modules())
    selected = [modules[name] for name in targets]
    if method == "ln-structured":
        for name, child in zip(targets, selected, strict=True):
            if not -child.weight.dim() <= (dim or 0) < child.weight.dim():
                raise UsageError(f"--dim {dim} does not exist in {name}.weight, which has {child.weight.dim()} "
                                 "dimension(s)", hint="--dim 0 prunes output channels/rows, 1 input ones.")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if method == "global":
            prune.global_unstructured([(m, "weight") for m in selected], pruning_method=prune.L1Unstructured,
                                      amount=amount)
        for child in selected:
            if method == "l1":
                prune.l1_unstructured(child, "weight", amount=amount)
            elif method == "random":
                prune.random_unstructured(child, "weight", amount=amount)
            elif method == "ln-structured":
                prune.ln_structured(child, "weight", amount=amount, n=n, dim=dim or 0)
            prune.remove(child, "weight")


def count_zeros(module: Any, names: list[str]) -> list[LayerChange]:
    modules = dict(module.named_modules())
    changes = []
    for name in names:
        weight = modules[name].weight.detach()
        changes.append(LayerChange(f"{name}.weight", type(modules[name]).__name__, tuple(weight.shape),
                                   int((weight == 0).sum()), weight.numel()))
    return changes


def unique_parameters(module: Any) -> list[Any]:
    """Floating-point parameters, each shared (tied) tensor once."""
    seen: set[int] = set()
    result = []
    for parameter in module.parameters():
        if parameter.is_floating_point() and id(parameter) not in seen:
            seen.add(id(parameter))
            result.append(parameter)
    return result


def parameter_counts(module: Any) -> tuple[int, int]:
    """(parameters, of which exactly zero) over unique floating-point parameters."""
    parameters = unique_parameters(module)
    return sum(p.numel() for p in parameters), sum(int((p.detach() == 0).sum()) for p in parameters)
