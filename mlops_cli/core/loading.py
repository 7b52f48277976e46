"""Model references -> loaded models. One MODEL argument, many kinds, detected by content.

Safe by default: weights load with `weights_only=True` or from safetensors, keys are matched strictly
(missing, unexpected and mis-shaped keys are named in the error), code-carrying formats (TorchScript,
`trust_remote_code` models, .pt2 archives holding pickles) need an explicit trust flag, and architecture code
runs only when the user names it with `--arch` or it is one of mlops' built-ins.
"""

from __future__ import annotations

import contextlib
import enum
import importlib
import importlib.util
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mlops_cli.core.contract import BUILTIN_PREFIX, LoadOptions, ModelRef
from mlops_cli.core.errors import InputError, ResourceError, UnsafeInputError, UsageError
from mlops_cli.core.formats import (
    SIDECAR,
    WEIGHT_FORMATS,
    Format,
    check_exported_archive,
    detect_format,
    load_tensor_file,
    metadata_input_specs,
    read_archive_metadata,
)
from mlops_cli.core.int8_state import PACKED, QUANTIZATION_INFO
from mlops_cli.core.pruned import REBUILD_ARCH
from mlops_cli.core.shards import read_shard_indexes
from mlops_cli.core.sidecar import canonical_arch, read_sidecar

CHECKPOINT_KEYS = ("state_dict", "model_state_dict", "model", "net", "module", "network", "weights", "ema")
TASK_CLASSES = {
    "sequence-classification": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
    "question-answering": "AutoModelForQuestionAnswering",
    "causal-lm": "AutoModelForCausalLM",
    "masked-lm": "AutoModelForMaskedLM",
    "seq2seq-lm": "AutoModelForSeq2SeqLM",
    "image-classification": "AutoModelForImageClassification",
    "feature-extraction": "AutoModel",
}


class ModelKind(str, enum.Enum):
    HF = "huggingface"
    MODULE = "torch-module"  # weights + architecture
    TORCHSCRIPT = "torchscript"
    EXPORTED = "torch-export"
    ONNX = "onnx"


@dataclass
class LoadedModel:
    """A loaded, runnable model and what we know about it. `module` is None for ONNX models."""

    reference: str
    kind: ModelKind
    format: Format | None
    module: Any = None
    path: Path | None = None
    config: Any = None
    tokenizer: Any = None
    input_specs: tuple[str, ...] = ()  # `--input` style specs known for this model (plain modules)
    arch: str | None = None
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    checkpoint_extras: dict[str, Any] = field(default_factory=dict)  # non-weight keys of a training checkpoint
    state_key: str | None = None
    warnings: list[str] = field(default_factory=list)  # shown by the command as hints on stderr
    # The placement options chose where it lives (even one device, which accelerate does not dispatch): never moved.
    placed: bool = False
    gathered: bool = False  # a placed model made whole on CPU (runtimes.gather_on_cpu): `--device auto` keeps it there

    @property
    def is_torch(self) -> bool:
        return self.module is not None

    @property
    def name(self) -> str:
        return self.reference


def load_model(reference: str | ModelRef, options: LoadOptions | None = None) -> LoadedModel:
    """Resolve a MODEL reference into a LoadedModel (torch modules in eval mode, on CPU)."""
    options = options or LoadOptions()
    check_offload_folder(options)
    ref = ModelRef.parse(reference)
    if ref.builtin is not None:
        refuse_placement(options, f"{ref} is a built-in model, built in memory rather than read from a folder",
                          f"Save it with `mlops zoo save {ref} DIR` and pass DIR.")
        return _load_builtin(ref.builtin)
    path = Path(ref.text)
    reference = ref.text
    fmt = detect_format(path)
    if fmt == Format.HF_FOLDER:
        return _load_hf_folder(path, options)
    refuse_placement(options, f"{path} is {fmt.value}, not a Hugging Face model folder",
                      "Placement by accelerate needs a folder with config.json and its weights; drop the option.")
    if fmt == Format.WEIGHTS_FOLDER:
        return _load_weights_folder(path, options)
    if fmt in WEIGHT_FORMATS:
        return _load_weights_file(path, fmt, options, read_sidecar(path.parent))
    if fmt == Format.TORCHSCRIPT:
        return _load_torchscript(path, options)
    if fmt == Format.EXPORTED_PROGRAM:
        return _load_exported(path, options)
    if fmt == Format.ONNX:
        check_onnx_external_data(path)
        return LoadedModel(reference, ModelKind.ONNX, fmt, path=path)
    raise InputError(f"{path} is {fmt.value}, which cannot be run as a model",
                     hint="Pass a weights file with --arch, a model folder, a TorchScript, .pt2 or .onnx file.")


