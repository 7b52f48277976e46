"""Per-layer drift for `compress half --per-layer`: the compressed model against the original, module by module.

Forward hooks capture every module's first output on both models; the report names the first layer whose error
jumps (not finite, original activations beyond the target dtype's range, or an error far above everything before
it), which is where to keep tensors in float32.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mlops_cli.core.safetensors_file import torch_dtype

JUMP_FACTOR = 10.0  # an error "jumps" when it is this many times the largest error before it...
JUMP_FLOOR = 1e-2  # ...and at least this large (relative L2 error), so rounding noise never counts


@dataclass(frozen=True)
class LayerDrift:
    """One module's output, compressed model vs original, in execution order."""

    index: int
    name: str
    type: str
    relative_error: float | None  # ||cand - ref|| / ||ref||; None when the candidate is not finite
    max_abs: float | None
    reference_max_abs: float  # largest |activation| of the original: beyond the target's range it overflows there
    nonfinite: bool
    beyond_range: bool
    shape: tuple[int, ...]


@dataclass(frozen=True)
class PerLayerReport:
    input_set: str
    layers: tuple[LayerDrift, ...]
    first_jump: str | None
    jump_reason: str | None
    worst: str | None
    jump_rule: str = (f"first layer whose output is not finite, whose original activations exceed the target "
                      f"dtype's range, or whose relative error is >= {JUMP_FACTOR:g}x the largest before it "
                      f"and >= {JUMP_FLOOR:g}")
    skipped: tuple[str, ...] = field(default_factory=tuple)


def first_tensor(value: Any) -> Any:
    """The first tensor of a module's output (a tensor, a tuple, or a ModelOutput)."""
    import torch

    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, dict) or hasattr(value, "to_tuple"):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        for item in value:
            found = first_tensor(item)
            if found is not None:
                return found
    return None


def capture_outputs(module: Any, run: Any) -> dict[str, tuple[str, Any]]:
    """Run `run()` with forward hooks on every submodule; {name: (type, first output as float32 CPU)}."""
    captured: dict[str, tuple[str, Any]] = {}
    handles = []

    def hook_for(name: str, kind: str) -> Any:
        def hook(_module: Any, _inputs: Any, output: Any) -> None:
            tensor = first_tensor(output)
            if name not in captured and tensor is not None and tensor.is_floating_point():
                captured[name] = (kind, tensor.detach().float().cpu())
        return hook

    for name, sub in module.named_modules():
        if name:
            handles.append(sub.register_forward_hook(hook_for(name, type(sub).__name__)))
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return captured


def compare_layers(reference: Any, candidate: Any, run_reference: Any, run_candidate: Any, label: str,
                   target: str) -> PerLayerReport:
    """Compare every module's output between the original and the compressed model; find the jump."""
    import torch

    ref_out = capture_outputs(reference, run_reference)
    cand_out = capture_outputs(candidate, run_candidate)
    limit = torch.finfo(torch_dtype(target)).max
    layers: list[LayerDrift] = []
    skipped: list[str] = []
    for name, (kind, ref) in ref_out.items():
        if name not in cand_out or tuple(cand_out[name][1].shape) != tuple(ref.shape):
            skipped.append(name)
            continue
        layers.append(_layer_drift(len(layers), name, kind, ref, cand_out[name][1], limit))
    jump, reason = _first_jump(layers, target, limit)
    finite = [layer for layer in layers if layer.relative_error is not None]
    worst = max(finite, key=lambda layer: layer.relative_error or 0.0).name if finite else None
    return PerLayerReport(label, tuple(layers), jump, reason, worst, skipped=tuple(skipped))


def _layer_drift(index: int, name: str, kind: str, ref: Any, cand: Any, limit: float) -> LayerDrift:
    import torch

    reference_max = float(ref.abs().max()) if ref.numel() else 0.0
    nonfinite = not bool(torch.isfinite(cand).all())
    if nonfinite or not ref.numel():
        return LayerDrift(index, name, kind, None, None, reference_max, nonfinite, reference_max > limit,
                          tuple(ref.shape))
    diff = (cand.double() - ref.double())
    relative = float(diff.norm() / max(float(ref.double().norm()), 1e-12))
    return LayerDrift(index, name, kind, relative, float(diff.abs().max()), reference_max, False,
                      reference_max > limit, tuple(ref.shape))


def _first_jump(layers: list[LayerDrift], target: str, limit: float) -> tuple[str | None, str | None]:
    largest_before = 0.0
    for layer in layers:
        if layer.nonfinite:
            return layer.name, "its output holds inf/NaN"
        if layer.beyond_range:
            return layer.name, (f"the original's activations reach {layer.reference_max_abs:.3g}, beyond "
                                f"{target}'s largest finite value {limit:.6g}: real {target} compute overflows here")
        error = layer.relative_error or 0.0
        if error >= JUMP_FLOOR and error >= JUMP_FACTOR * largest_before:
            return layer.name, (f"relative error {error:.3g} is {error / largest_before:.3g}x the largest before it "
                                f"({largest_before:.3g})" if largest_before else
                                f"relative error {error:.3g} at the first compared layer")
        largest_before = max(largest_before, error)
    return None, None
