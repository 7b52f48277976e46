"""Multiply-accumulates (MACs) of a real forward pass, per module path, attention matmuls included.

Why our own counter: torchinfo's "mult-adds" are derived from parameter counts (a Linear ignores the
sequence dimension, tied weights count twice, functional matmuls are invisible), and torch's
`FlopCounterMode` has no formula for the attention kernels that run on CPU
(`_scaled_dot_product_flash_attention_for_cpu`, the math kernel, or `scaled_dot_product_attention` itself
under inference mode), so it silently reports transformers without their q·kᵀ and attention·v products.

This counter watches every aten op of one forward pass (a TorchDispatchMode, like FlopCounterMode),
uses torch's own formulas for matmuls and convolutions, adds formulas for every attention op, and
attributes each op to the module paths running it (paths as in `named_modules()`, "" for the root).

Convention: one MAC is one multiply plus one add, so FLOPs = 2 x MACs. Counted: matrix products (mm,
addmm, bmm, baddbmm, scaled mm), convolutions, attention (both products; causal masks counted in full,
as dense kernels compute them), PyTorch's fused multi-head-attention/encoder-layer fast paths. Not
counted: elementwise ops, normalisation, softmax, pooling, bias adds, and embeddings (lookups, 0 MACs).

The same pass can record each module's output shapes and estimate activation memory, so a summary needs
one instrumented forward, not three.
"""

from __future__ import annotations

import math
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

ATTENTION_OPS = (
    "scaled_dot_product_attention",  # reaches the dispatcher whole under inference_mode
    "_scaled_dot_product_flash_attention_for_cpu",  # what SDPA runs on CPU under no_grad
    "_scaled_dot_product_attention_math",
    "_scaled_dot_product_attention_math_for_mps",
    "_scaled_dot_product_fused_attention_overrideable",
    "_scaled_dot_product_flash_attention",  # CUDA kernels: torch has formulas; listed so they count as attention
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
    "_flash_attention_forward",
    "_efficient_attention_forward",
    "flex_attention",
)


@dataclass(frozen=True)
class MacCount:
    """MACs of one forward pass at the given inputs (all examples of the batch together)."""

    macs: int
    by_module: dict[str, int] = field(default_factory=dict)  # module path ("" = whole model) -> MACs inside it
    by_op: dict[str, int] = field(default_factory=dict)  # aten op name -> MACs
    uncounted: tuple[str, ...] = ()  # ops with a formula whose MACs could not be computed (e.g. nested tensors)

    @property
    def flops(self) -> int:
        """Floating-point operations: a multiply and an add per MAC."""
        return 2 * self.macs

    @property
    def attention_macs(self) -> int:
        """MACs of attention products (q·kᵀ and attention·v), the part other counters miss."""
        return sum(macs for op, macs in self.by_op.items() if op.removeprefix("aten.") in ATTENTION_OPS)


@dataclass(frozen=True)
class ModuleCall:
    """What one module did in the pass: how often it ran and the shapes of its first call's outputs."""

    calls: int
    output_shapes: tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class ForwardProfile:
    """One instrumented forward pass: MACs, per-module calls/shapes, activation memory (bytes)."""

    macs: MacCount
    modules: dict[str, ModuleCall]
    activation_peak_bytes: int | None  # most intermediate-tensor bytes alive at once (inference needs this)
    activation_total_bytes: int | None  # all intermediate tensors produced (a training step keeps up to this)


# ---------------------------------------------------------------- formulas (return MACs)


def _shape(tensor: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in tensor.shape)


def attention_macs(query: Any, key: Any, value: Any) -> int:
    """q·kᵀ plus attention·v for (..., heads, L, E) inputs; grouped-query heads handled (keys broadcast)."""
    q, k, v = _shape(query), _shape(key), _shape(value)
    rows = math.prod(q[:-1])  # every (batch, head, query position)
    return rows * k[-2] * q[-1] + rows * k[-2] * v[-1]


def _sdpa_macs(args: tuple, kwargs: dict, out: Any) -> int:
    query = args[0] if args else kwargs["query"]
    key = args[1] if len(args) > 1 else kwargs["key"]
    value = args[2] if len(args) > 2 else kwargs["value"]
    return attention_macs(query, key, value)


def _native_mha_macs(args: tuple, kwargs: dict, out: Any) -> int:
    """nn.MultiheadAttention's fused eval path: q/k/v projections, attention, output projection."""
    query, key = args[0], args[1]
    *batch, length, embed = _shape(query)
    source = _shape(key)[-2]
    rows = math.prod(batch)
    projections = rows * (length + 2 * source) * embed * embed + rows * length * embed * embed
    return projections + 2 * rows * length * source * embed


def _encoder_layer_macs(args: tuple, kwargs: dict, out: Any) -> int:
    """nn.TransformerEncoderLayer's fused eval path: self-attention block plus the feed-forward block."""
    src, ffn_weight_1 = args[0], args[14]
    *batch, length, embed = _shape(src)
    hidden = _shape(ffn_weight_1)[0]
    attention = _native_mha_macs((src, src), {}, None)
    return attention + 2 * math.prod(batch) * length * embed * hidden


