"""Structural shrink: remove whole channels so parameters, MACs and the file really shrink.

Plain modules go through Torch-Pruning's dependency graph (coupled layers follow); Hugging Face transformers
lose whole feed-forward neurons, the same number in every layer (their config holds one width). The shrunk
module is described against its base architecture (`rebuild_kwargs`) so core/pruned.py can recreate it.
"""

from __future__ import annotations

import math
from typing import Any

from mlops_cli.core.errors import InputError, UsageError
from mlops_cli.core.loading import LoadedModel, ModelKind
from mlops_cli.core.pruned import REBUILD_ARCH
from mlops_cli.services.prune.options import PruneOptions
from mlops_cli.services.prune.report import LayerChange
from mlops_cli.services.prune.targets import is_prunable_module

# Hugging Face feed-forward blocks: (up-projection suffixes, down-projection suffix, config field for the width).
FFN_PATTERNS: tuple[tuple[tuple[str, ...], str, str], ...] = (
    (("intermediate.dense",), "output.dense", "intermediate_size"),  # BERT, RoBERTa, DistilBERT-likes
    (("mlp.fc1",), "mlp.fc2", "intermediate_size"),  # ViT (transformers 5)
    (("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj", "intermediate_size"),  # Llama, Mistral, Qwen
    (("mlp.c_fc",), "mlp.c_proj", "n_inner"),  # GPT-2 (transformers Conv1D)
)
# Module attributes that describe tensor sizes; saved with a shrunk model so `rebuild` can recreate it.
SIZE_ATTRIBUTES = ("in_features", "out_features", "in_channels", "out_channels", "groups", "num_features",
                   "normalized_shape", "num_channels", "num_groups", "num_embeddings", "embedding_dim", "nf", "nx")


def shrink_module(loaded: LoadedModel, module: Any, targets: list[str], example: dict[str, Any],
                  options: PruneOptions, amount: float) -> list[LayerChange]:
    """Remove whole channels so tensors really get smaller; returns the tensors whose shape changed."""
    before = {name: tuple(t.shape) for name, t in module.state_dict().items()}
    if loaded.kind == ModelKind.HF:
        shrink_hf_ffn(module, targets, options, amount)
    else:
        shrink_with_torch_pruning(module, targets, example, options, amount)
    changes = []
    for name, tensor in module.state_dict().items():
        if name in before and tuple(tensor.shape) != before[name]:
            elements_before = math.prod(before[name])
            changes.append(LayerChange(name, _owner_type(module, name), tuple(tensor.shape),
                                       elements_before - tensor.numel(), elements_before, before[name]))
    return changes


def _owner_type(module: Any, tensor_name: str) -> str:
    owner = module.get_submodule(tensor_name.rpartition(".")[0]) if "." in tensor_name else module
    return type(owner).__name__


def shrink_with_torch_pruning(module: Any, targets: list[str], example: dict[str, Any], options: PruneOptions,
                              amount: float) -> None:
    """Channel pruning of a plain module with Torch-Pruning's dependency graph (coupled layers follow)."""
    import torch
    import torch_pruning as tp

    from mlops_cli.core.flops import call_module, module_device, to_tensors

    selected = set(targets)
    ignored = [m for name, m in module.named_modules() if is_prunable_module(m) and name not in selected]
    importance: Any
    if options.method == "random":
        importance = tp.importance.RandomImportance()
    else:
        p = 1 if options.method in ("l1", "global") else options.n
        importance = tp.importance.GroupMagnitudeImportance(p=p)
    tensors = to_tensors(example, module_device(module))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(options.seed)
        try:
            pruner = tp.pruner.MetaPruner(
                module, tensors, importance=importance, pruning_ratio=amount, ignored_layers=ignored,
                global_pruning=options.method == "global", forward_fn=call_module,
                output_transform=_first_tensor)
            pruner.step()
        except Exception as exc:  # Torch-Pruning cannot trace or couple some architectures
            raise InputError(f"--structured-shrink: Torch-Pruning could not shrink {type(module).__name__}: "
                             f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}",
                             hint="Leave the layers involved out with --exclude, or prune without "
                                  "--structured-shrink.") from exc


def _first_tensor(output: Any) -> Any:
    import torch

    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict) or hasattr(output, "keys"):
        return next(v for v in output.values() if isinstance(v, torch.Tensor))
    return next(v for v in output if isinstance(v, torch.Tensor))


def find_ffn_blocks(module: Any) -> tuple[str, list[tuple[list[str], str]]]:
    """(config field, [(up-projection names, down-projection name)]) of a Hugging Face transformer."""
    modules = dict(module.named_modules())
    for ups, down, field in FFN_PATTERNS:
        blocks = []
        for name in modules:
            if name.endswith(ups[0]):
                prefix = name[: len(name) - len(ups[0])]
                names = [prefix + up for up in ups]
                if all(n in modules for n in names) and prefix + down in modules:
                    blocks.append((names, prefix + down))
        if blocks:
            return field, blocks
    raise UsageError(f"--structured-shrink does not know the feed-forward layout of {type(module).__name__}",
                     hint="Supported: BERT-like (intermediate/output.dense), ViT (mlp.fc1/fc2), Llama-like "
                          "(gate/up/down_proj) and GPT-2 (mlp.c_fc/c_proj) models.")


