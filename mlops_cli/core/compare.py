"""Numeric comparison of two output sets: statistics, tolerances, agreement criteria, attention-mask awareness.

Tolerance semantics (stated in every command's help): an element passes when
|candidate - reference| <= atol + rtol * |reference|.

A precision preset (fp32, fp16, bf16, int8) makes that bound scale-aware and adds task-level criteria:
the logits of a trained LM are tens in magnitude, so an fp32 export differing by 3e-4 is rounding, not a bug.
Under a preset, atol grows to `scale x max|reference|` of each output where that is larger, and the output must
also reach the preset's cosine similarity and, for logits-like outputs, its top-1 (argmax) and greedy next-token
agreement. Explicit --atol/--rtol keep their plain meaning: the element-wise bound as given, nothing else.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

PRESETS = {  # (atol, rtol) suitable for each kind of candidate
    "fp32": (1e-4, 1e-3),
    "fp16": (1e-2, 1e-2),
    "bf16": (5e-2, 2e-2),
    "int8": (1e-1, 5e-2),
}


@dataclass(frozen=True)
class Agreement:
    """What a preset asks beyond the element-wise bound, and how far its atol grows with an output's magnitude."""

    scale: float  # atol is at least scale * max|reference| of the output
    cosine: float  # minimum cosine similarity of the whole output
    top1: float  # minimum argmax agreement of logits-like outputs (per position, and greedy next token),
    # judged over the positions of all input sets together: one flip in a batch-1 set of 8 positions is no evidence


AGREEMENT = {  # rounding of fp32 kernels, then 10-bit, 7-bit and 8-bit-integer weights
    "fp32": Agreement(scale=5e-5, cosine=0.99999, top1=1.0),
    "fp16": Agreement(scale=5e-3, cosine=0.9999, top1=0.99),
    "bf16": Agreement(scale=3e-2, cosine=0.999, top1=0.98),
    "int8": Agreement(scale=1e-1, cosine=0.99, top1=0.9),
}
PRECISION_ORDER = tuple(PRESETS)  # from the most to the least precise

ELEMENTWISE, COSINE, TOP1, NEXT_TOKEN = "element-wise", "cosine", "top-1", "next token"


@dataclass(frozen=True)
class Criterion:
    """One check of one output: `value rule threshold` (e.g. cosine 0.999998 >= 0.99999).

    The element-wise check's value is the atol the output needs (max of |diff| - rtol*|ref|), its threshold the
    atol allowed (the preset's, grown with the output's magnitude, or the user's).
    """

    name: str
    value: float
    threshold: float
    rule: str  # ">=" or "<="
    passed: bool


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
    scale: float | None = None  # max |reference| over the compared elements
    effective_atol: float | None = None  # the atol applied: max(atol, preset scale * scale) under a preset
    next_token_agreement: float | None = None  # greedy next token (last real position) of LM logits
    criteria: tuple[Criterion, ...] = ()  # judged on this input set (element-wise, cosine)
    top1_counts: tuple[int, int] | None = None  # (agreeing, compared) positions of a logits-like output
    next_token_counts: tuple[int, int] | None = None  # (agreeing, compared) rows

    @property
    def failed_criterion(self) -> Criterion | None:
        return next((c for c in self.criteria if not c.passed), None)


def mask_for(output: np.ndarray, attention_mask: np.ndarray | None) -> np.ndarray | None:
    """A boolean mask selecting the real (unpadded) positions of an output shaped (batch, seq, ...)."""
    if attention_mask is None or attention_mask.ndim != 2 or output.ndim < 2:
        return None
    if output.shape[:2] != attention_mask.shape:
        return None
    return np.broadcast_to(attention_mask.astype(bool).reshape(attention_mask.shape + (1,) * (output.ndim - 2)),
                           output.shape)


