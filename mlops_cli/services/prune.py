"""`mlops prune`: magnitude/random pruning with honest figures, and real structural shrinking.

Unstructured pruning (torch.nn.utils.prune) only writes zeros into dense tensors: the file keeps its
size and dense kernels their speed; the saving shows once the file is compressed (or with sparse
kernels). So every run reports sparsity, raw and gzip sizes, the drift against the unpruned model (the
parity engine) and latency before/after, measured, never assumed. `structured_shrink` removes whole
channels (Torch-Pruning's dependency graph for plain modules, whole feed-forward neurons for Hugging
Face transformers) so parameters, MACs and the file really shrink; the result loads back through mlops.

Pruning is always made permanent (`prune.remove`) before saving: no `weight_orig`/`weight_mask` pairs
(which double the file) reach the output, which is the same kind of artefact as the input.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import shutil
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlops_cli.core.errors import InputError, UsageError
from mlops_cli.core.formats import Format, read_safetensors_header
from mlops_cli.core.loading import (
    LoadedModel,
    LoadOptions,
    ModelKind,
    load_model,
)
from mlops_cli.core.parity import ParityReport, Tolerances
from mlops_cli.core.pruned import REBUILD_ARCH
from mlops_cli.core.sidecar import SIDECAR, read_sidecar, write_sidecar
from mlops_cli.core.timing import Timing

METHODS = ("l1", "random", "ln-structured", "global")
GZIP_LEVEL = 6  # what `gzip` uses by default
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf", ".pt2")
UNSTRUCTURED_NOTE = ("Unstructured pruning writes zeros into dense tensors: the raw file keeps its size and dense "
                     "kernels do not get faster. The saving shows in the compressed size (or with sparse kernels); "
                     "use --structured-shrink to remove whole channels instead.")
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


# ---------------------------------------------------------------- options and reports


@dataclass(frozen=True)
class PruneOptions:
    """What to prune and how, and how to check the result."""

    method: str = "l1"
    amounts: tuple[float, ...] = (0.3,)
    n: float = 2.0  # norm order of ln-structured (and of channel importance when shrinking)
    dim: int | None = None  # ln-structured: weight dimension whose slices are removed (0 = output channels)
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    structured_shrink: bool = False
    seed: int = 0
    device: str = "cpu"
    inputs: tuple[str, ...] = ()  # --input specs
    tolerances: Tolerances | None = None  # enforce element-wise parity (exit 6) when given
    max_drift: float | None = None  # enforce: worst max |diff| over all outputs
    min_top1: float | None = None  # enforce: worst top-1 agreement over logits-like outputs
    repeats: int = 20
    warmup: int = 3

    @property
    def enforced(self) -> bool:
        return self.tolerances is not None or self.max_drift is not None or self.min_top1 is not None


@dataclass(frozen=True)
class LayerChange:
    """One pruned tensor: its zeros after pruning, or its shape before/after a structural shrink."""

    name: str
    module_type: str
    shape: tuple[int, ...]
    zeros: int
    elements: int
    shape_before: tuple[int, ...] | None = None

    sparsity: float = dataclasses.field(init=False)  # a field, not a property, so --json carries it

    def __post_init__(self) -> None:
        object.__setattr__(self, "sparsity", self.zeros / self.elements if self.elements else 0.0)


@dataclass(frozen=True)
class SizeFigures:
    """Weight bytes as stored (raw) and after gzip -6: zeros only pay off in the second figure."""

    raw_bytes: int
    gzip_bytes: int

    gzip_ratio: float = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "gzip_ratio", self.gzip_bytes / self.raw_bytes if self.raw_bytes else 1.0)


@dataclass(frozen=True)
class Drift:
    """Worst figures over every output and input set of the parity run (pruning is expected to drift)."""

    max_abs: float | None
    mean_abs: float | None
    cosine: float | None
    top1_agreement: float | None
    error: str | None = None


@dataclass(frozen=True)
class LatencyFigures:
    """Before/after latency, timed A/B interleaved on the default input shape."""

    input_set: str
    before: Timing
    after: Timing

    speedup: float | None = dataclasses.field(init=False)  # before p50 / after p50

    def __post_init__(self) -> None:
        speedup = self.before.median_ms / self.after.median_ms if self.after.median_ms else None
        object.__setattr__(self, "speedup", speedup)


@dataclass(frozen=True)
class AmountResult:
    """Everything measured for one pruning amount."""

    amount: float
    layers: tuple[LayerChange, ...]
    target_zeros: int
    target_elements: int
    model_zeros: int
    parameters: int
    size: SizeFigures
    drift: Drift
    parity: ParityReport
    latency: LatencyFigures | None
    macs: int | None
    passed: bool
    failure: str | None = None
    output: str | None = None
    output_files: dict[str, int] = dataclasses.field(default_factory=dict)
    reloaded: str | None = None  # what loading the output back showed

    target_sparsity: float = dataclasses.field(init=False)  # zeros (or removed share) of the pruned tensors
    model_sparsity: float = dataclasses.field(init=False)  # zeros over all parameters

    def __post_init__(self) -> None:
        targets = self.target_zeros / self.target_elements if self.target_elements else 0.0
        object.__setattr__(self, "target_sparsity", targets)
        object.__setattr__(self, "model_sparsity", self.model_zeros / self.parameters if self.parameters else 0.0)


@dataclass(frozen=True)
class PruneReport:
    model: str
    model_kind: str
    method: str
    n: float
    dim: int | None
    structured_shrink: bool
    seed: int
    device: str
    targets: tuple[str, ...]
    skipped: tuple[tuple[str, str], ...]  # (module, why it is left alone)
    parameters_before: int
    model_zeros_before: int
    size_before: SizeFigures
    macs_before: int | None
    results: tuple[AmountResult, ...]
    enforced: bool
    thresholds: dict[str, float]
    passed: bool
    verdict: str
    notes: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()  # from loading the model (e.g. a tokenizer that failed): hints on stderr

    @property
    def is_sweep(self) -> bool:
        return len(self.results) > 1


# ---------------------------------------------------------------- entry point


def prune_model(reference: str, load: LoadOptions, options: PruneOptions, output: Path | None = None,
                force: bool = False) -> PruneReport:
    """Load MODEL, prune it at each amount, measure, and write each result like the input (when `output`)."""
    from mlops_cli.core.io import check_output
    from mlops_cli.core.runtimes import resolve_device

    validate_options(options)
    device = resolve_device(options.device)
    outputs = output_paths(reference, output, options)
    sources = [] if reference.startswith("builtin:") else [Path(reference)]
    for path in outputs.values():  # fail fast, before loading anything
        check_output(path, force, sources)
    loaded = load_model(reference, load)
    loaded.reference = reference  # a weights folder loads as its weights file; the output mirrors the folder
    check_prunable(loaded)
    pruner = _Pruner(loaded, load, options, device, force)
    return pruner.run(outputs)


def validate_options(options: PruneOptions) -> None:
    if options.method not in METHODS:
        raise UsageError(f"unknown --method {options.method!r}", hint=f"Choose one of: {', '.join(METHODS)}.")
    if not options.amounts:
        raise UsageError("--amount needs at least one value", hint="Example: --amount 0.3 or --amount 0.1,0.3,0.5")
    for amount in options.amounts:
        if not 0.0 <= amount <= 1.0 or math.isnan(amount):
            raise UsageError(f"--amount {amount:g} is not a fraction between 0 and 1",
                             hint="Give the share of weights to remove, e.g. --amount 0.3 for 30%.")
        if options.structured_shrink and amount >= 1.0:
            raise UsageError("--structured-shrink cannot remove every channel (--amount 1)",
                             hint="Use an amount below 1.")
    if len(set(options.amounts)) != len(options.amounts):
        raise UsageError("--amount lists a value twice")
    if not options.n > 0:
        raise UsageError(f"--n {options.n:g}: the norm order must be positive (1, 2, inf)")
    if options.dim is not None and (options.method != "ln-structured" or options.structured_shrink):
        raise UsageError("--dim applies to --method ln-structured without --structured-shrink",
                         hint="Structural shrink always removes output channels; drop --dim.")
    for pattern in (*options.include, *options.exclude):
        try:
            re.compile(pattern)
        except re.error as exc:
            raise UsageError(f"--include/--exclude {pattern!r} is not a valid regular expression: {exc}") from exc
    if options.repeats < 1 or options.warmup < 0:
        raise UsageError("--repeats must be at least 1 and --warmup at least 0")
    if options.max_drift is not None and not options.max_drift >= 0:  # NaN fails too
        raise UsageError(f"--max-drift {options.max_drift:g} must be 0 or more (a max |diff| bound)",
                         hint="Example: --max-drift 0.05")
    if options.min_top1 is not None and not 0.0 <= options.min_top1 <= 1.0:
        raise UsageError(f"--min-top1 {options.min_top1:g} is not a fraction between 0 and 1",
                         hint="Example: --min-top1 0.99 (99% of the top-1 predictions unchanged)")


def check_prunable(loaded: LoadedModel) -> None:
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


def input_paths(loaded: LoadedModel) -> list[Path]:
    paths = [Path(loaded.reference)] if not loaded.reference.startswith("builtin:") else []
    if loaded.path is not None:
        paths.append(loaded.path)
    return paths


def output_kind(loaded: LoadedModel, options: PruneOptions) -> str:
    """'hf-folder', 'weights-folder', 'safetensors' or 'torch': the artefact kind written for this input."""
    if loaded.kind == ModelKind.HF:
        return "hf-folder"
    from_folder = loaded.reference.startswith("builtin:") or Path(loaded.reference).is_dir()
    if from_folder or options.structured_shrink:
        return "weights-folder"  # a shrunk module has new shapes: it needs mlops.json to be rebuilt
    return "safetensors" if loaded.format == Format.SAFETENSORS else "torch"


def output_paths(reference: str, output: Path | None, options: PruneOptions) -> dict[float, Path]:
    """One output per amount: OUT itself, or OUT with `-<amount>` before its suffix for a sweep."""
    if output is None:
        return {}
    if len(options.amounts) == 1:
        return {options.amounts[0]: output}
    from mlops_cli.core.formats import WEIGHT_FORMATS, detect_format

    writes_file = not reference.startswith("builtin:") and not options.structured_shrink \
        and detect_format(reference) in WEIGHT_FORMATS
    suffix = output.suffix if writes_file else ""
    stem = output.name[: len(output.name) - len(suffix)] if suffix else output.name
    return {amount: output.with_name(f"{stem}-{amount:g}{suffix}") for amount in options.amounts}


# ---------------------------------------------------------------- target selection


def is_prunable_module(module: Any) -> bool:
    """Linear, ConvNd and transformers' Conv1D (GPT-2): what pruning targets by default."""
    import torch.nn as nn

    return isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) or type(module).__name__ == "Conv1D"