def shrink_hf_ffn(module: Any, targets: list[str], options: PruneOptions, amount: float) -> None:
    """Remove the least important feed-forward neurons, the same number in every layer.

    A Hugging Face config holds one width for all layers (`intermediate_size`), so every block keeps the
    same count; attention heads are kept, since transformers 5 configs cannot describe pruned heads.
    """
    import torch

    if options.method == "global":
        raise UsageError("--method global with --structured-shrink would give layers different widths, which a "
                         "Hugging Face config cannot describe", hint="Use l1, ln-structured or random.")
    field, blocks = find_ffn_blocks(module)
    selected = [block for block in blocks if all(name in targets for name in block[0])]
    if len(selected) != len(blocks):
        raise UsageError("--structured-shrink must shrink the feed-forward blocks of every layer alike "
                         f"({len(selected)} of {len(blocks)} selected)",
                         hint="The config holds one intermediate size for all layers; adjust --include/--exclude.")
    modules = dict(module.named_modules())
    width = _ffn_width(modules[blocks[0][0][0]])
    keep = width - round(amount * width)
    generator = torch.Generator().manual_seed(options.seed)
    p = 1 if options.method == "l1" else options.n
    for ups, down in blocks:
        scores = _neuron_scores([modules[u] for u in ups], modules[down], p)
        if options.method == "random":
            scores = torch.rand(scores.shape, generator=generator)
        kept = torch.sort(torch.topk(scores, keep).indices).values
        for up in ups:
            _slice_features(modules[up], kept.to(modules[up].weight.device), output_side=True)
        _slice_features(modules[down], kept.to(modules[down].weight.device), output_side=False)
    setattr(module.config, field, keep)


def _is_conv1d(layer: Any) -> bool:
    return type(layer).__name__ == "Conv1D"  # transformers' Conv1D stores weight as (in, out)


def _ffn_width(layer: Any) -> int:
    return int(layer.weight.shape[1] if _is_conv1d(layer) else layer.weight.shape[0])


def _neuron_scores(ups: list[Any], down: Any, p: float) -> Any:
    """L-p norm of each neuron's weights: its rows in the up-projections and its column in the down one."""
    import torch

    parts = [(u.weight.detach().t() if _is_conv1d(u) else u.weight.detach()) for u in ups]
    parts.append(down.weight.detach() if _is_conv1d(down) else down.weight.detach().t())
    return torch.linalg.vector_norm(torch.cat(parts, dim=1).float(), ord=p, dim=1).cpu()


def _slice_features(layer: Any, kept: Any, output_side: bool) -> None:
    """Keep only `kept` output (or input) features of a Linear/Conv1D layer, updating its size attributes."""
    import torch

    conv1d = _is_conv1d(layer)
    axis = (1 if conv1d else 0) if output_side else (0 if conv1d else 1)
    layer.weight = torch.nn.Parameter(layer.weight.detach().index_select(axis, kept).clone())
    if output_side and layer.bias is not None:
        layer.bias = torch.nn.Parameter(layer.bias.detach().index_select(0, kept).clone())
    size = len(kept)
    if conv1d:
        layer.nf = size if output_side else layer.nf
        layer.nx = size if not output_side else layer.nx
    elif output_side:
        layer.out_features = size
    else:
        layer.in_features = size


def shape_description(module: Any, original: Any) -> dict[str, Any]:
    """What `rebuild` needs to recreate a shrunk module: changed tensor shapes and size attributes."""
    old_shapes = {name: tuple(t.shape) for name, t in original.state_dict().items()}
    shapes = {name: list(t.shape) for name, t in module.state_dict().items() if tuple(t.shape) != old_shapes.get(name)}
    old_modules = dict(original.named_modules())
    attributes: dict[str, dict[str, Any]] = {}
    for name, child in module.named_modules():
        old = old_modules.get(name)
        changed = {attr: _jsonable(getattr(child, attr)) for attr in SIZE_ATTRIBUTES
                   if hasattr(child, attr) and old is not None and getattr(child, attr) != getattr(old, attr)}
        if changed:
            attributes[name] = changed
    return {"shapes": shapes, "attributes": attributes}


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def rebuild_kwargs(loaded: LoadedModel, module: Any, arch: str) -> dict[str, Any]:
    """What `rebuild` needs: the base architecture and every shape that differs from it. A model that was
    shrunk before is described against its base architecture, its earlier changes merged with these."""
    base_arch, base_kwargs = arch, loaded.arch_kwargs
    shapes: dict[str, Any] = {}
    attributes: dict[str, Any] = {}
    if arch == REBUILD_ARCH:
        base_arch, base_kwargs = loaded.arch_kwargs["arch"], loaded.arch_kwargs.get("arch_kwargs", {})
        shapes = dict(loaded.arch_kwargs.get("shapes") or {})
        attributes = {k: dict(v) for k, v in (loaded.arch_kwargs.get("attributes") or {}).items()}
    description = shape_description(module, loaded.module)
    shapes.update(description["shapes"])
    for name, changed in description["attributes"].items():
        attributes.setdefault(name, {}).update(changed)
    return {"arch": base_arch, "arch_kwargs": base_kwargs, "shapes": shapes, "attributes": attributes}