# ---------------------------------------------------------------- placement: accelerate device maps, tensor parallelism

DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
DEVICE_MAP_EXAMPLE = "--device-map auto --max-memory 0=20GiB,cpu=60GiB"
_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$", re.IGNORECASE)
_CUDA_DEVICE = re.compile(r"^cuda(?::(\d+))?$")
LOAD_DTYPES = ("fp32", "fp16", "bf16")
OFFLOAD_WARNING = "--device-map: "  # how the warning about disk-offloaded parts begins


def parse_device_map(text: str | None) -> str | None:
    """`--device-map`: a strategy accelerate spreads the model with, or one device to put all of it on."""
    if text is None:
        return None
    value = text.strip().lower()
    if value in DEVICE_MAP_STRATEGIES or value == "cpu" or _CUDA_DEVICE.match(value):
        return value
    raise UsageError(f"--device-map {text!r} is not a placement",
                     hint=f"Use one of {', '.join(DEVICE_MAP_STRATEGIES)}, cpu, cuda or cuda:N. "
                          f"Example: {DEVICE_MAP_EXAMPLE}")


def parse_max_memory(text: str | None) -> dict[int | str, int] | None:
    """`--max-memory 0=20GiB,cpu=60GiB` -> {0: bytes, "cpu": bytes}: the most accelerate may put on each device
    (GPU index or cuda:N, and cpu); what fits nowhere is offloaded to disk."""
    if text is None:
        return None
    limits: dict[int | str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, size = part.partition("=")
        device = _memory_device(name.strip().lower())
        amount = _SIZE.match(size)
        if not sep or device is None or amount is None or amount.group(2).lower() not in _SIZE_UNITS:
            raise UsageError(f"--max-memory: {part!r} is not DEVICE=SIZE",
                             hint="DEVICE is a GPU index (0, cuda:1) or cpu; SIZE is bytes or a number with "
                                  f"KB/MB/GB/KiB/MiB/GiB. Example: {DEVICE_MAP_EXAMPLE}")
        limits[device] = int(float(amount.group(1)) * _SIZE_UNITS[amount.group(2).lower()])
    if not limits:
        raise UsageError("--max-memory is empty", hint=f"Example: {DEVICE_MAP_EXAMPLE}")
    return limits


def _memory_device(name: str) -> int | str | None:
    if name == "cpu":
        return name
    if name.isdigit():
        return int(name)
    cuda = _CUDA_DEVICE.match(name)
    return int(cuda.group(1)) if cuda and cuda.group(1) else None


def wants_placement(options: LoadOptions) -> bool:
    return bool(options.device_map or options.max_memory or options.tp_plan)


def placement_for(ref: str | ModelRef, options: LoadOptions) -> LoadOptions:
    """The options for a second model a command loads (verify-parity's candidate): placed like the first when it
    is a Hugging Face folder too, else loaded without placement (an ONNX candidate of a placed model, or an int8
    folder of `compress int8`, which accelerate cannot place)."""
    path = ModelRef.parse(ref).path
    placeable = (path is not None and detect_format(path) == Format.HF_FOLDER
                 and not (path / QUANTIZATION_INFO).is_file())
    if not wants_placement(options) or placeable:
        return options
    return replace(options, device_map=None, max_memory=None, offload_folder=None, tp_plan=None, dtype=None)


def check_offload_folder(options: LoadOptions) -> None:
    """`--offload-folder` only says where `--device-map/--max-memory` put what fits nowhere: alone it would be
    silently ignored, and a file there made the load fail as if the weights were wrong."""
    folder = options.offload_folder
    if folder is None:
        return
    if not (options.device_map or options.max_memory):
        raise UsageError("--offload-folder is where --device-map/--max-memory put the weights that fit nowhere; "
                         "alone it does nothing", hint=f"Add the placement ({DEVICE_MAP_EXAMPLE}) or drop it.")
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--offload-folder {folder} is a file, not a folder",
                         hint="Name a folder (it is created when missing).")


def refuse_placement(options: LoadOptions, why: str, hint: str) -> None:
    if wants_placement(options) or options.offload_folder is not None:
        raise UsageError(f"--device-map/--max-memory/--offload-folder/--tp-plan place Hugging Face models: {why}",
                         hint=hint)


