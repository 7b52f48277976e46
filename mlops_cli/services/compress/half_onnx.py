"""fp32 -> fp16 for ONNX graphs, through ONNX Runtime's float16 converter, with its clamping counted.

The converter clamps values beyond +-65504 to it and raises tiny magnitudes to +-5.96e-08 instead of letting
them overflow or flush; both are counted per initializer (and Constant node) from the arrays before and after,
so the report shows what the converter did instead of hiding it. Nodes stay float32 when their name or one of
their initializers is kept by name (an ONNX graph has no module types), or when their op type normalises.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from mlops_cli.services.compress.cast import CastCounts, TensorPlan, TensorSafety, tensor_safety
from mlops_cli.services.compress.keep import BY_OP_TYPE, KeepRules

FP16_MAX = 65504.0
ORT_MIN_POSITIVE = 5.96e-08  # what ONNX Runtime's converter raises smaller non-zero magnitudes to
FP16_TINY = 6.103515625e-05
OVERFLOW_ACTION = "clamped to +-65504 by ONNX Runtime's converter"
UNDERFLOW_ACTION = "raised to +-5.96e-08 by ONNX Runtime's converter"
NORM_ONNX_OPS = ("LayerNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization",
                 "SkipSimplifiedLayerNormalization", "BatchNormalization", "InstanceNormalization",
                 "GroupNormalization", "RMSNormalization")


@dataclass(frozen=True)
class OnnxConversion:
    """The float16 graph (not written yet), what happened to every tensor, and which nodes stayed float32."""

    model: Any
    tensors: list[TensorSafety]
    note: str
    external_data: bool = False  # the source kept its weights in a `.data` file: so does the output


def convert_onnx(source: Path, keep: KeepRules, keep_io_types: bool) -> OnnxConversion:
    """Convert in memory; the caller decides whether to write (overflow may refuse it)."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    from mlops_cli.core.onnx_export import has_external_data, load_onnx

    model = load_onnx(source, infer_shapes=True)  # the converter's own inference fails past 2 GiB
    # Facts and counts per tensor, not copies of the weights: the model is in memory once as it is
    before = {name: _source_facts(array) for name, array in _onnx_tensors(model)}
    initializers = {init.name for init in model.graph.initializer}
    blocked_nodes = [node.name for node in model.graph.node if node.name and (
        keep.match(node.name) or any(keep.match(name) for name in node.input if name in initializers))]
    blocked_ops = list(DEFAULT_OP_BLOCK_LIST) + (list(NORM_ONNX_OPS) if keep.defaults_used else [])
    converted = convert_float_to_float16(model, keep_io_types=keep_io_types, op_block_list=blocked_ops,
                                         node_block_list=blocked_nodes, max_finite_val=FP16_MAX,
                                         min_positive_val=ORT_MIN_POSITIVE, disable_shape_infer=True)
    after = {name: _result_facts(array) for name, array in _onnx_tensors(converted)}
    tensors = [_onnx_safety(name, facts, after.get(name), keep) for name, facts in before.items()]
    note = (f"nodes kept in float32: {len(blocked_nodes)} by name/initializer pattern, plus op types "
            f"{', '.join(sorted(set(blocked_ops)))}; inputs/outputs "
            f"{'kept float32 (--keep-io-types)' if keep_io_types else 'converted to float16'}")
    return OnnxConversion(converted, tensors, note, has_external_data(source))


def save_onnx(conversion: OnnxConversion, output: Path, force: bool, sources: list[Path]) -> None:
    """Write the float16 graph atomically; its weights go to `<output>.data` when the source kept them apart
    or they pass the external-data threshold (one protobuf file cannot hold 2 GiB)."""
    from mlops_cli.core.onnx_export import atomic_onnx, needs_external_data, save_model_proto

    external = needs_external_data(conversion.model, conversion.external_data)
    with atomic_onnx(output, force, sources) as written:
        save_model_proto(conversion.model, written, external)


def _onnx_tensors(model: Any) -> Iterator[tuple[str, Any]]:
    """Initializers and Constant-node values of the main graph, as numpy arrays by name, one at a time."""
    from onnx import numpy_helper

    for init in model.graph.initializer:
        yield init.name, numpy_helper.to_array(init)
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value" and attribute.HasField("t"):
                    yield f"Constant:{node.output[0]}", numpy_helper.to_array(attribute.t)


@dataclass(frozen=True)
class _Facts:
    """One tensor before or after the converter: dtype, shape, and the counts that needed its values."""

    dtype: Any  # numpy dtype
    shape: tuple[int, ...]
    counts: CastCounts | None = None


def _source_facts(array: Any) -> _Facts:
    """A source tensor's dtype and shape; for float32 (what the converter casts) the overflow, underflow,
    non-finite and sentinel counts and the largest magnitude."""
    import numpy as np

    if array.dtype != np.float32:
        return _Facts(array.dtype, tuple(array.shape))
    values = array.astype(np.float64).ravel()
    finite = np.isfinite(values)
    magnitude = np.abs(np.where(finite, values, 0.0))
    sentinel = int((magnitude == np.finfo(array.dtype).max).sum())  # mask fills: the converter clamps them too
    counts = CastCounts(
        overflow=int((magnitude > FP16_MAX).sum()) - sentinel,
        underflow=int(((magnitude > 0) & (magnitude < ORT_MIN_POSITIVE)).sum()),
        nonfinite_source=int((~finite).sum()),
        max_abs=float(magnitude.max()) if magnitude.size else 0.0, sentinel=sentinel)
    return _Facts(array.dtype, tuple(array.shape), counts)


def _result_facts(array: Any) -> _Facts:
    """A converted tensor's dtype and shape; for float16 how many values became subnormal."""
    import numpy as np

    if array.dtype != np.float16:
        return _Facts(array.dtype, tuple(array.shape))
    out = np.abs(array.astype(np.float64).ravel())
    return _Facts(array.dtype, tuple(array.shape), CastCounts(subnormal=int(((out > 0) & (out < FP16_TINY)).sum())))


def _onnx_safety(name: str, source: _Facts, result: _Facts | None, keep: KeepRules) -> TensorSafety:
    """What ONNX Runtime's converter did to one tensor, with its clamping counted instead of hidden."""
    output = result or source
    sizes = (source.dtype.itemsize, output.dtype.itemsize)
    if not (source.dtype.name == "float32" and output.dtype.name == "float16"):
        return tensor_safety(name, source.shape, source.dtype.name, output.dtype.name,
                             _unconverted(name, source.dtype, keep), sizes)
    assert source.counts is not None and output.counts is not None
    counts = replace(source.counts, subnormal=output.counts.subnormal)
    return tensor_safety(name, source.shape, "float32", "float16", TensorPlan(True, "converted"), sizes, counts)


def _unconverted(name: str, dtype: Any, keep: KeepRules) -> TensorPlan:
    """Why the converter left a tensor as it was."""
    import numpy as np

    if not np.issubdtype(dtype, np.floating):
        return TensorPlan(False, "not floating-point")
    decision = keep.match(name)
    if decision is not None:
        return TensorPlan(False, decision.reason, decision.by)
    if dtype == np.float32:
        return TensorPlan(False, "kept float32: used only by nodes that stay float32", BY_OP_TYPE)
    return TensorPlan(False, f"left {dtype} by the converter")
