"""What precision a model's weights carry, for `--preset auto`: the candidate's precision picks the tolerances.

fp16/bf16 weights are recognised stored as such or rounded to them inside a float32 model (a half checkpoint
loaded into a float32 architecture keeps its rounded values); int8 by quantised layers or ONNX quantisation
operators; anything else is fp32.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mlops_cli.core.compare import PRECISION_ORDER

# ONNX operators of quantised graphs (QDQ and integer-op formats, ONNX Runtime contrib ops).
_QUANT_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger",
              "QLinearMatMul", "QLinearConv", "DynamicQuantizeMatMul", "MatMulNBits", "QAttention", "QGemm"}


def auto_precision(*models: Any) -> tuple[str, str]:
    """`--preset auto`: the least precise of the given loaded models (the candidate first), and why."""
    found = [(model_precision(model), model) for model in models]
    (name, why), model = max(found, key=lambda item: PRECISION_ORDER.index(item[0][0]))
    return name, f"auto: {why}" if name == "fp32" else f"auto: {model.reference} has {why}"


def model_precision(loaded: Any) -> tuple[str, str]:
    """The precision a loaded model's weights carry: (preset name, what shows it)."""
    if loaded.module is not None:
        return module_precision(loaded.module)
    if loaded.path is not None:
        return onnx_precision(loaded.path)
    return "fp32", "no weights to inspect"


def module_precision(module: Any) -> tuple[str, str]:
    """int8 for quantised layers; fp16/bf16 for weights stored in, or rounded to, half precision (a checkpoint
    of fp16 weights loaded into a float32 model keeps fp16 values); fp32 otherwise."""
    import torch

    quantized = [type(m).__name__ for m in module.modules() if ".quantized" in type(m).__module__]
    if quantized:
        return "int8", f"quantised (int8) layers ({quantized[0]})"
    weights = [p.detach() for p in module.parameters() if p.is_floating_point() and p.dim() >= 2
               and p.device.type != "meta"]  # offloaded by --device-map: judged by the weights in memory
    total = sum(w.numel() for w in weights)
    for dtype, name in ((torch.bfloat16, "bf16"), (torch.float16, "fp16")):
        stored = sum(w.numel() for w in weights if w.dtype == dtype)
        rounded = sum(w.numel() for w in weights if w.dtype != dtype and torch.equal(w, w.to(dtype).to(w.dtype)))
        if total and 2 * stored > total:
            return name, f"{str(dtype).removeprefix('torch.')} weights"
        if total and 2 * (stored + rounded) > total:
            return name, f"weights rounded to {str(dtype).removeprefix('torch.')}"
    return "fp32", "float32 weights"


def onnx_precision(path: Any) -> tuple[str, str]:
    """int8 for quantisation operators; fp16/bf16 when most weight elements are stored in half precision."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    quant = sorted({node.op_type for node in graph.node} & _QUANT_OPS)
    if quant:
        return "int8", _quantised_weights(graph, quant)
    counts: dict[int, int] = {}
    for init in graph.initializer:
        counts[init.data_type] = counts.get(init.data_type, 0) + int(np.prod(init.dims, dtype=np.int64))
    kinds = onnx.TensorProto
    total = sum(counts.get(kind, 0) for kind in (kinds.FLOAT, kinds.FLOAT16, kinds.BFLOAT16, kinds.DOUBLE))
    for kind, name, label in ((kinds.BFLOAT16, "bf16", "bfloat16"), (kinds.FLOAT16, "fp16", "float16")):
        if total and 2 * counts.get(kind, 0) > total:
            return name, f"{label} weights in the graph"
    return "fp32", "float32 weights"


def _quantised_weights(graph: Any, quant: list[str]) -> str:
    """What the quantisation operators say: int4 (or intN) weights for MatMulNBits, by its `bits` attribute (the
    int8 preset's tolerances still apply: there is no coarser preset), else int8 operators."""
    bits = sorted({attribute.i for node in graph.node if node.op_type == "MatMulNBits"
                   for attribute in node.attribute if attribute.name == "bits"})
    if bits:
        return (f"weight-only int{'/'.join(map(str, bits))} (MatMulNBits; checked with the int8 preset's "
                "tolerances)")
    return f"quantisation operators ({', '.join(quant[:3])})"