def placement_kwargs(options: LoadOptions, config: Any = None) -> tuple[dict[str, Any], Path | None]:
    """`from_pretrained` keyword arguments for the placement options, and the private offload folder made for
    this load (None when the user named one or nothing is placed). `--max-memory` alone implies
    `--device-map auto` (a memory budget is only meaningful to a planner)."""
    if not wants_placement(options):
        return {}, None
    if importlib.util.find_spec("accelerate") is None:
        raise UsageError("--device-map/--max-memory/--tp-plan need the accelerate package",
                         hint="pip install 'mlops-cli[extras]' (or accelerate).")
    if options.tp_plan:
        return _tensor_parallel_kwargs(options, config), None
    device_map = options.device_map or "auto"
    if options.max_memory and device_map not in DEVICE_MAP_STRATEGIES:
        raise UsageError(f"--max-memory budgets what a planner puts on each device, and --device-map {device_map} "
                         "puts the whole model on one device",
                         hint=f"Drop --max-memory, or let accelerate plan: {DEVICE_MAP_EXAMPLE}")
    _check_cuda_devices(device_map, options.max_memory or {})
    kwargs: dict[str, Any] = {"device_map": device_map, "low_cpu_mem_usage": True}
    if options.max_memory:
        kwargs["max_memory"] = dict(options.max_memory)
    if options.dtype:
        kwargs["dtype"] = _torch_dtype(options.dtype)
    private = None
    if options.offload_folder is None:
        private = Path(tempfile.mkdtemp(prefix="mlops-offload-"))
    kwargs["offload_folder"] = str(options.offload_folder or private)
    return kwargs, private


def _tensor_parallel_kwargs(options: LoadOptions, config: Any) -> dict[str, Any]:
    """`--tp-plan auto`: transformers shards each layer over the processes torchrun started (docs/scaling.md),
    following the plan its model class declares."""
    if options.tp_plan != "auto":
        raise UsageError(f"--tp-plan {options.tp_plan!r} is not supported", hint="Use --tp-plan auto.")
    if options.device_map or options.max_memory:
        raise UsageError("--tp-plan and --device-map/--max-memory are two ways to split a model; pick one")
    if config is not None and not getattr(config, "base_model_tp_plan", None):
        raise UsageError(f"transformers has no tensor-parallel plan for {type(config).__name__}",
                         hint="Use --device-map auto instead (see docs/scaling.md); Llama, Mistral, Qwen and most "
                              "recent decoder families have a plan.")
    if not os.environ.get("WORLD_SIZE"):
        raise UsageError("--tp-plan auto splits the model over processes started by torchrun, and this process "
                         "was not (WORLD_SIZE is not set)",
                         hint="Launch with: torchrun --nproc-per-node N -m mlops_cli ... --tp-plan auto "
                              "(see docs/scaling.md).")
    from transformers import DistributedConfig

    kwargs: dict[str, Any] = {"distributed_config": DistributedConfig(tp_plan="auto")}
    if options.dtype:
        kwargs["dtype"] = _torch_dtype(options.dtype)
    return kwargs


def _check_cuda_devices(device_map: str, max_memory: dict[int | str, int]) -> None:
    """A placement naming GPUs that are not there is the user's mistake (exit 2), not a loading failure."""
    import torch

    visible = torch.cuda.device_count()
    cuda = _CUDA_DEVICE.match(device_map)
    wanted = [int(cuda.group(1) or 0)] if cuda else []
    wanted += [key for key in max_memory if isinstance(key, int)]
    missing = sorted({index for index in wanted if index >= visible})
    if missing:
        seen = f"{visible} CUDA GPU(s) are visible" if visible else "no CUDA GPU is visible"
        raise UsageError(f"the placement names GPU {', '.join(map(str, missing))} but {seen}",
                         hint="On CPU use --device-map auto --max-memory cpu=SIZE (the rest is offloaded to disk).")


@contextlib.contextmanager
def _quiet_dispatch() -> Iterator[None]:
    """accelerate logs "Some parameters are on the meta device..." itself; the report says it (`_offload_warnings`)."""
    logger = logging.getLogger("accelerate.big_modeling")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def device_map_of(module: Any) -> dict[str, str] | None:
    """Where accelerate placed a model's parts (`--device-map`): {module name: "cpu" | "disk" | "cuda:N"}, or
    None for a model that was not dispatched (then it lives on one device). The one reader of `hf_device_map`."""
    placement = getattr(module, "hf_device_map", None)
    if not placement:
        return None
    return {name: f"cuda:{where}" if isinstance(where, int) else str(where) for name, where in placement.items()}


