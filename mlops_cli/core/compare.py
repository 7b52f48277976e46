"""Numeric comparison of two output sets: statistics, tolerances, attention-mask awareness.

Tolerance semantics (stated in every command's help): an element passes when
|candidate - reference| <= atol + rtol * |reference|.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PRESETS = {  # (atol, rtol) suitable for each kind of candidate
    "fp32": (1e-4, 1e-3),
    "fp16": (1e-2, 1e-2),
    "bf16": (5e-2, 2e-2),
    "int8": (1e-1, 5e-2),
}


@dataclass(frozen=True)
class OutputDiff:
    """How one output of the candidate differs from the reference on one input set."""

    name: str
    reference_shape: tuple[int, ...]
    candidate_shape: tuple[int, ...]
    atol: float
    rtol: float
    passed: bool
    max_abs: float | None = None
    max_rel: float | None = None
    mean_abs: float | None = None
    p99_abs: float | None = None
    cosine: float | None = None
    top1_agreement: float | None = None
    min_atol_to_pass: float | None = None
    elements: int = 0
    masked_out: int = 0
    problem: str | None = None  # shape mismatch, NaN/inf, missing output


def mask_for(output: np.ndarray, attention_mask: np.ndarray | None) -> np.ndarray | None:
    """A boolean mask selecting the real (unpadded) positions of an output shaped (batch, seq, ...)."""
    if attention_mask is None or attention_mask.ndim != 2 or output.ndim < 2:
        return None
    if output.shape[:2] != attention_mask.shape:
        return None
    return np.broadcast_to(attention_mask.astype(bool).reshape(attention_mask.shape + (1,) * (output.ndim - 2)),
                           output.shape)


def compare_arrays(name: str, reference: np.ndarray, candidate: np.ndarray, atol: float, rtol: float,
                   attention_mask: np.ndarray | None = None) -> OutputDiff:
    """Compare one output; positions the attention mask marks as padding are excluded when a mask is given."""
    ref_shape, cand_shape = tuple(reference.shape), tuple(candidate.shape)
    if ref_shape != cand_shape:
        return OutputDiff(name, ref_shape, cand_shape, atol, rtol, False,
                          problem=f"shape mismatch: reference {ref_shape} vs candidate {cand_shape}")
    ref = reference.astype(np.float64)
    cand = candidate.astype(np.float64)
    selection = mask_for(reference, attention_mask)
    masked_out = 0
    top1 = _top1_agreement(ref, cand, attention_mask if selection is not None else None)
    if selection is not None:
        masked_out = int(selection.size - selection.sum())
        ref, cand = ref[selection], cand[selection]
    ref, cand = ref.ravel(), cand.ravel()
    for side, values in (("reference", ref), ("candidate", cand)):
        bad = int((~np.isfinite(values)).sum())
        if bad:
            return OutputDiff(name, ref_shape, cand_shape, atol, rtol, False, elements=ref.size, masked_out=masked_out,
                              problem=f"{bad} non-finite value(s) (NaN/inf) in the {side}")
    if ref.size == 0:
        return OutputDiff(name, ref_shape, cand_shape, atol, rtol, True, elements=0, masked_out=masked_out)
    diff = np.abs(cand - ref)
    allowed = atol + rtol * np.abs(ref)
    norm = float(np.linalg.norm(ref) * np.linalg.norm(cand))
    cosine = float(np.dot(ref, cand) / norm) if norm > 0 else (1.0 if not diff.any() else 0.0)
    return OutputDiff(
        name, ref_shape, cand_shape, atol, rtol,
        passed=bool((diff <= allowed).all()),
        max_abs=float(diff.max()),
        max_rel=float((diff / np.maximum(np.abs(ref), 1e-12)).max()),
        mean_abs=float(diff.mean()),
        p99_abs=float(np.percentile(diff, 99)),
        cosine=cosine,
        top1_agreement=top1,
        min_atol_to_pass=float(max(0.0, (diff - rtol * np.abs(ref)).max())),
        elements=int(ref.size),
        masked_out=masked_out,
    )


def _top1_agreement(ref: np.ndarray, cand: np.ndarray, attention_mask: np.ndarray | None) -> float | None:
    """Fraction of rows whose argmax over the last axis agrees (for logits-like outputs)."""
    if ref.ndim < 2 or ref.shape[-1] < 2 or not np.isfinite(ref).all() or not np.isfinite(cand).all():
        return None
    agree = ref.argmax(-1) == cand.argmax(-1)
    if attention_mask is not None and agree.shape == attention_mask.shape:
        agree = agree[attention_mask.astype(bool)]
    return float(agree.mean()) if agree.size else None