def _has_weight(module: Any) -> bool:
    import torch

    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.nn.Parameter) and weight.is_floating_point() and weight.numel() > 0


def head_modules(loaded: LoadedModel, module: Any, example: dict[str, Any]) -> set[str]:
    """The classifier/LM head: left alone by default (its few weights decide every prediction).

    Hugging Face: every module outside the base model, plus the output embeddings. Plain modules: the
    last Linear/Conv layer that runs in a forward pass.
    """
    names = {id(m): n for n, m in module.named_modules()}
    if loaded.kind == ModelKind.HF:
        prefix = getattr(module, "base_model_prefix", "")
        heads = {n for n, m in module.named_modules()
                 if _has_weight(m) and prefix and n != prefix and not n.startswith(prefix + ".")}
        output_embeddings = module.get_output_embeddings() if hasattr(module, "get_output_embeddings") else None
        if output_embeddings is not None and id(output_embeddings) in names:
            heads.add(names[id(output_embeddings)])
        return heads
    return {name for name in [_last_executed(module, example)] if name}


def _last_executed(module: Any, example: dict[str, Any]) -> str | None:
    import torch

    from mlops_cli.core.flops import call_module, to_tensors

    order: list[str] = []
    handles = [m.register_forward_hook(lambda _m, _i, _o, name=n: order.append(name))
               for n, m in module.named_modules() if is_prunable_module(m)]
    try:
        with torch.no_grad():
            call_module(module, to_tensors(example, _device_of(module)))
    finally:
        for handle in handles:
            handle.remove()
    return order[-1] if order else None