def _offload_warnings(model: Any) -> list[str]:
    """Parts of the model the placement left on disk: every forward pass reads them back, which is slow."""
    placement = device_map_of(model) or {}
    on_disk = [name for name, where in placement.items() if where == "disk"]
    if not on_disk:
        return []
    what = "the whole model is" if on_disk == [""] else (
        f"{len(on_disk)} of {len(placement)} parts of the model ({', '.join(on_disk[:3])}"
        f"{' ...' if len(on_disk) > 3 else ''}) are")
    return [f"{OFFLOAD_WARNING}{what} offloaded to disk and read back on every forward pass (slow); raise "
            "--max-memory to keep more in memory"]


def _torch_dtype(name: str) -> Any:
    import torch

    if name not in LOAD_DTYPES:
        raise UsageError(f"unknown dtype {name!r}", hint=f"Use one of: {', '.join(LOAD_DTYPES)}.")
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


# ---------------------------------------------------------------- builtin


def _load_builtin(name: str) -> LoadedModel:
    from mlops_cli.core import zoo

    reference = f"{BUILTIN_PREFIX}{name}"
    entry = zoo.entry(name)
    module, tokenizer = zoo.build(name)
    if entry.kind == "hf":
        return LoadedModel(reference, ModelKind.HF, None, module=module, config=module.config, tokenizer=tokenizer)
    return LoadedModel(reference, ModelKind.MODULE, None, module=module, input_specs=entry.inputs,
                       arch=zoo.ARCH_PATHS[name])


# ---------------------------------------------------------------- Hugging Face folders


