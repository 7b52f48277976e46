"""One Runner interface over torch eager, TorchScript, torch.export programs and ONNX Runtime.

A runner takes a dict of numpy arrays and returns a dict of named numpy arrays, so the parity engine,
timing and summaries treat every backend the same way.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mlops_cli.core.errors import InputError, ResourceError, UsageError
from mlops_cli.core.loading import OFFLOAD_WARNING, LoadedModel, ModelKind, device_map_of


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when a GPU is visible, else 'cpu'; 'cuda' without a GPU is a usage error."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no CUDA GPU is visible", hint="Use --device cpu or auto.")
    if device != "cpu" and not device.startswith("cuda"):
        raise UsageError(f"unknown --device {device!r}", hint="Use auto, cpu or cuda.")
    return device


def device_for(loaded: LoadedModel, device: str) -> str:
    """The device a model runs on for a --device option. For ONNX models 'auto' means CUDA only where this
    onnxruntime has its CUDA provider (the plain `onnxruntime` wheel has none), so auto never fails; torch models
    follow `run_device`."""
    if loaded.kind == ModelKind.ONNX:
        if device == "auto":
            import onnxruntime as ort

            if "CUDAExecutionProvider" not in ort.get_available_providers():
                return "cpu"
        return resolve_device(device)
    return run_device(loaded, device)


def stays_put(loaded: LoadedModel) -> bool:
    """A model the placement options put somewhere (`--device-map`, even onto one device, `--tp-plan`): it must
    never be `.to(device)`-ed (accelerate's hooks move weights in and out; each process holds its own shard)."""
    return loaded.placed or (loaded.module is not None and is_placed(loaded.module))


def run_device(loaded: LoadedModel, device: str) -> str:
    """THE rule for the device a torch model runs on, given `--device`: a placed model runs where the placement
    put it (where its inputs go) and a `--device` naming another device is refused (exit 2) rather than ignored; a
    placed model gathered on CPU stays there for `--device auto` (it needed a device map, so it will not fit one
    GPU); any other model goes to `--device` (auto: CUDA when visible)."""
    if stays_put(loaded):
        where = input_device(loaded.module, _parameter_device(loaded.module))
        if device != "auto" and not same_device(device, where):
            raise UsageError(f"--device {device} contradicts the placement options, which put the model on {where}",
                             hint="Drop --device (a placed model runs where it was placed), or change --device-map.")
        return where
    if loaded.gathered and device == "auto":
        return "cpu"
    return resolve_device(device)


def same_device(wanted: str, actual: str) -> bool:
    """`--device cuda` is any GPU, `cuda:1` that one (torch.device objects compared, never strings)."""
    import torch

    asked, there = torch.device(wanted), torch.device(actual)
    return asked.type == there.type and (asked.index is None or asked.index == (there.index or 0))


def _parameter_device(module: Any) -> str:
    parameter = next((p for p in module.parameters() if p.device.type != "meta"), None)
    return str(parameter.device) if parameter is not None else "cpu"


def tensor_parallel_size(module: Any) -> int:
    """How many processes share each layer of a model loaded with `--tp-plan auto` (1: not split)."""
    return int(getattr(module, "_tp_size", None) or 1)


def is_placed(module: Any) -> bool:
    """A model accelerate placed (`--device-map`) or split by tensor parallelism (`--tp-plan`): it must never be
    `.to(device)`-ed (accelerate's hooks move weights in and out; each process holds its own shard)."""
    return device_map_of(module) is not None or tensor_parallel_size(module) > 1


def placement_note(module: Any) -> str | None:
    """Where the placement options put the model, for a report's notes (None: an ordinary model). What went to
    disk is the loader's warning (`loading._offload_warnings`), said once, not here again."""
    placement = device_map_of(module)
    if placement is not None:
        return f"--device-map placed the model on: {', '.join(sorted(set(placement.values())))}"
    size = tensor_parallel_size(module)
    if size > 1:
        return (f"--tp-plan auto: each layer is split over {size} processes; this report is rank "
                f"{os.environ.get('RANK', '?')}'s (MACs, memory and timings are its share)")
    return None


def input_device(module: Any, default: str = "cpu") -> str:
    """Where a model's inputs go: the execution device of its input embeddings (a disk- or CPU-offloaded
    embedding's weight is on `meta` or `cpu` while accelerate computes it elsewhere), else that weight's device,
    else the first device of its map, else `default`."""
    import torch

    embeddings = module.get_input_embeddings() if callable(getattr(module, "get_input_embeddings", None)) else None
    hook = getattr(embeddings, "_hf_hook", None)
    execution = getattr(hook, "execution_device", None)
    if execution is not None:
        return str(torch.device(execution))
    weight = getattr(embeddings, "weight", None)
    if weight is not None and weight.device.type != "meta":
        return str(weight.device)
    placement = device_map_of(module)
    if placement:
        first = next(iter(placement.values()))
        return "cpu" if first == "disk" else first
    return default


def gather_on_cpu(loaded: LoadedModel, purpose: str) -> None:
    """Make a model placed by `--device-map` whole again on CPU, for work that needs every weight at once
    (`purpose`: export, compression, pruning): offloaded weights are read back through accelerate's hooks, the
    hooks are removed and the model is an ordinary CPU module afterwards. Refused (exit 7) when the offloaded
    weights do not fit the memory available. The loaded model's warnings say what was done."""
    module = loaded.module
    if tensor_parallel_size(module) > 1:
        raise UsageError(f"{purpose} needs the whole model in one process, and --tp-plan split it over "
                         f"{tensor_parallel_size(module)}", hint="Run it without torchrun and --tp-plan.")
    placement = device_map_of(module)
    if loaded.placed:  # placed, even on one device: made an ordinary CPU module that `--device auto` keeps on CPU
        loaded.placed, loaded.gathered = False, True
    if placement is None:
        if loaded.gathered:
            module.to("cpu")
        return
    import psutil  # accelerate's own dependency: a dispatched model implies it is installed
    from accelerate.hooks import remove_hook_from_module
    from accelerate.utils import set_module_tensor_to_device

    tensors = dict([*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)])
    offloaded = {name: tensor for name, tensor in tensors.items() if tensor.device.type == "meta"}
    elsewhere = {id(t): t for t in tensors.values() if t.device.type != "cpu"}  # offloaded, or on a GPU
    needed = sum(t.numel() * t.element_size() for t in elsewhere.values())
    available = psutil.virtual_memory().available
    if needed > 0.9 * available:
        raise ResourceError(f"{purpose} needs every weight in CPU memory at once, and the {needed / 2**30:.1f} GiB "
                            f"--device-map put elsewhere do not fit the {available / 2**30:.1f} GiB available",
                            hint="Run it on a machine with more memory (placement spreads computing, not "
                                 "exporting); summarize, generate and verify-parity work as placed.")
    stores = {path: sub._hf_hook.weights_map for path, sub in module.named_modules()
              if getattr(getattr(sub, "_hf_hook", None), "weights_map", None) is not None}
    for name in offloaded:
        owner, _, leaf = name.rpartition(".")
        store_path = max((path for path in stores if owner == path or owner.startswith(f"{path}.") or not path),
                         key=len)
        key = name[len(store_path) + 1:] if store_path else name
        if key in stores[store_path]:  # a tied weight is stored once, under its first name (tie_weights below)
            set_module_tensor_to_device(module.get_submodule(owner), leaf, "cpu", value=stores[store_path][key])
    remove_hook_from_module(module, recurse=True)
    del module.hf_device_map
    if callable(getattr(module, "tie_weights", None)):
        module.tie_weights()
    module.to("cpu")
    where = ", ".join(sorted(set(placement.values())))
    loaded.warnings[:] = [w for w in loaded.warnings if not w.startswith(OFFLOAD_WARNING)]
    loaded.warnings.append(f"{purpose} needs the whole model on one device: the model --device-map placed on "
                           f"{where} was gathered on CPU ({needed / 2**20:.1f} MiB brought into CPU memory)")