def select_targets(module: Any, heads: set[str], include: Iterable[str],
                   exclude: Iterable[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """(names of modules to prune, [(name, why skipped)]) for modules that carry a weight."""
    include, exclude = list(include), list(exclude)
    targets: list[str] = []
    skipped: list[tuple[str, str]] = []
    for name, child in module.named_modules():
        if not name or not _has_weight(child):
            continue
        if any(re.search(pattern, name) for pattern in exclude):
            skipped.append((name, "matches --exclude"))
        elif include:
            if any(re.search(pattern, name) for pattern in include):
                targets.append(name)
        elif name in heads:
            skipped.append((name, "the classifier/LM head (name it with --include to prune it)"))
        elif is_prunable_module(child):
            targets.append(name)
        else:
            skipped.append((name, "embeddings and norms (pruned only when named with --include)"))
    if not targets:
        raise UsageError("no layer to prune: nothing matches the selection",
                         hint="Check --include/--exclude against the module names (`mlops summarize` lists them).")
    return targets, skipped


# ---------------------------------------------------------------- unstructured / Ln-structured pruning


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


# ---------------------------------------------------------------- structural shrink


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

    from mlops_cli.core.flops import call_module, to_tensors

    selected = set(targets)
    ignored = [m for name, m in module.named_modules() if is_prunable_module(m) and name not in selected]
    importance: Any
    if options.method == "random":
        importance = tp.importance.RandomImportance()
    else:
        p = 1 if options.method in ("l1", "global") else options.n
        importance = tp.importance.GroupMagnitudeImportance(p=p)
    tensors = to_tensors(example, _device_of(module))
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


# ---------------------------------------------------------------- sizes


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


def _device_of(module: Any) -> Any:
    from mlops_cli.core.flops import module_device

    return module_device(module)


# ---------------------------------------------------------------- the run


class _Pruner:
    """One prune run: the reference model, its inputs and baseline figures, then one result per amount."""

    def __init__(self, loaded: LoadedModel, load: LoadOptions, options: PruneOptions, device: str, force: bool):
        from mlops_cli.core.inputs import example_inputs, model_shape_sets

        self.loaded, self.load, self.options, self.device, self.force = loaded, load, options, device, force
        self.input_sets = model_shape_sets(loaded, list(options.inputs) or None, seed=options.seed)
        self.example = example_inputs(loaded, list(options.inputs) or None, seed=options.seed)
        self.dtypes = file_dtypes(loaded, load)
        self.notes: list[str] = []

    def run(self, outputs: dict[float, Path]) -> PruneReport:
        from mlops_cli.core.runtimes import runner_for

        module = self.loaded.module
        self.reference = runner_for(self.loaded, self.device)  # moves the module to the device
        heads = head_modules(self.loaded, module, self.example.tensors)
        targets, skipped = select_targets(module, heads, self.options.include, self.options.exclude)
        self.targets = targets
        parameters, zeros = parameter_counts(module)
        size_before = weight_sizes(state_for_saving(module, self.dtypes))
        macs_before = self._macs(module) if self.options.structured_shrink else None
        results = [self._one_amount(amount, outputs.get(amount)) for amount in self.options.amounts]
        self._add_notes(targets, results)
        passed = all(r.passed for r in results)
        return PruneReport(
            model=self.loaded.reference, model_kind=output_kind(self.loaded, self.options),
            method=self.options.method, n=self.options.n, dim=self._dim(),
            structured_shrink=self.options.structured_shrink, seed=self.options.seed, device=self.device,
            targets=tuple(targets), skipped=tuple(skipped), parameters_before=parameters, model_zeros_before=zeros,
            size_before=size_before, macs_before=macs_before, results=tuple(results),
            enforced=self.options.enforced, thresholds=self._thresholds(), passed=passed,
            verdict=self._verdict(results, passed), notes=tuple(self.notes), warnings=tuple(self.loaded.warnings))

    def _dim(self) -> int | None:
        if self.options.method == "ln-structured" and not self.options.structured_shrink:
            return self.options.dim or 0
        return None

    def _one_amount(self, amount: float, output: Path | None) -> AmountResult:
        from mlops_cli.core.parity import check_parity
        from mlops_cli.core.runtimes import runner_for

        candidate, layers = self._pruned_copy(amount)
        pruned = dataclasses.replace(self.loaded, module=candidate, reference=f"pruned {amount:g}", warnings=[])
        cand_runner = runner_for(pruned, self.device)
        parity = check_parity(self.reference, cand_runner, self.input_sets, self.options.tolerances or Tolerances(),
                              time_runs=False)
        broken = next((s.error for s in parity.shapes if (s.error or "").startswith("candidate failed")), None)
        if broken:
            raise InputError(f"the pruned model no longer runs: {broken}",
                             hint="Its forward probably hard-codes a layer size; --exclude the layers around it.")
        drift = summarize_drift(parity)
        failure = self._failure(parity, drift)
        parameters, zeros = parameter_counts(candidate)
        state = state_for_saving(candidate, self.dtypes)
        written: dict[str, int] = {}
        reloaded = None
        if output is not None:
            written = self._save(candidate, state, output, amount)
            reloaded = self._reload_check(output, cand_runner)
        return AmountResult(
            amount=amount, layers=tuple(layers),
            target_zeros=sum(layer.zeros for layer in layers), target_elements=sum(layer.elements for layer in layers),
            model_zeros=zeros, parameters=parameters, size=weight_sizes(state), drift=drift, parity=parity,
            latency=self._latency(cand_runner), macs=self._macs(candidate) if self.options.structured_shrink else None,
            passed=failure is None, failure=failure, output=str(output) if output else None, output_files=written,
            reloaded=reloaded)

    def _pruned_copy(self, amount: float) -> tuple[Any, list[LayerChange]]:
        """A pruned (or shrunk) copy of the model, and what changed in it; the original stays the reference."""
        candidate = copy.deepcopy(self.loaded.module)
        if self.options.structured_shrink:
            layers = shrink_module(self.loaded, candidate, self.targets, self.example.tensors, self.options, amount)
        else:
            apply_pruning(candidate, self.targets, self.options.method, amount, self.options.n, self._dim(),
                          self.options.seed)
            layers = count_zeros(candidate, self.targets)
        return candidate.eval(), layers

    def _latency(self, candidate: Any) -> LatencyFigures:
        from mlops_cli.core.timing import measure_interleaved

        feed = self.example.tensors
        timings = measure_interleaved({"before": lambda: self.reference(feed), "after": lambda: candidate(feed)},
                                      warmup=self.options.warmup, repeats=self.options.repeats, device=self.device)
        return LatencyFigures(self.example.label, timings["before"], timings["after"])

    def _macs(self, module: Any) -> int:
        from mlops_cli.core.flops import count_macs

        return count_macs(module, self.example.tensors, by_module=False).macs

    def _failure(self, parity: ParityReport, drift: Drift) -> str | None:
        """Why this amount fails the user's thresholds (None when no threshold is given or all hold)."""
        options = self.options
        if drift.error:
            return drift.error
        if options.tolerances is not None and not parity.passed:
            return parity.verdict
        if options.max_drift is not None and (drift.max_abs is None or drift.max_abs > options.max_drift):
            return f"max |diff| {drift.max_abs:.3g} exceeds --max-drift {options.max_drift:g}"
        if options.min_top1 is not None:
            if drift.top1_agreement is None:
                return "--min-top1: no output has classes to compare (no logits-like output)"
            if drift.top1_agreement < options.min_top1:
                return f"top-1 agreement {drift.top1_agreement:.1%} is below --min-top1 {options.min_top1:.1%}"
        return None

    def _thresholds(self) -> dict[str, float]:
        options = self.options
        result: dict[str, float] = {}
        if options.tolerances is not None:
            result.update(atol=options.tolerances.atol, rtol=options.tolerances.rtol)
        if options.max_drift is not None:
            result["max_drift"] = options.max_drift
        if options.min_top1 is not None:
            result["min_top1"] = options.min_top1
        return result

    def _verdict(self, results: list[AmountResult], passed: bool) -> str:
        if not self.options.enforced:
            worst = max(results, key=lambda r: r.drift.max_abs or 0.0)
            return (f"drift reported, not checked (no threshold given): worst max |diff| "
                    f"{_fmt(worst.drift.max_abs)} at amount {worst.amount:g}")
        if passed:
            limits = ", ".join(f"{name} {value:g}" for name, value in self._thresholds().items())
            return f"every amount within the thresholds ({limits})"
        failing = [r for r in results if not r.passed]
        return "; ".join(f"amount {r.amount:g}: {r.failure}" for r in failing)

    def _add_notes(self, targets: list[str], results: list[AmountResult]) -> None:
        if not self.options.structured_shrink:
            self.notes.append(UNSTRUCTURED_NOTE)
        elif self.loaded.kind == ModelKind.HF:
            self.notes.append("Hugging Face models: feed-forward neurons are removed (config intermediate size "
                              "updated); attention heads are kept, as transformers 5 configs cannot describe pruned "
                              "heads.")
        if self.loaded.checkpoint_extras and any(r.output for r in results):
            if self.options.structured_shrink:
                self.notes.append(f"training-checkpoint entries ({', '.join(self.loaded.checkpoint_extras)}) were "
                                  "dropped: their optimizer state does not fit the new shapes")
            else:
                self.notes.append(f"training-checkpoint entries ({', '.join(self.loaded.checkpoint_extras)}) were "
                                  "kept as they were; optimizer state still refers to the unpruned weights")
        if self.load.strip_prefix and any(r.output for r in results):
            self.notes.append(f"weights were written without the prefix {self.load.strip_prefix!r}")
        timings = [t for r in results if r.latency for t in (r.latency.before, r.latency.after)]
        if any(t.p90_ms > 1.5 * t.median_ms for t in timings):
            self.notes.append("latency was noisy (p90 over 1.5x p50 in some runs): treat small speed-ups or "
                              "slow-downs as noise, or rerun with more --repeats on an idle machine")
        foreign = self.options.structured_shrink and self.loaded.kind == ModelKind.MODULE \
            and not str(self.loaded.arch).startswith("mlops_cli.")
        written = next((r.output for r in results if r.output), None)
        if foreign and written:
            self.notes.append(
                f"{written} is built on your architecture {self.loaded.arch}, which mlops never imports unasked: "
                f"load it with --arch {REBUILD_ARCH} --arch-kwargs "
                f"\"$(jq -c '.arch_kwargs + {{trust_code: true}}' {written}/mlops.json)\"")
        tied = _tied_targets(self.loaded.module, targets)
        if tied:
            self.notes.append(f"tied weights pruned together: {', '.join(tied)}")

    # ------------------------------------------------------------ writing

    def _save(self, module: Any, state: dict[str, Any], output: Path, amount: float) -> dict[str, int]:
        from mlops_cli.core.io import atomic_dir, save_safetensors, save_torch

        kind = output_kind(self.loaded, self.options)
        info = {"method": self.options.method, "amount": amount, "seed": self.options.seed,
                "structured_shrink": self.options.structured_shrink}
        if kind == "safetensors":
            save_safetensors(state, output, self._safetensors_metadata(), self.force, input_paths(self.loaded))
            return {output.name: output.stat().st_size}
        if kind == "torch":
            content = {self.loaded.state_key: state, **self.loaded.checkpoint_extras} if self.loaded.state_key \
                else state
            save_torch(content, output, self.force, input_paths(self.loaded))
            return {output.name: output.stat().st_size}
        with atomic_dir(output, self.force, input_paths(self.loaded)) as folder:
            if kind == "hf-folder":
                self._write_hf_folder(module, folder)
            else:
                self._write_weights_folder(module, state, folder, info)
            return {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}

    def _safetensors_metadata(self) -> dict[str, str]:
        """The input's metadata, unchanged: safetensors writes metadata keys in hash order, so adding a key
        would make the bytes differ from run to run (what was pruned is recorded by the report instead)."""
        if self.loaded.path is not None and self.loaded.format == Format.SAFETENSORS:
            _, metadata = read_safetensors_header(self.loaded.path)
            if metadata:
                return metadata
        return {"format": "pt"}

    def _write_hf_folder(self, module: Any, folder: Path) -> None:
        """Tokenizer and other files copied from the input; config and weights written by save_pretrained."""
        source = self.loaded.path
        if source is not None and source.is_dir():
            for item in sorted(source.iterdir()):
                if item.is_file() and item.name != "config.json" and not item.name.endswith(WEIGHT_SUFFIXES) \
                        and not item.name.endswith(".index.json"):
                    shutil.copy2(item, folder / item.name)
        elif self.loaded.tokenizer is not None:
            self.loaded.tokenizer.save_pretrained(folder)
        module.save_pretrained(folder)

    def _write_weights_folder(self, module: Any, state: dict[str, Any], folder: Path, info: dict[str, Any]) -> None:
        from mlops_cli.core import zoo
        from mlops_cli.core.io import save_torch
        source = Path(self.loaded.reference)
        sidecar: dict[str, Any] = read_sidecar(source) if source.is_dir() else {}
        if source.is_dir():
            for item in sorted(source.iterdir()):
                if item.is_file() and item.name != SIDECAR and not item.name.endswith(WEIGHT_SUFFIXES):
                    shutil.copy2(item, folder / item.name)
        name = self.loaded.reference.removeprefix("builtin:")
        arch = self.loaded.arch or zoo.ARCH_PATHS.get(name, "")
        weights = str(sidecar.get("weights", "model.safetensors"))
        if self.options.structured_shrink:
            weights = "model.safetensors"
            sidecar.update(arch=REBUILD_ARCH, arch_kwargs=self._rebuild_kwargs(module, arch))
        else:
            sidecar.update(arch=arch, arch_kwargs=self.loaded.arch_kwargs)
        sidecar.update(weights=weights, inputs=list(self.options.inputs or self.loaded.input_specs), pruned=info)
        if weights.endswith(".safetensors"):
            from safetensors.torch import save_file

            save_file(state, str(folder / weights), metadata={"format": "pt"})  # what was done: in mlops.json
        else:
            save_torch(state, folder / weights)
        write_sidecar(folder, sidecar)

    def _rebuild_kwargs(self, module: Any, arch: str) -> dict[str, Any]:
        """What `rebuild` needs: the base architecture and every shape that differs from it. A model that was
        shrunk before is described against its base architecture, its earlier changes merged with these."""
        base_arch, base_kwargs = arch, self.loaded.arch_kwargs
        shapes: dict[str, Any] = {}
        attributes: dict[str, Any] = {}
        if arch == REBUILD_ARCH:
            base_arch, base_kwargs = self.loaded.arch_kwargs["arch"], self.loaded.arch_kwargs.get("arch_kwargs", {})
            shapes = dict(self.loaded.arch_kwargs.get("shapes") or {})
            attributes = {k: dict(v) for k, v in (self.loaded.arch_kwargs.get("attributes") or {}).items()}
        description = shape_description(module, self.loaded.module)
        shapes.update(description["shapes"])
        for name, changed in description["attributes"].items():
            attributes.setdefault(name, {}).update(changed)
        return {"arch": base_arch, "arch_kwargs": base_kwargs, "shapes": shapes, "attributes": attributes}

    def _reload_check(self, output: Path, candidate: Any) -> str:
        """Load the written artefact back through mlops and compare it with the in-memory result."""
        import numpy as np

        from mlops_cli.core.runtimes import runner_for

        options = LoadOptions(arch=self.loaded.arch, arch_kwargs=self.loaded.arch_kwargs, key=self.loaded.state_key)
        if output.is_dir():
            options = LoadOptions(task=self.load.task, trust_remote_code=self.load.trust_remote_code)
            sidecar = read_sidecar(output)
            if sidecar.get("arch") == REBUILD_ARCH and not str(self.loaded.arch).startswith("mlops_cli."):
                # the user trusted this architecture for this run (--arch); later loads need it said again
                options = LoadOptions(arch=REBUILD_ARCH, arch_kwargs={**sidecar["arch_kwargs"], "trust_code": True})
        reloaded = load_model(str(output), options)
        for name in reloaded.module.state_dict():
            if name.endswith(("_orig", "_mask")):
                raise AssertionError(f"{output} carries pruning re-parametrisation tensor {name}")
        runner = runner_for(reloaded, self.device)
        expected, actual = candidate(self.example.tensors), runner(self.example.tensors)
        worst = max((float(np.abs(actual[k].astype(np.float64) - v.astype(np.float64)).max())
                     for k, v in expected.items() if k in actual and actual[k].shape == v.shape), default=None)
        if worst is None:
            return "loads back, but its outputs could not be matched to the pruned model's"
        if worst == 0.0:
            return "loads back through mlops; outputs identical to the pruned model"
        return f"loads back through mlops; outputs differ from the pruned model by at most {worst:.3g} (dtype)"


def summarize_drift(parity: ParityReport) -> Drift:
    """Worst max |diff| and mean |diff|, lowest cosine and top-1 agreement across the parity run."""
    errors = [shape.error for shape in parity.shapes if shape.error]
    diffs = [d for shape in parity.shapes for d in shape.outputs]
    problems = [d.problem for d in diffs if d.problem]
    if errors or problems or not diffs:
        return Drift(None, None, None, None, error=(errors + problems or ["no outputs to compare"])[0])

    def worst(values: list[float | None], pick: Callable[[list[float]], float]) -> float | None:
        present = [v for v in values if v is not None]
        return pick(present) if present else None

    return Drift(max_abs=worst([d.max_abs for d in diffs], max), mean_abs=worst([d.mean_abs for d in diffs], max),
                 cosine=worst([d.cosine for d in diffs], min),
                 top1_agreement=worst([d.top1_agreement for d in diffs], min))


def _tied_targets(module: Any, targets: list[str]) -> list[str]:
    owners: dict[int, list[str]] = {}
    for name, child in module.named_modules():
        weight = getattr(child, "weight", None)
        if weight is not None and hasattr(weight, "data_ptr"):
            owners.setdefault(id(weight), []).append(name)
    return [" = ".join(names) for names in owners.values() if len(names) > 1 and any(n in targets for n in names)]


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"