def _load_hf_folder(folder: Path, options: LoadOptions) -> LoadedModel:
    import transformers
    from huggingface_hub.errors import StrictDataclassError

    try:
        config = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=options.trust_remote_code,
                                                         local_files_only=True)
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise UnsafeInputError(f"{folder} needs custom code from the model repository to load",
                                   hint="Review the code, then pass --trust-remote-code.") from exc
        raise InputError(f"{folder}/config.json could not be used: {exc}") from exc
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"{folder}/config.json could not be read: {exc}") from exc
    except StrictDataclassError as exc:  # transformers 5 validates config fields (e.g. heads dividing the size)
        raise InputError(f"{folder}/config.json is not a valid config: {str(exc).strip().splitlines()[0]}") from exc
    if getattr(config, "auto_map", None) and not options.trust_remote_code:
        raise UnsafeInputError(f"{folder} declares custom code (auto_map in config.json)",
                               hint="Review the code, then pass --trust-remote-code.")
    model_class = _hf_model_class(config, options.task, folder)
    if (folder / QUANTIZATION_INFO).is_file():
        refuse_placement(options, f"{folder} holds int8 weights written by `mlops compress int8`, which accelerate "
                                   "cannot place", "Run it without --device-map/--max-memory/--tp-plan.")
        return _load_hf_int8_folder(folder, config, model_class, options)
    use_safetensors, ignored = _hf_weights(folder)
    placement, offload_folder = placement_kwargs(options, config)
    try:
        with _quiet_dispatch():
            model, info = model_class.from_pretrained(
                folder, local_files_only=True, output_loading_info=True, trust_remote_code=options.trust_remote_code,
                use_safetensors=use_safetensors, **placement)
    except Exception as exc:
        if offload_folder is not None:
            shutil.rmtree(offload_folder, ignore_errors=True)
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if type(exc).__name__ == "OutOfMemoryError":  # torch's, raised by CUDA allocations
            raise ResourceError(f"{folder}: out of memory while loading: {message}",
                                hint="Let accelerate spread it: --device-map auto, with --max-memory below each "
                                     "device's free memory (see docs/scaling.md).") from exc
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            raise UnsafeInputError(f"{folder}: weights hold Python objects a safe load refuses: {message}") from exc
        raise InputError(f"{folder}: the weights do not fit {model_class.__name__}: {message}",
                         hint="Check --task and that config.json matches the weights.") from exc
    if offload_folder is not None:
        weakref.finalize(model, shutil.rmtree, offload_folder, True)  # when the model goes, or at exit
    problems = {kind: sorted(info.get(kind) or []) for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    problems = {kind: keys for kind, keys in problems.items() if keys}
    if problems:
        raise InputError(
            f"{folder}: weights do not match {model_class.__name__}: {_describe_key_problems(problems)}",
            hint="The checkpoint belongs to another architecture or head; pass --task to pick the class.")
    loaded = LoadedModel(str(folder), ModelKind.HF, Format.HF_FOLDER, module=model.eval(), path=folder,
                         config=config, placed=bool(placement))
    loaded.warnings.extend(_offload_warnings(model))
    loaded.warnings.extend(f"{folder / name} was not read: the folder's safetensors weights were loaded instead"
                           for name in ignored)
    loaded.tokenizer = _load_hf_tokenizer(folder, options, loaded.warnings)
    return loaded


def _load_hf_int8_folder(folder: Path, config: Any, model_class: Any, options: LoadOptions) -> LoadedModel:
    """An HF folder written by `compress int8`: the float architecture from config, then the int8 state."""
    info = read_sidecar(folder, QUANTIZATION_INFO)
    weights = folder / str(info.get("weights", "model.int8.pt"))
    if weights.parent.resolve() != folder.resolve():
        raise UnsafeInputError(f"{folder / QUANTIZATION_INFO} points outside its folder: {info.get('weights')}")
    build = getattr(model_class, "from_config", None) or model_class  # Auto* classes vs concrete classes
    module = build(config)
    state = load_tensor_file(weights, detect_format(weights))
    loaded = LoadedModel(str(folder), ModelKind.HF, Format.HF_FOLDER, module=_load_int8(module, state), path=folder,
                         config=config)
    loaded.tokenizer = _load_hf_tokenizer(folder, options, loaded.warnings)
    return loaded


def _load_int8(module: Any, state: dict[str, Any]) -> Any:
    """Rebuild a dynamically quantised model from its float architecture (core/int8_state.py)."""
    from mlops_cli.core.int8_state import load_int8_state

    return load_int8_state(module, state)


def _hf_model_class(config: Any, task: str | None, folder: Path) -> Any:
    import transformers

    if task:
        if task not in TASK_CLASSES:
            raise UsageError(f"unknown --task {task!r}", hint=f"Choose one of: {', '.join(TASK_CLASSES)}.")
        return getattr(transformers, TASK_CLASSES[task])
    for name in getattr(config, "architectures", None) or []:
        model_class = getattr(transformers, name, None)
        if model_class is not None:
            return model_class
    raise InputError(f"{folder}/config.json names no architecture transformers knows "
                     f"({getattr(config, 'architectures', None)})",
                     hint=f"Pass --task, one of: {', '.join(TASK_CLASSES)}.")


SEQ2SEQ_LM_ARCHITECTURES = ("ForConditionalGeneration", "MTModel")  # T5, BART, mBART, Pegasus...; Marian
CAUSAL_LM_ARCHITECTURES = ("ForCausalLM", "LMHeadModel")  # Llama, Qwen2, Mistral...; GPT-2, GPT-J


def _folder_config(path: Path | None) -> dict[str, Any]:
    """An HF folder's config.json read as JSON (nothing is loaded or imported); {} when there is none."""
    if path is None or not (path / "config.json").is_file():
        return {}
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def lm_task(architectures: Any, is_encoder_decoder: Any) -> str | None:
    """"causal-lm", "seq2seq-lm" or None, from the classes a config names (nothing loaded): the one rule for
    which models `export onnx` gives a KV cache (and advises about when exported without it)."""
    names = [name for name in architectures or [] if isinstance(name, str)]
    if is_encoder_decoder:
        return "seq2seq-lm" if any(name.endswith(SEQ2SEQ_LM_ARCHITECTURES) for name in names) else None
    return "causal-lm" if any(name.endswith(CAUSAL_LM_ARCHITECTURES) for name in names) else None


def is_seq2seq_lm_folder(path: Path | None) -> bool:
    """An HF folder whose config.json describes an encoder-decoder LM, the models `export onnx` exports with
    `--task seq2seq-lm` when the output is a folder."""
    config = _folder_config(path)
    return lm_task(config.get("architectures"), config.get("is_encoder_decoder")) == "seq2seq-lm"


def is_causal_lm(ref: ModelRef) -> bool:
    """A decoder-only LM, told by its built-in entry or its HF folder's config.json (nothing is loaded): the models
    `export onnx` exports with their KV cache unless told otherwise."""
    if ref.builtin is not None:
        from mlops_cli.core import zoo

        return zoo.entry(ref.builtin).task == "causal-lm"
    config = _folder_config(ref.path)
    return lm_task(config.get("architectures"), config.get("is_encoder_decoder")) == "causal-lm"


def hf_weight_files(folder: Path) -> tuple[list[Path], list[Path]]:
    """(the weight files transformers loads from an HF folder, the pytorch_model*.bin weights it then skips).

    Like transformers, safetensors win when both kinds are present; the `.bin` pickles are then never opened
    (not even sniffed), so a hostile or broken one beside good safetensors neither blocks nor costs a read.
    """
    safetensors = sorted(p for p in folder.iterdir() if p.name.endswith((".safetensors", ".safetensors.index.json")))
    pickles = sorted(p for p in folder.iterdir() if p.name.endswith((".bin", ".bin.index.json")))
    return (safetensors, [p for p in pickles if p.name.startswith("pytorch_model")]) if safetensors else (pickles, [])


def _hf_weights(folder: Path) -> tuple[bool | None, list[str]]:
    """Check the weight files transformers will load: (its `use_safetensors`, names of the pickles it skips)."""
    chosen, skipped = hf_weight_files(folder)
    if not chosen:
        raise InputError(f"{folder} has config.json but no weights (*.safetensors or *.bin)",
                         hint="Copy the weight files into the folder.")
    for weights in chosen:
        if weights.suffix != ".json":
            detect_format(weights)  # empty / LFS-pointer / corrupt files fail here with a plain message
    loaded_indexes = {p.name for p in chosen}
    for index in read_shard_indexes(folder):
        missing = [shard for shard in index.shards if not (folder / shard).is_file()]
        if missing and index.name in loaded_indexes:
            raise InputError(f"{folder}: {index.name} lists {len(missing)} shard(s) that are not in the folder: "
                             f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}",
                             hint="The download is incomplete: fetch the missing shard files.")
    uses_safetensors = chosen[0].name.endswith((".safetensors", ".safetensors.index.json"))
    return (True if uses_safetensors else None), [p.name for p in skipped]


