"""Which modules a run prunes: what can be pruned at all, the head left alone, --include/--exclude."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from mlops_cli.core.errors import InputError, UsageError
from mlops_cli.core.loading import LoadedModel, ModelKind

HEAD_REASON = "the classifier/LM head (name it with --include to prune it)"
OTHER_REASON = "embeddings and norms (pruned only when named with --include)"


def check_prunable(loaded: LoadedModel) -> None:
    """Refuse what pruning cannot work on: graphs without modules, and packed int8 kernels."""
    if loaded.kind not in (ModelKind.HF, ModelKind.MODULE):
        raise InputError(f"{loaded.reference} is a {loaded.kind.value} model: mlops prunes weights of PyTorch modules",
                         hint="Prune the original checkpoint (a Hugging Face folder, or weights + --arch), "
                              "then export the pruned result.")
    quantised = quantised_layers(loaded.module)
    if quantised:
        shown = ", ".join(quantised[:3]) + (f" and {len(quantised) - 3} more" if len(quantised) > 3 else "")
        raise InputError(f"{loaded.reference} is quantised to int8 ({shown}): its weights are packed int8 "
                         "kernels, which pruning cannot mask or shrink",
                         hint="Prune the float checkpoint first, then quantise the result: "
                              "mlops prune FLOAT -o pruned && mlops compress int8 pruned -o pruned-int8")


def quantised_layers(module: Any) -> list[str]:
    """Names of torch.ao quantised layers (`mlops compress int8` output: weights in packed params)."""
    return [name or "(model)" for name, sub in module.named_modules()
            if type(sub).__module__.startswith("torch.ao.nn.quantized") and not name.endswith("._packed_params")]


def is_prunable_module(module: Any) -> bool:
    """Linear, ConvNd and transformers' Conv1D (GPT-2): what pruning targets by default."""
    import torch.nn as nn

    return isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) or type(module).__name__ == "Conv1D"


def has_weight(module: Any) -> bool:
    import torch

    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.nn.Parameter) and weight.is_floating_point() and weight.numel() > 0


def head_modules(loaded: LoadedModel, module: Any, example: dict[str, Any]) -> set[str]:
    """The classifier/LM head: left alone by default (its few weights decide every prediction).

    Hugging Face task models: every module outside the base model, plus the output embeddings; a bare base
    model (BertModel, a sentence-transformers folder) has no head. Plain modules: the last Linear/Conv layer that
    runs in a forward pass.
    """
    if loaded.kind == ModelKind.HF:
        names = {id(m): n for n, m in module.named_modules()}
        prefix = getattr(module, "base_model_prefix", "")
        base = getattr(module, prefix, None) if prefix else None
        heads = set()
        if base is not None and base is not module:  # a task model wraps its base model under `prefix`
            heads = {n for n, m in module.named_modules()
                     if has_weight(m) and n != prefix and not n.startswith(prefix + ".")}
        output_embeddings = module.get_output_embeddings() if hasattr(module, "get_output_embeddings") else None
        if output_embeddings is not None and id(output_embeddings) in names:
            heads.add(names[id(output_embeddings)])
        return heads
    return {name for name in [_last_executed(module, example)] if name}


def _last_executed(module: Any, example: dict[str, Any]) -> str | None:
    import torch

    from mlops_cli.core.flops import call_module, module_device, to_tensors

    order: list[str] = []
    handles = [m.register_forward_hook(lambda _m, _i, _o, name=n: order.append(name))
               for n, m in module.named_modules() if is_prunable_module(m)]
    try:
        with torch.no_grad():
            call_module(module, to_tensors(example, module_device(module)))
    finally:
        for handle in handles:
            handle.remove()
    return order[-1] if order else None


def select_targets(module: Any, heads: set[str], include: Iterable[str],
                   exclude: Iterable[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """(names of modules to prune, [(name, why skipped)]) for modules that carry a weight.

    Layers are chosen by type: Linear/Conv weights. `--include` narrows them by name; it adds the head when it
    matches it, and embeddings or norms only when it names them (`--include encoder` must not prune LayerNorms
    just because they live in the encoder).
    """
    include, exclude = list(include), list(exclude)
    targets: list[str] = []
    skipped: list[tuple[str, str]] = []
    for name, child in module.named_modules():
        if not name or not has_weight(child):
            continue
        matched = any(re.search(pattern, name) for pattern in include)
        if any(re.search(pattern, name) for pattern in exclude):
            skipped.append((name, "matches --exclude"))
        elif include and not matched:
            continue
        elif name in heads and not matched:
            skipped.append((name, HEAD_REASON))
        elif is_prunable_module(child) or names_module(include, name):
            targets.append(name)
        else:
            skipped.append((name, OTHER_REASON))
    if not targets:
        raise UsageError("no layer to prune: nothing matches the selection",
                         hint="Check --include/--exclude against the module names (`mlops summarize` lists them).")
    return targets, skipped


def names_module(patterns: Iterable[str], name: str) -> bool:
    """Whether a pattern is about this module itself, not only about a module it sits in: it matches the last
    part of the name (`LayerNorm`, `word_embeddings`), or the full name but not the parent's."""
    parent, _, last = name.rpartition(".")
    return any(re.search(p, name) and (re.search(p, last) or not re.search(p, parent)) for p in patterns)


def tied_targets(module: Any, targets: list[str]) -> list[str]:
    """'a = b' for every weight shared by several modules of which one is pruned (pruning one prunes all)."""
    owners: dict[int, list[str]] = {}
    for name, child in module.named_modules():
        weight = getattr(child, "weight", None)
        if weight is not None and hasattr(weight, "data_ptr"):
            owners.setdefault(id(weight), []).append(name)
    return [" = ".join(names) for names in owners.values() if len(names) > 1 and any(n in targets for n in names)]