def _torch_formula(formula: Callable[..., int]) -> Callable[[tuple, dict, Any], int]:
    """Wrap one of torch's flop_registry formulas (which count 2 FLOPs per MAC)."""

    def macs(args: tuple, kwargs: dict, out: Any) -> int:
        return int(formula(*args, **kwargs, out_val=out)) // 2

    return macs


def _formulas() -> dict[Any, Callable[[tuple, dict, Any], int]]:
    table: dict[Any, Callable[[tuple, dict, Any], int]] = {
        packet: _torch_formula(formula) for packet, formula in flop_registry.items()}
    for name in ATTENTION_OPS:
        packet = getattr(torch.ops.aten, name) if hasattr(torch.ops.aten, name) else None
        if packet is not None and packet not in table:
            table[packet] = _sdpa_macs
    table[torch.ops.aten._native_multi_head_attention] = _native_mha_macs
    table[torch.ops.aten._transformer_encoder_layer_fwd] = _encoder_layer_macs
    return table


_FORMULAS: dict[Any, Callable[[tuple, dict, Any], int]] = {}


def formulas() -> dict[Any, Callable[[tuple, dict, Any], int]]:
    """aten op packet -> MAC formula (built once)."""
    if not _FORMULAS:
        _FORMULAS.update(_formulas())
    return _FORMULAS


# ---------------------------------------------------------------- the instrumented pass


def output_shapes(value: Any) -> tuple[tuple[int, ...], ...]:
    """Shapes of the tensors in a module output (tensor, tuple, dict or Hugging Face ModelOutput)."""
    if isinstance(value, torch.Tensor):
        return (_shape(value),) if not value.is_nested else ()
    if isinstance(value, Mapping):  # ModelOutput is an OrderedDict
        return tuple(shape for item in value.values() for shape in output_shapes(item))
    if isinstance(value, (tuple, list)):
        return tuple(shape for item in value for shape in output_shapes(item))
    return ()


class _ActivationTracker:
    """Live bytes of tensors created during the pass, by storage (views and in-place results share one).

    Parameters, buffers and inputs are excluded: only what the forward itself allocates is counted.
    A storage is released when the last tensor we saw on it is garbage-collected.
    """

    def __init__(self, excluded: set[int]) -> None:
        self.excluded = excluded
        self.refs: dict[int, int] = {}
        self.sizes: dict[int, int] = {}
        self.current = self.peak = self.total = 0
        self.active = True

    def track(self, value: Any) -> None:
        if isinstance(value, torch.Tensor):
            self._add(value)
        elif isinstance(value, (tuple, list)):
            for item in value:
                self.track(item)

    def _add(self, tensor: torch.Tensor) -> None:
        tensor = _local(tensor)
        if tensor.is_nested or tensor.device.type == "meta":
            return
        storage = tensor.untyped_storage()
        try:
            pointer = storage.data_ptr()
        except RuntimeError:  # a pending collective's result (tensor parallelism) has no storage yet
            return
        if pointer == 0 or pointer in self.excluded:
            return
        if pointer not in self.refs:
            self.refs[pointer] = 0
            self.sizes[pointer] = storage.nbytes()
            self.current += storage.nbytes()
            self.total += storage.nbytes()
            self.peak = max(self.peak, self.current)
        self.refs[pointer] += 1
        weakref.finalize(tensor, self._release, pointer)

    def _release(self, pointer: int) -> None:
        if not self.active or pointer not in self.refs:
            return
        self.refs[pointer] -= 1
        if self.refs[pointer] == 0:
            del self.refs[pointer]
            self.current -= self.sizes.pop(pointer)


class _CountingMode(TorchDispatchMode):
    """Sees every aten op: counts MACs of ops with a formula, decomposes the others to find their matmuls."""

    def __init__(self, profiler: _Profiler) -> None:
        super().__init__()
        self.profiler = profiler

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        formula = formulas().get(func._overloadpacket)
        if formula is None and func is not torch.ops.prim.device.default:
            with self:
                result = func.decompose(*args, **kwargs)
            if result is not NotImplemented:
                return result
        out = func(*args, **kwargs)
        if formula is not None:
            try:
                macs = formula(args, kwargs, out)
            except (RuntimeError, ValueError, TypeError, IndexError, AssertionError):
                self.profiler.uncounted.add(str(func._overloadpacket))
            else:
                self.profiler.add(str(func._overloadpacket), macs)
        if self.profiler.memory is not None:
            self.profiler.memory.track(out)
        return out