def compare_arrays(name: str, reference: np.ndarray, candidate: np.ndarray, atol: float, rtol: float,
                   attention_mask: np.ndarray | None = None, agreement: Agreement | None = None) -> OutputDiff:
    """Compare one output; positions the attention mask marks as padding are excluded when a mask is given.

    Without `agreement` the element-wise bound is the only check (plain --atol/--rtol); with it the bound is
    scale-aware and the preset's criteria apply too.
    """
    ref_shape, cand_shape = tuple(reference.shape), tuple(candidate.shape)
    if ref_shape != cand_shape:
        return OutputDiff(name, ref_shape, cand_shape, atol, rtol, False,
                          problem=f"shape mismatch: reference {ref_shape} vs candidate {cand_shape}")
    ref = reference.astype(np.float64)
    cand = candidate.astype(np.float64)
    selection = mask_for(reference, attention_mask)
    row_mask = attention_mask if selection is not None else None
    masked_out = 0
    top1_counts = _top1_counts(ref, cand, row_mask)
    next_token_counts = _next_token_counts(ref, cand, row_mask)
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
    scale = float(np.abs(ref).max())
    effective_atol = max(atol, agreement.scale * scale) if agreement else atol
    norm = float(np.linalg.norm(ref) * np.linalg.norm(cand))
    cosine = float(np.dot(ref, cand) / norm) if norm > 0 else (1.0 if not diff.any() else 0.0)
    needed = float(max(0.0, (diff - rtol * np.abs(ref)).max()))
    logits = _logits_like(name, ref_shape)
    criteria = [Criterion(ELEMENTWISE, needed, effective_atol, "<=", needed <= effective_atol)]
    if agreement and scale > atol:  # the direction of values all within the noise floor says nothing
        criteria.append(Criterion(COSINE, cosine, agreement.cosine, ">=", cosine >= agreement.cosine))
    return OutputDiff(
        name, ref_shape, cand_shape, atol, rtol,
        passed=all(c.passed for c in criteria),
        max_abs=float(diff.max()),
        max_rel=float((diff / np.maximum(np.abs(ref), 1e-12)).max()),
        mean_abs=float(diff.mean()),
        p99_abs=float(np.percentile(diff, 99)),
        cosine=cosine,
        top1_agreement=_share(top1_counts),
        min_atol_to_pass=needed,
        elements=int(ref.size),
        masked_out=masked_out,
        scale=scale,
        effective_atol=effective_atol,
        next_token_agreement=_share(next_token_counts),
        criteria=tuple(criteria),
        top1_counts=top1_counts if logits else None,
        next_token_counts=next_token_counts if logits else None,
    )


def agreement_criteria(agreement: Agreement, diffs: list[OutputDiff]) -> list[Criterion]:
    """The preset's decision checks for one output, over the positions of all its input sets together."""
    criteria = []
    for name, counts in ((TOP1, [d.top1_counts for d in diffs]), (NEXT_TOKEN, [d.next_token_counts for d in diffs])):
        pooled = [c for c in counts if c is not None]
        compared = sum(total for _, total in pooled)
        if compared:
            value = sum(agree for agree, _ in pooled) / compared
            criteria.append(Criterion(name, value, agreement.top1, ">=", value >= agreement.top1))
    return criteria


def _share(counts: tuple[int, int] | None) -> float | None:
    return counts[0] / counts[1] if counts and counts[1] else None


# Outputs whose argmax is the answer: HF logits (start_logits...), scores, and the single unnamed output of a
# plain classifier; 2-D (batch, classes) or 3-D (batch, sequence, vocabulary).
_LOGITS_NAME = re.compile(r"logit|score|^(output|out)_?\d*$", re.IGNORECASE)


def _logits_like(name: str, shape: tuple[int, ...]) -> bool:
    reference_name = name.split(" ~ ")[0]
    return bool(_LOGITS_NAME.search(reference_name)) and len(shape) in (2, 3) and shape[-1] >= 2


def _top1_counts(ref: np.ndarray, cand: np.ndarray, attention_mask: np.ndarray | None) -> tuple[int, int] | None:
    """(agreeing, compared) positions whose argmax over the last axis agrees (for logits-like outputs)."""
    if ref.ndim < 2 or ref.shape[-1] < 2 or not np.isfinite(ref).all() or not np.isfinite(cand).all():
        return None
    agree = ref.argmax(-1) == cand.argmax(-1)
    if attention_mask is not None and agree.shape == attention_mask.shape:
        agree = agree[attention_mask.astype(bool)]
    return (int(agree.sum()), int(agree.size)) if agree.size else None


def _next_token_counts(ref: np.ndarray, cand: np.ndarray, attention_mask: np.ndarray | None
                       ) -> tuple[int, int] | None:
    """Greedy decoding's view of LM logits (batch, sequence, vocabulary): does each row's last real position
    pick the same next token?"""
    if ref.ndim != 3 or ref.shape[-1] < 2 or not np.isfinite(ref).all() or not np.isfinite(cand).all():
        return None
    batch, sequence = ref.shape[:2]
    last = np.full(batch, sequence - 1)
    if attention_mask is not None and attention_mask.shape == (batch, sequence):
        real = attention_mask.astype(bool)
        last = np.where(real.any(1), sequence - 1 - real[:, ::-1].argmax(1), sequence - 1)
    rows = np.arange(batch)
    return int((ref[rows, last].argmax(-1) == cand[rows, last].argmax(-1)).sum()), batch
