"""The runtimes a model is benched on, each as a `Candidate`.

A candidate binds a set of inputs once (converted to tensors, cast, moved to the device) and returns the
zero-argument call that is timed, so the timed loop holds nothing but the model call. The same candidate also
gives a `Runner` (numpy in, named numpy out) for the parity check that comes before any timing.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from mlops_cli.core.errors import InputError, UsageError
from mlops_cli.core.loading import LoadedModel, ModelKind
from mlops_cli.core.runtimes import (
    ORT_TYPES,
    Runner,
    call_module,
    call_options,
    flatten_outputs,
    forward_parameter_names,
    onnx_runner,
    onnx_session,
)

EAGER, COMPILE, ORT, TORCHSCRIPT, PT2 = "eager", "compile", "onnxruntime", "torchscript", "pt2"
RUNTIMES = (EAGER, COMPILE, ORT, TORCHSCRIPT, PT2)
EXPORTED_RUNTIMES = (ORT, TORCHSCRIPT, PT2)  # need an artefact: exported into a temp folder, or given as MODEL
DTYPES = ("fp32", "fp16", "bf16", "int8")
HALF = ("fp16", "bf16")
ARTEFACT_RUNTIME = {ModelKind.ONNX: ORT, ModelKind.TORCHSCRIPT: TORCHSCRIPT, ModelKind.EXPORTED: PT2}
COMPILE_BACKEND = "inductor"  # torch.compile's backend (tests swap in a cheaper one)

BoundCall = Callable[[], Any]


@dataclass
class Candidate:
    """One runtime at one precision: `bind(inputs)` -> the call to time; `make_runner()` for the parity check."""

    runtime: str
    dtype: str
    device: str
    bind: Callable[[dict[str, np.ndarray]], BoundCall]
    make_runner: Callable[[], Runner]
    preset: str | None = "fp32"  # tolerances of its parity check vs eager; None: verified already (by its exporter)

    @property
    def label(self) -> str:
        return f"{self.runtime} {self.dtype}"


def torch_dtype(dtype: str) -> Any:
    """The torch dtype a half precision computes in (None for fp32 and int8, which take float32 inputs)."""
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(dtype)


def torch_candidate(runtime: str, dtype: str, loaded: LoadedModel, module: Any, device: str) -> Candidate:
    """A candidate over a torch module (eager, a variant of it, compiled, TorchScript, a torch.export program)."""
    import torch

    names = forward_parameter_names(loaded.module)
    extra = call_options(loaded, names)
    cast = torch_dtype(dtype)

    def bind(inputs: dict[str, np.ndarray]) -> BoundCall:
        tensors = {}
        for name, array in inputs.items():
            tensor = torch.from_numpy(np.ascontiguousarray(array)).to(device)
            tensors[name] = tensor.to(cast) if cast is not None and tensor.is_floating_point() else tensor

        def call() -> Any:
            with torch.inference_mode():
                return call_module(module, names, tensors, extra)

        return call

    def run(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return flatten_outputs(bind(inputs)())

    backend = {TORCHSCRIPT: "torchscript", PT2: "torch.export"}.get(runtime, "torch")
    runner = Runner(f"{runtime} {dtype}", backend, device, names, run)
    return Candidate(runtime, dtype, device, bind, lambda: runner, dtype)


def onnx_candidate(loaded: LoadedModel, device: str, threads: int) -> Candidate:
    """ONNX Runtime with `threads` intra-op threads, not spinning (it is timed interleaved with torch).

    The timed call is the bare `session.run` on a feed cast once; the parity check gets core's ONNX runner (a
    session of its own, made only when the check runs and released after it)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = onnx_session(loaded.path, device, options)
    graph_inputs = {i.name: ORT_TYPES.get(i.type) for i in session.get_inputs()}

    def bind(inputs: dict[str, np.ndarray]) -> BoundCall:
        missing = [name for name in graph_inputs if name not in inputs]
        if missing:
            raise InputError(f"{loaded.reference} needs inputs that were not given: {', '.join(missing)}")
        feed = {name: np.asarray(inputs[name]).astype(dtype or inputs[name].dtype, copy=False)
                for name, dtype in graph_inputs.items()}
        return lambda: session.run(None, feed)

    return Candidate(ORT, "fp32", device, bind, lambda: onnx_runner(loaded, device, options))


def artefact_candidate(loaded: LoadedModel, device: str, threads: int) -> Candidate:
    """The candidate for a loaded artefact: .onnx on ONNX Runtime, TorchScript, a .pt2 program."""
    if loaded.kind == ModelKind.ONNX:
        return onnx_candidate(loaded, device, threads)
    runtime = ARTEFACT_RUNTIME.get(loaded.kind)
    if runtime is None:
        raise UsageError(f"{loaded.reference} is not an exported artefact")
    return torch_candidate(runtime, "fp32", loaded, loaded.module, device)


def eager_variant(loaded: LoadedModel, dtype: str, device: str) -> Any:
    """The eager module at `dtype`: the model itself (fp32), a half copy, or a dynamic-int8 copy of its Linear
    layers (core/int8_state.quantize_torch; CPU only)."""
    module = loaded.module.to(device).eval()
    if dtype == "fp32":
        return module
    if dtype in HALF:
        return copy.deepcopy(module).to(torch_dtype(dtype))
    return quantize_linear_layers(copy.deepcopy(module))


def quantize_linear_layers(module: Any) -> Any:
    """Torch dynamic int8 over every Linear layer (GPT-2's Conv1D turned into Linear first)."""
    from mlops_cli.core.int8_state import Int8Layout, quantizable_kind, quantize_torch

    linear = {name: "linear" for name, sub in module.named_modules() if name and quantizable_kind(sub) == "linear"}
    if not linear:
        raise UsageError("int8: the model has no Linear layers to quantise")
    conv1d = tuple(name for name in linear if type(module.get_submodule(name)).__name__ == "Conv1D")
    return quantize_torch(module.cpu(), Int8Layout(linear, conv1d, per_channel=False)).eval()


def compiled(module: Any, device: str) -> Any:
    """torch.compile; on CUDA in reduce-overhead mode (CUDA graphs), which pays off for small batches."""
    import torch

    if COMPILE_BACKEND != "inductor":  # modes are inductor's
        return torch.compile(module, backend=COMPILE_BACKEND)
    return torch.compile(module, mode="reduce-overhead" if device.startswith("cuda") else None)