class _Profiler:
    """Module stack (global forward hooks) + counting mode; one per pass."""

    def __init__(self, root: Any, *, by_module: bool, record_shapes: bool, memory: _ActivationTracker | None):
        self.paths = {id(module): path for path, module in root.named_modules()} if by_module else {}
        self.record_shapes = record_shapes
        self.memory = memory
        self.stack: list[str] = []
        self.total = 0
        self.by_module: dict[str, int] = defaultdict(int)
        self.by_op: dict[str, int] = defaultdict(int)
        self.calls: dict[str, int] = defaultdict(int)
        self.shapes: dict[str, tuple[tuple[int, ...], ...]] = {}
        self.uncounted: set[str] = set()

    def add(self, op: str, macs: int) -> None:
        self.total += macs
        self.by_op[op] += macs
        for path in set(self.stack):
            self.by_module[path] += macs

    def _enter(self, module: Any, inputs: Any) -> None:
        path = self.paths.get(id(module))
        if path is not None:
            self.stack.append(path)
            self.calls[path] += 1

    def _exit(self, module: Any, inputs: Any, output: Any) -> None:
        path = self.paths.get(id(module))
        if path is None:
            return
        if self.stack and self.stack[-1] == path:
            self.stack.pop()
        elif path in self.stack:  # an exception unwound inner modules without their hooks
            del self.stack[len(self.stack) - 1 - self.stack[::-1].index(path):]
        if self.record_shapes and path not in self.shapes:
            self.shapes[path] = output_shapes(output)

    def hooks(self, stack: ExitStack) -> None:
        from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

        if self.paths:
            stack.callback(register_module_forward_pre_hook(self._enter).remove)
            stack.callback(register_module_forward_hook(self._exit, always_call=True).remove)


# ---------------------------------------------------------------- calling a module


def to_tensors(inputs: Mapping[str, Any], device: Any = None) -> dict[str, torch.Tensor]:
    """numpy arrays or tensors -> tensors on `device` (the module's device when None)."""
    result = {}
    for name, value in inputs.items():
        tensor = value if isinstance(value, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(value))
        result[name] = tensor.to(device) if device is not None else tensor
    return result


def module_device(module: Any) -> torch.device:
    if getattr(module, "hf_device_map", None):  # placed by accelerate (--device-map): its weights may be on meta
        from mlops_cli.core.runtimes import input_device

        return torch.device(input_device(module))
    for tensor in _module_tensors(module):
        return tensor.device
    return torch.device("cpu")


def _module_tensors(module: Any) -> Iterator[torch.Tensor]:
    for tensor in [*module.parameters(), *module.buffers()]:
        yield _local(tensor)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of a tensor-parallel DTensor (`--tp-plan`), which has no storage of its own."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


def module_caller(module: Any) -> Callable[[Mapping[str, torch.Tensor]], Any]:
    """A function calling `module` the way its inputs are named (resolved once, so timing loops stay lean).

    Keywords when its forward takes those names, else in order. A torch.export module checks calls against
    its exported (positional) signature, so it gets them in order. Models with a `use_cache` argument get
    `use_cache=False`: a key/value cache is not part of one forward pass.
    """
    from mlops_cli.core import runtimes

    names = runtimes.forward_parameter_names(module)
    if getattr(module, "_in_spec", None) is not None:  # torch.export's unlifted module
        names = None
    extra = {"use_cache": False} if names and "use_cache" in names else {}

    def call(tensors: Mapping[str, torch.Tensor]) -> Any:
        return runtimes.call_module(module, names, dict(tensors), extra)

    return call


def call_module(module: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Call `module` once on named tensors (see `module_caller`)."""
    return module_caller(module)(tensors)


def profile_forward(module: Any, inputs: Mapping[str, Any], *, by_module: bool = True, record_shapes: bool = False,
                    track_memory: bool = False) -> ForwardProfile:
    """Run one forward pass (no grad) with MAC counting, and optionally output shapes and activation memory."""
    tensors = to_tensors(inputs, module_device(module))
    memory = None
    if track_memory:
        excluded = {t.untyped_storage().data_ptr() for t in [*_module_tensors(module), *tensors.values()]}
        memory = _ActivationTracker(excluded)
    profiler = _Profiler(module, by_module=by_module, record_shapes=record_shapes, memory=memory)
    with ExitStack() as stack:
        stack.enter_context(torch.no_grad())
        profiler.hooks(stack)
        stack.enter_context(_CountingMode(profiler))
        output = call_module(module, tensors)
    del output
    peak = total = None
    if memory is not None:
        peak, total = memory.peak, memory.total
        memory.active = False
    macs = MacCount(profiler.total, dict(profiler.by_module), dict(profiler.by_op), tuple(sorted(profiler.uncounted)))
    modules = {path: ModuleCall(count, profiler.shapes.get(path, ())) for path, count in profiler.calls.items()}
    return ForwardProfile(macs, modules, peak, total)


def count_macs(module: Any, inputs: Mapping[str, Any], *, by_module: bool = True) -> MacCount:
    """MACs of one forward pass of `module` on `inputs` (dict of numpy arrays or tensors), attention included."""
    return profile_forward(module, inputs, by_module=by_module).macs