def _load_hf_tokenizer(folder: Path, options: LoadOptions, warnings: list[str]) -> Any:
    names = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model")
    if not any((folder / name).exists() for name in names):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True,
                                             trust_remote_code=options.trust_remote_code)
    except Exception as exc:  # a broken tokenizer should not stop weight-only operations
        warnings.append(f"the tokenizer in {folder} could not be loaded ({exc}); using random token ids")
        return None


# ---------------------------------------------------------------- weights + architecture


def _load_weights_folder(folder: Path, options: LoadOptions) -> LoadedModel:
    sidecar = read_sidecar(folder)
    weights = folder / str(sidecar.get("weights", "model.safetensors"))
    if weights.parent.resolve() != folder.resolve():
        raise UnsafeInputError(f"{folder / SIDECAR} points outside its folder: {sidecar.get('weights')}")
    return _load_weights_file(weights, detect_format(weights), options, sidecar)


def _load_weights_file(path: Path, fmt: Format, options: LoadOptions, sidecar: dict[str, Any]) -> LoadedModel:
    content = load_tensor_file(path, fmt)
    state_dict, key, extras = split_checkpoint(content, options.key, path)
    arch = options.arch or sidecar.get("arch")
    if not arch:
        raise UsageError(f"{path} holds only weights: mlops needs the architecture to build the model",
                         hint="Pass --arch module.path:Factory (or file.py:Factory) and --arch-kwargs if needed. "
                              "`mlops inspect` shows what the file holds.")
    arch_kwargs = options.arch_kwargs or dict(sidecar.get("arch_kwargs") or {})
    if not options.arch:
        check_sidecar_architecture(str(arch), arch_kwargs, path.parent / SIDECAR)
        try:
            module = build_architecture(arch, arch_kwargs)
        except UsageError as exc:  # the file's values, not the user's options, are wrong
            raise InputError(f"{path.parent / SIDECAR}: {exc.message}",
                             hint="Re-save the folder with mlops, or pass --arch/--arch-kwargs yourself.") from exc
    else:
        module = build_architecture(arch, arch_kwargs)
    state_dict = strip_prefix(state_dict, options.strip_prefix)
    if any(PACKED in key for key in state_dict):
        module = _load_int8(module, state_dict)
    else:
        load_state_dict_strict(module, state_dict, path)
    return LoadedModel(str(path), ModelKind.MODULE, fmt, module=module.eval(), path=path,
                       input_specs=_sidecar_inputs(sidecar, path.parent / SIDECAR), arch=arch,
                       arch_kwargs=arch_kwargs, checkpoint_extras=extras, state_key=key)


