"""Models built on the meta device: every parameter has its shape and dtype, none has storage.

`mlops estimate` sizes a model before anyone downloads or allocates it: a Hugging Face folder or a lone
`config.json` is read for its config only (weight files are never opened), the model class is built under
`torch.device("meta")`, and what the structure says (parameter counts, tied weights, Linear layers, attention
dimensions) is read off the empty module. A 70B-parameter model builds in well under a second this way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlops_cli.core.contract import LoadOptions, ModelRef
from mlops_cli.core.errors import InputError, UnsafeInputError, UsageError

CONFIG_NAME = "config.json"


@dataclass(frozen=True)
class MetaModel:
    """A model without weights: its module (meta tensors), HF config (None for plain modules), input specs."""

    reference: str
    module: Any
    config: Any = None
    input_specs: tuple[str, ...] = ()  # `--input` style specs known for plain modules
    source: str = ""  # what was read: "config.json", "built-in", "--arch"


@dataclass(frozen=True)
class ParameterCount:
    """Parameter elements of a module. `unique` counts a tied tensor once; `embedding` is the unique elements of
    its nn.Embedding tables (token and position embeddings), so `unique - embedding` is the usual
    "non-embedding parameters" (a tied output head belongs to the embedding)."""

    total: int  # once per name: tied tensors counted twice
    unique: int
    embedding: int
    non_embedding: int
    buffers: int
    tied: tuple[tuple[str, ...], ...]  # names sharing one tensor


@dataclass(frozen=True)
class AttentionDims:
    """What a transformer's config says about its attention (grouped-query heads included)."""

    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    intermediate: int
    vocab: int
    max_positions: int | None


@dataclass(frozen=True)
class Experts:
    """A mixture of experts: how many each MoE layer holds, and how many a token runs (top-k)."""

    count: int
    per_token: int


# ---------------------------------------------------------------- building


def build_meta_model(ref: ModelRef, load: LoadOptions) -> MetaModel:
    """A MODEL reference -> the model on the meta device, reading configs only (never a weight)."""
    import torch

    if ref.builtin is not None:
        from mlops_cli.core import zoo

        entry = zoo.entry(ref.builtin)
        with torch.device("meta"):
            module, _ = zoo.build(ref.builtin, trained=False)  # meta tensors cannot train, nor need to
        return MetaModel(ref.text, module, getattr(module, "config", None) if entry.kind == "hf" else None,
                         entry.inputs, "built-in")
    path = ref.path
    assert path is not None
    if load.arch:
        from mlops_cli.core.loading import build_architecture

        with torch.device("meta"):
            module = build_architecture(load.arch, load.arch_kwargs)
        return MetaModel(ref.text, module.eval(), None, (), "--arch")
    config_file = path / CONFIG_NAME if path.is_dir() else path
    if not config_file.is_file() or config_file.suffix != ".json":
        raise InputError(f"{path}: no {CONFIG_NAME} to build the model from",
                         hint="Give a Hugging Face folder, a config.json file, builtin:NAME, or a weights file "
                              "with --arch.")
    config = read_config(config_file, load.trust_remote_code)
    with torch.device("meta"):
        try:
            module = _instantiate(config, load, config_file)
        except (ValueError, TypeError, AttributeError, KeyError, IndexError) as exc:  # the config does not fit
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise InputError(f"{config_file}: the model cannot be built from this config: {message}",
                             hint="Check config.json (sizes, architectures) or pass --task.") from exc
    return MetaModel(ref.text, module.eval(), config, (), CONFIG_NAME)