_ort_threads: int | None = None  # what use_threads() set: ONNX Runtime sessions made afterwards use it
_torch_default: int | None = None  # torch's thread count before mlops set one (physical cores or OMP_NUM_THREADS)


def use_threads(threads: int | None = None) -> int:
    """Set the CPU threads torch and ONNX Runtime compute with, and return the count (reports show it).

    `threads` when given; else torch's own default (physical cores, or what OMP_NUM_THREADS says) capped at the
    cores not busy with other work (`core.timing.default_threads`): oversubscription made a 2-thread BERT forward
    40x slower than 1 thread on this kind of machine.
    """
    import torch

    from mlops_cli.core.timing import default_threads

    global _ort_threads, _torch_default
    if _torch_default is None:
        _torch_default = torch.get_num_threads()
    count = threads or max(1, min(_torch_default, default_threads()))
    torch.set_num_threads(count)
    _ort_threads = count
    return count


@dataclass
class Runner:
    """Runs a model on numpy inputs; `call` is the backend-specific function."""

    name: str
    backend: str
    device: str
    input_names: list[str] | None
    call: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]
    dropped_inputs: list[str] = field(default_factory=list)

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.call(inputs)

    def feed(self, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Inputs in this runner's own argument order where it is known (positional backends need it)."""
        if self.backend == "onnxruntime" or not self.input_names:
            return tensors
        ordered = {name: tensors[name] for name in self.input_names if name in tensors}
        return ordered if len(ordered) == len(tensors) else tensors


def runner_for(loaded: LoadedModel, device: str = "cpu") -> Runner:
    """The right runner for a loaded model."""
    if loaded.kind == ModelKind.ONNX:
        return onnx_runner(loaded, device)
    return torch_runner(loaded, device)


# ---------------------------------------------------------------- torch


def to_numpy(value: Any) -> np.ndarray:
    import torch

    tensor = value.detach()
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.float()
    return tensor.cpu().numpy()


def named_tensors(output: Any, prefix: str = "") -> dict[str, Any]:
    """Name a model's output tensors: ModelOutput/dict keys, `output` for one tensor, `output_i` for tuples.

    Caches (past_key_values) and other non-tensor values are skipped: they are not results. The same
    names are used by every runner and by the ONNX exporter, so exported graphs and runners agree.
    """
    import torch

    if isinstance(output, torch.Tensor):
        return {prefix or "output": output}
    if isinstance(output, dict) or (hasattr(output, "keys") and hasattr(output, "__getitem__")):
        result: dict[str, Any] = {}
        for key in output.keys():  # noqa: SIM118 - mappings that are not dicts may iterate differently
            if key in ("past_key_values", "cache"):
                continue
            value = output[key]
            name = f"{prefix}.{key}" if prefix else str(key)
            if isinstance(value, torch.Tensor):
                result[name] = value
            elif isinstance(value, (tuple, list)) and value and all(isinstance(v, torch.Tensor) for v in value):
                result.update({f"{name}.{i}": v for i, v in enumerate(value)})
        return result
    if isinstance(output, (tuple, list)):
        result = {}
        for index, value in enumerate(output):
            if isinstance(value, torch.Tensor):
                result[f"{prefix}.{index}" if prefix else f"output_{index}"] = value
        return result
    raise InputError(f"the model returned a {type(output).__name__}, which mlops cannot compare")


def flatten_outputs(output: Any, prefix: str = "") -> dict[str, np.ndarray]:
    """`named_tensors` as numpy arrays (what runners return)."""
    return {name: to_numpy(value) for name, value in named_tensors(output, prefix).items()}


def forward_parameter_names(module: Any) -> list[str] | None:
    """Names of a module's forward arguments (TorchScript schemas and Python signatures alike)."""
    forward = getattr(module, "forward", None)
    schema = getattr(forward, "schema", None)
    if schema is not None:
        return [arg.name for arg in schema.arguments[1:]]
    if forward is None:
        return None
    try:
        parameters = inspect.signature(forward).parameters.values()
    except (TypeError, ValueError):
        return None
    return [p.name for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def call_options(loaded: LoadedModel, names: list[str] | None) -> dict[str, Any]:
    """Fixed keyword arguments for calling a model: HF models without caches, returning named outputs."""
    extra: dict[str, Any] = {}
    if loaded.kind == ModelKind.HF and names:
        if "use_cache" in names:
            extra["use_cache"] = False
        if "return_dict" in names:
            extra["return_dict"] = True
    return extra


def call_module(module: Any, names: list[str] | None, tensors: dict[str, Any], extra: dict[str, Any]) -> Any:
    """Call a module by keyword when its forward names every input, else positionally (TorchScript, graphs).

    A torch.export program's module must be called the way it was exported: the arguments given
    positionally then positionally, the keyword ones by keyword.
    """
    keywords = _exported_keywords(module)
    if keywords is not None:
        return module(*(v for k, v in tensors.items() if k not in keywords),
                      **{k: v for k, v in tensors.items() if k in keywords})
    if names is not None and set(tensors) <= set(names):
        return module(**tensors, **extra)
    return module(*tensors.values())


def _exported_keywords(module: Any) -> set[str] | None:
    """The keyword arguments of a torch.export module's original call (None for other modules)."""
    spec = getattr(module, "_in_spec", None)
    if spec is None:
        return None
    try:
        kwargs_spec = spec.child(1) if hasattr(spec, "child") else spec.children_specs[1]
        return set(kwargs_spec.context or [])
    except (AttributeError, IndexError, TypeError):
        return set()


def torch_runner(loaded: LoadedModel, device: str = "cpu") -> Runner:
    import torch

    module = loaded.module
    if stays_put(loaded):  # --device-map or --tp-plan: inputs go where its first layer computes
        device = run_device(loaded, device)
    elif loaded.kind != ModelKind.EXPORTED:  # an ExportedProgram's module is pinned to its export device
        module.to(device)
    names = forward_parameter_names(module)
    extra = call_options(loaded, names)

    def call(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tensors = {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in inputs.items()}
        with torch.inference_mode():
            output = call_module(module, names, tensors, extra)
        return flatten_outputs(output)

    backend = {ModelKind.TORCHSCRIPT: "torchscript", ModelKind.EXPORTED: "torch.export"}.get(loaded.kind, "torch")
    return Runner(loaded.reference, backend, device, names, call)


# ---------------------------------------------------------------- ONNX Runtime


def onnx_session(path: Any, device: str = "cpu", options: Any = None) -> Any:
    """An InferenceSession on `device`. By default its worker threads do not spin-wait after a run:
    spinning threads keep the CPU busy for a while and would slow down (and skew the timing of) the
    PyTorch side running next to it in a parity check or benchmark."""
    import onnxruntime as ort

    if options is None:
        options = ort.SessionOptions()
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if _ort_threads:
            options.intra_op_num_threads = _ort_threads
    providers = ["CPUExecutionProvider"]
    if device.startswith("cuda"):
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise UsageError("--device cuda: this onnxruntime has no CUDA provider",
                             hint="pip install onnxruntime-gpu, or use --device cpu.")
        providers.insert(0, "CUDAExecutionProvider")
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as exc:
        raise InputError(f"ONNX Runtime cannot load {path}: {str(exc).splitlines()[0]}") from exc


ORT_TYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_, "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
}


def onnx_runner(loaded: LoadedModel, device: str = "cpu", options: Any = None) -> Runner:
    """An ONNX Runtime runner; `options` (SessionOptions) e.g. to pin the thread count in benchmarks."""
    session = onnx_session(loaded.path, device, options)
    graph_inputs = {i.name: ORT_TYPES.get(i.type) for i in session.get_inputs()}
    output_names = [o.name for o in session.get_outputs()]
    runner = Runner(loaded.reference, "onnxruntime", device, list(graph_inputs), lambda _: {})

    def call(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [name for name in graph_inputs if name not in inputs]
        if missing:
            raise InputError(f"{loaded.reference} needs inputs that were not given: {', '.join(missing)}")
        runner.dropped_inputs = [name for name in inputs if name not in graph_inputs]
        feed = {name: np.asarray(inputs[name]).astype(dtype or inputs[name].dtype, copy=False)
                for name, dtype in graph_inputs.items()}
        return dict(zip(output_names, session.run(output_names, feed), strict=True))

    runner.call = call
    return runner