def _sidecar_inputs(sidecar: dict[str, Any], where: Path) -> tuple[str, ...]:
    """The input specs a sidecar records, checked here so a bad one is blamed on the file, not on --input."""
    from mlops_cli.core.inputs import parse_input_spec

    specs = tuple(sidecar.get("inputs") or ())
    for spec in specs:
        try:
            parse_input_spec(spec)
        except UsageError as exc:
            raise InputError(f"{where}: {exc.message}",
                             hint="Re-save the folder with mlops, or pass --input yourself.") from exc
    return specs


def check_sidecar_architecture(arch: str, arch_kwargs: dict[str, Any], sidecar: Path) -> None:
    """A file may only name mlops' own built-in architectures (or their pruned rebuild): anything else
    would let a downloaded folder run code. The user's own `--arch` is the explicit way to trust code."""
    from mlops_cli.core.zoo import ARCH_PATHS

    builtin = set(ARCH_PATHS.values())
    trusted = arch in builtin or (
        arch == REBUILD_ARCH and arch_kwargs.get("arch") in builtin and "trust_code" not in arch_kwargs)
    if not trusted:
        named = arch_kwargs.get("arch", arch) if arch == REBUILD_ARCH else arch
        raise UnsafeInputError(f"{sidecar} names the architecture {named}, which would run its code",
                               hint="If you trust it, pass --arch (and --arch-kwargs) yourself.")


def is_tensor_dict(value: Any) -> bool:
    """A state_dict: tensors by name (a dynamically quantised one also holds packed-parameter entries)."""
    import torch

    return isinstance(value, dict) and bool(value) and all(
        isinstance(v, torch.Tensor) or PACKED in str(k) for k, v in value.items())


def storage_identity(tensor: Any) -> tuple[Any, ...] | None:
    """Where a tensor's bytes live (two names with one identity are one tensor, tied); None where torch cannot
    say (quantised tensors)."""
    try:
        return (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
                tuple(tensor.stride()), tensor.dtype)
    except (RuntimeError, NotImplementedError):
        return None


def tied_names(state_dict: dict[str, Any]) -> dict[str, str]:
    """Names whose storage an earlier name already holds (torch.save keeps GPT-2's lm_head/wte tie), to that name."""
    import torch

    seen: dict[tuple[Any, ...], str] = {}
    tied: dict[str, str] = {}
    for name, tensor in state_dict.items():
        identity = storage_identity(tensor) if isinstance(tensor, torch.Tensor) else None
        if identity is None:
            continue
        if identity in seen:
            tied[name] = seen[identity]
        else:
            seen[identity] = name
    return tied


def split_checkpoint(content: Any, key: str | None, path: Path) -> tuple[dict[str, Any], str | None, dict[str, Any]]:
    """Find the state_dict in a file: the whole file, `--key`, or a well-known training-checkpoint key."""
    if not isinstance(content, dict):
        raise InputError(f"{path} holds a {type(content).__name__}, not a state_dict or checkpoint dict")
    if key is not None:
        if key not in content:
            raise InputError(f"{path} has no key {key!r}", hint=f"Its top-level keys: {', '.join(map(str, content))}.")
        if not is_tensor_dict(content[key]):
            raise InputError(f"{path}[{key!r}] is not a state_dict (a dict of tensors)")
        return content[key], key, {k: v for k, v in content.items() if k != key}
    if is_tensor_dict(content):
        return content, None, {}
    for candidate in CHECKPOINT_KEYS:
        if is_tensor_dict(content.get(candidate)):
            return content[candidate], candidate, {k: v for k, v in content.items() if k != candidate}
    raise InputError(f"{path} is a dict without a recognisable state_dict",
                     hint=f"Name it with --key; top-level keys: {', '.join(map(str, list(content)[:20]))}.")


def strip_prefix(state_dict: dict[str, Any], prefix: str | None) -> dict[str, Any]:
    if not prefix:
        return state_dict
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state_dict.items()}