def read_config(config_file: Path, trust_remote_code: bool = False) -> Any:
    """A Hugging Face config from its JSON file (the folder's other files are never read)."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig

    try:
        data = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{config_file} is not a readable JSON config: {exc}") from exc
    if not isinstance(data, dict) or "model_type" not in data:
        raise InputError(f"{config_file} has no model_type: not a Hugging Face config")
    if "auto_map" in data and trust_remote_code:
        return AutoConfig.from_pretrained(str(config_file.parent), trust_remote_code=True)
    model_type = data.pop("model_type")
    try:
        return AutoConfig.for_model(model_type, **data)
    except ValueError as exc:
        if "Unrecognized model" not in str(exc) and "model_type" not in str(exc):  # a config that validates badly
            raise InputError(f"{config_file} is not a valid {model_type} config: {str(exc).strip().splitlines()[0]}",
                             hint="Check the sizes in config.json (e.g. hidden size divisible by the heads).") from exc
        hint = ("It ships its own code: pass --trust-remote-code if you trust it." if "auto_map" in data
                else "Upgrade transformers, or check the model_type.")
        raise InputError(f"{config_file}: transformers does not know model_type {model_type!r}", hint=hint) from exc
    except (TypeError, KeyError, AttributeError, StrictDataclassError) as exc:  # fields that do not validate
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{config_file} is not a valid {model_type} config: {first}",
                         hint="Check the sizes in config.json (e.g. hidden size divisible by the heads).") from exc


def _instantiate(config: Any, load: LoadOptions, where: Path) -> Any:
    """The class named by --task or config.architectures, built from the config (call under a meta device)."""
    import transformers

    from mlops_cli.core.loading import TASK_CLASSES

    if load.task:
        if load.task not in TASK_CLASSES:
            raise UsageError(f"unknown --task {load.task!r}", hint=f"Choose one of: {', '.join(TASK_CLASSES)}.")
        auto_class = getattr(transformers, TASK_CLASSES[load.task])
        return auto_class.from_config(config, trust_remote_code=load.trust_remote_code)
    names = list(getattr(config, "architectures", None) or [])
    for name in names:
        model_class = getattr(transformers, name, None)
        if model_class is not None:
            return model_class(config)
    auto_map = getattr(config, "auto_map", None) or {}
    if auto_map and not load.trust_remote_code:
        raise UnsafeInputError(f"{where}: the architecture {names} ships its own code",
                               hint="Pass --trust-remote-code if you trust it, or --task for a stock class.")
    if auto_map:
        for auto_name in auto_map:
            if auto_name.startswith("AutoModel") and hasattr(transformers, auto_name):
                return getattr(transformers, auto_name).from_config(config, trust_remote_code=True)
    raise InputError(f"{where} names no architecture transformers knows ({names or 'none'})",
                     hint=f"Pass --task, one of: {', '.join(TASK_CLASSES)}.")


# ---------------------------------------------------------------- reading the structure


def count_parameters(module: Any) -> ParameterCount:
    """Parameter counts of a (meta) module: tied tensors found by identity, embeddings apart."""
    import torch.nn as nn

    groups: dict[int, list[str]] = {}
    sizes: dict[int, int] = {}
    for name, tensor in module.named_parameters(remove_duplicate=False):
        groups.setdefault(id(tensor), []).append(name)
        sizes[id(tensor)] = tensor.numel()
    embedding_ids = {id(sub.weight) for sub in module.modules() if isinstance(sub, nn.Embedding)}
    embedding = sum(sizes[key] for key in embedding_ids if key in sizes)
    return ParameterCount(
        total=sum(sizes[key] * len(names) for key, names in groups.items()),
        unique=sum(sizes.values()), embedding=embedding, non_embedding=sum(sizes.values()) - embedding,
        buffers=sum(buffer.numel() for buffer in module.buffers()),
        tied=tuple(tuple(names) for names in groups.values() if len(names) > 1))


def linear_macs_per_token(module: Any, experts: Experts | None = None) -> int:
    """MACs of every Linear-like layer for one token: one multiply-add per weight element (nn.Linear and
    GPT-2's Conv1D; a tied output head is computed, so it counts here). In a mixture of experts a token runs
    only `experts.per_token` of the `experts.count` experts: their weights (Linear layers, or the stacked
    [experts, out, in] tensors recent transformers use) count in that proportion."""
    import torch.nn as nn

    def share(path: str, elements: int) -> int:
        in_experts = experts is not None and ".experts." in f".{path}."
        return elements * experts.per_token // experts.count if in_experts and experts else elements

    total = 0
    for path, sub in module.named_modules():
        weight = getattr(sub, "weight", None)
        is_linear = isinstance(sub, nn.Linear) or type(sub).__name__ == "Conv1D"
        if is_linear and weight is not None and weight.dim() == 2:
            total += share(path, weight.numel())
    if experts is not None:
        total += sum(share(name, tensor.numel()) for name, tensor in module.named_parameters()
                     if tensor.dim() == 3 and tensor.shape[0] == experts.count and ".experts." in f".{name}")
    return total


def experts_of(config: Any) -> Experts | None:
    """The mixture-of-experts layout a config declares (Mixtral, Qwen-MoE, DeepSeek, OLMoE names), if any."""
    text = _text_config(config)
    count = next((value for name in ("num_local_experts", "num_experts", "n_routed_experts")
                  if isinstance(value := getattr(text, name, None), int) and value > 1), None)
    if count is None:
        return None
    per_token = getattr(text, "num_experts_per_tok", None) or getattr(text, "moe_top_k", None) or 1
    return Experts(count, int(per_token))


def _text_config(config: Any) -> Any:
    """The language part of a config (multimodal configs nest it)."""
    return config.get_text_config() if config is not None and hasattr(config, "get_text_config") else config


def attention_dims(config: Any) -> AttentionDims | None:
    """Attention dimensions from a (text) config; None when it does not describe a transformer."""
    if config is None:
        return None
    text = _text_config(config)
    layers, heads, hidden = (getattr(text, name, None) for name in
                             ("num_hidden_layers", "num_attention_heads", "hidden_size"))
    if not (isinstance(layers, int) and isinstance(heads, int) and isinstance(hidden, int)) or heads <= 0:
        return None
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    intermediate = getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None) or 4 * hidden
    max_positions = getattr(text, "max_position_embeddings", None)
    return AttentionDims(layers=layers, heads=heads, kv_heads=int(kv_heads), head_dim=int(head_dim), hidden=hidden,
                         intermediate=int(intermediate), vocab=int(getattr(text, "vocab_size", 0) or 0),
                         max_positions=int(max_positions) if isinstance(max_positions, int) else None)


def is_decoder_lm(meta: MetaModel) -> bool:
    """A model that generates token by token (and so keeps a key/value cache)."""
    config = meta.config
    if config is None or getattr(config, "is_encoder_decoder", False):
        return False
    can_generate = getattr(meta.module, "can_generate", None)
    return bool(can_generate()) if callable(can_generate) else False