def build_architecture(arch: str, arch_kwargs: dict[str, Any]) -> Any:
    """Import `module.path:Factory` or `path/to/file.py:Factory` and call it with `arch_kwargs`.

    This runs the named code: callers pass only what the user named with `--arch` (explicit consent) or
    what `check_sidecar_architecture` accepted.
    """
    target, sep, attribute = canonical_arch(arch).rpartition(":")
    if not sep or not target or not attribute:
        raise UsageError(f"--arch {arch!r} is not of the form module.path:Factory or file.py:Factory")
    try:
        if target.endswith(".py"):
            file = Path(target)
            if not file.is_file():
                raise InputError(f"--arch file not found: {file}")
            spec = importlib.util.spec_from_file_location(f"mlops_arch_{file.stem}", file)
            assert spec and spec.loader
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except ImportError as exc:
        raise InputError(f"--arch: cannot import {target}: {exc}") from exc
    factory = getattr(module, attribute, None)
    if factory is None:
        raise InputError(f"--arch: {target} has no attribute {attribute!r}")
    try:
        return factory(**arch_kwargs)
    except TypeError as exc:
        raise UsageError(f"--arch {arch}: calling it with {arch_kwargs} failed: {exc}",
                         hint="Fix --arch-kwargs.") from exc


def load_state_dict_strict(module: Any, state_dict: dict[str, Any], source: Path | str) -> None:
    """Load weights, failing (exit 3) on any missing, unexpected or mis-shaped key, all named."""
    expected = module.state_dict()
    problems: dict[str, list[str]] = {
        "missing_keys": sorted(set(expected) - set(state_dict)),
        "unexpected_keys": sorted(set(state_dict) - set(expected)),
        "mismatched_keys": sorted(
            f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
            for k in set(expected) & set(state_dict) if tuple(state_dict[k].shape) != tuple(expected[k].shape)),
    }
    problems = {kind: keys for kind, keys in problems.items() if keys}
    if problems:
        hint = "Check --arch/--arch-kwargs, or --key for the state_dict inside a checkpoint."
        unexpected = problems.get("unexpected_keys", [])
        if unexpected and all(k.startswith("module.") for k in unexpected):
            hint = "The weights were saved from DataParallel: pass --strip-prefix module."
        raise InputError(f"{source}: weights do not match the architecture: {_describe_key_problems(problems)}",
                         hint=hint)
    module.load_state_dict(state_dict, strict=True)


def _describe_key_problems(problems: dict[str, list[str]], limit: int = 5) -> str:
    parts = []
    for kind, keys in problems.items():
        shown = ", ".join(keys[:limit]) + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")
        parts.append(f"{len(keys)} {kind.replace('_', ' ')}: {shown}")
    return "; ".join(parts)


# ---------------------------------------------------------------- code-carrying and graph formats


def _load_torchscript(path: Path, options: LoadOptions) -> LoadedModel:
    if not options.trust_code:
        raise UnsafeInputError(f"{path} is a TorchScript archive: it carries code that runs when loaded",
                               hint="Pass --trust-code if you trust where it came from.")
    import torch

    try:
        module = torch.jit.load(str(path), map_location="cpu")
    except RuntimeError as exc:
        raise InputError(f"{path} could not be loaded as TorchScript: {str(exc).splitlines()[0]}") from exc
    specs = metadata_input_specs(read_archive_metadata(path))
    return LoadedModel(str(path), ModelKind.TORCHSCRIPT, Format.TORCHSCRIPT, module=module.eval(), path=path,
                       input_specs=specs)


def _load_exported(path: Path, options: LoadOptions) -> LoadedModel:
    import torch

    if not options.trust_code:
        check_exported_archive(path)
    try:
        program = torch.export.load(str(path))
    except Exception as exc:
        raise InputError(f"{path} could not be loaded as a torch.export program: {str(exc).splitlines()[0]}") from exc
    specs = metadata_input_specs(read_archive_metadata(path))
    return LoadedModel(str(path), ModelKind.EXPORTED, Format.EXPORTED_PROGRAM, module=program.module(), path=path,
                       input_specs=specs)


def check_onnx_external_data(path: Path) -> None:
    """Refuse ONNX files whose external-data locations escape the model's folder (exit 4)."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise InputError(f"{path} is not a valid ONNX model: {exc}") from exc
    folder = path.parent.resolve()
    for tensor in model.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((entry.value for entry in tensor.external_data if entry.key == "location"), "")
        resolved = (folder / location).resolve()
        if Path(location).is_absolute() or folder not in resolved.parents:
            raise UnsafeInputError(
                f"{path}: initializer {tensor.name!r} keeps its weights at {location!r}, "
                f"{'an absolute path' if Path(location).is_absolute() else 'outside the model folder'}",
                hint="External data must be a relative path inside the .onnx file's folder (e.g. model.onnx.data): "
                     "re-export the model, or fix the location if you trust where it came from.")
        if not resolved.is_file():
            raise InputError(f"{path}: external data file missing: {location}",
                             hint="Copy the .data file(s) next to the .onnx file.")
