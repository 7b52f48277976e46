"""Perplexity of a causal LM on a text, measured the same way wherever a command changes one.

One figure for every command that turns a causal LM into another one (`compress half/int8/int4`, `prune`,
`verify-parity`): the sliding-window perplexity of the original and of the result on the same tokens, its
relative change, and the share of positions where both predict the same greedy next token. A side is either a
transformers causal LM (PyTorch) or an ONNX decoder with a KV cache (`export onnx --task causal-lm`, scored
with an empty past, so one pass per window); both are scored through the same `score`, so the figures of a
PyTorch model and of its ONNX export are comparable.

The cost is bounded: `max_tokens` tokens of the text (512 by default) in windows of `window` tokens moving by
`stride`, so about a dozen forward passes of 128 tokens per side. Models that are not causal LMs get nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mlops_cli.core.errors import InputError, UsageError
from mlops_cli.core.loading import LoadedModel, ModelKind

CORPUS = Path(__file__).resolve().parents[1] / "data" / "corpus.txt"
LogitsFn = Callable[[np.ndarray], np.ndarray]  # token ids [1, L] -> logits [1, L, vocab]


@dataclass(frozen=True, kw_only=True)
class EvaluationText:
    """The text a causal LM's perplexity is measured on, and the sliding window it is scored with."""

    text_file: Path = CORPUS
    window: int = 128
    stride: int = 64
    max_tokens: int = 512

    def read(self) -> str:
        """The text (InputError, exit 3, when unreadable), read before a command writes anything."""
        if self.window < 2 or not 0 < self.stride <= self.window or self.max_tokens < 2:
            raise UsageError("need --window >= 2, 0 < --stride <= --window and --max-tokens >= 2")
        try:
            return Path(self.text_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"the evaluation text {self.text_file} could not be read: {exc}",
                             hint="Give a UTF-8 text file with --eval-text.") from exc


@dataclass(frozen=True)
class Scored:
    """One side scored on the text: mean negative log-likelihood per scored token, greedy prediction at each."""

    nll: float
    predictions: np.ndarray

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll)


@dataclass(frozen=True)
class PerplexityComparison:
    """The original (before) and the changed model (after) on the same tokens of the same text."""

    text: str
    tokens: int  # tokens of the text evaluated (the first one is context only)
    scored_tokens: int
    window: int
    stride: int
    before: float  # perplexity
    after: float
    relative_change: float  # after / before - 1
    greedy_agreement: float  # share of scored positions where both predict the same next token
    compute: str | None = None  # how the changed model was run, when it is not the obvious way


def sliding_windows(length: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) of each window: every token after the first is scored exactly once,
    each window moving on by `stride` new tokens and carrying the rest as context (at least one token, which
    predicts the window's first scored token, so a stride as long as the window moves by `window - 1`)."""
    step = max(1, min(stride, window - 1))
    end = min(window, length)
    spans = [(0, end, 1)]
    while end < length:
        first, end = end, min(end + step, length)
        spans.append((max(0, end - window), end, first))
    return spans


def score(logits_fn: LogitsFn, tokens: np.ndarray, window: int, stride: int) -> Scored:
    """Mean negative log-likelihood per scored token and the greedy prediction at each scored position."""
    total, predictions = 0.0, []
    for begin, end, first in sliding_windows(len(tokens), window, stride):
        logits = logits_fn(tokens[None, begin:end])[0].astype(np.float64)
        rows = logits[first - begin - 1:end - begin - 1]  # position p predicts token p + 1
        targets = tokens[first:end]
        shifted = rows - rows.max(axis=-1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
        total -= float(log_probs[np.arange(len(targets)), targets].sum())
        predictions.append(rows.argmax(-1))
    return Scored(total / (len(tokens) - 1), np.concatenate(predictions))


def torch_logits_fn(model: Any) -> LogitsFn:
    """A transformers causal LM, fed on the device its weights are on (no cache: one pass per window)."""
    import torch

    device = next(model.parameters()).device

    def logits(ids: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            output = model(input_ids=torch.from_numpy(ids).to(device), use_cache=False)
        return output.logits.float().cpu().numpy()

    return logits


def onnx_logits_fn(decoder: Any) -> LogitsFn:
    """An `OnnxDecoder` (ONNX graph with KV cache) given an empty past: the whole window in one pass."""
    def logits(ids: np.ndarray) -> np.ndarray:
        positions = np.arange(ids.shape[1], dtype=np.int64)[None]
        return np.asarray(decoder(ids, np.ones_like(ids), positions, decoder.empty_past(1))[0])

    return logits


def text_tokens(text: EvaluationText, tokenizer: Any) -> np.ndarray:
    """The evaluation text's first `max_tokens` token ids (InputError, exit 3, when unreadable or too short)."""
    tokens = np.asarray(tokenizer(text.read())["input_ids"][:text.max_tokens], dtype=np.int64)
    if len(tokens) < 2:
        raise InputError(f"the evaluation text {text.text_file} holds fewer than 2 tokens: nothing to score")
    return tokens


# ---------------------------------------------------------------- which models are causal LMs


def is_causal_lm(loaded: LoadedModel) -> bool:
    """A transformers causal LM in PyTorch, or an ONNX graph taking `past_key_values.*` (a KV-cache decoder)."""
    if loaded.kind == ModelKind.HF and loaded.module is not None:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        return type(loaded.module).__name__ in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    return is_kv_decoder(loaded) and "input_ids" in _onnx_inputs(loaded)


def is_kv_decoder(loaded: LoadedModel) -> bool:
    """An ONNX graph exported with its KV cache (`past_key_values.*` inputs): generated inputs cannot drive it
    (its attention mask must cover the past and the new tokens); generation and perplexity check it."""
    return any(name.startswith("past_key_values.") for name in _onnx_inputs(loaded))


def _onnx_inputs(loaded: LoadedModel) -> list[str]:
    if loaded.kind != ModelKind.ONNX or loaded.path is None:
        return []
    import onnx

    return [value.name for value in onnx.load(str(loaded.path), load_external_data=False).graph.input]


def logits_fn_for(loaded: LoadedModel) -> LogitsFn:
    """The scoring function of a causal LM (see `is_causal_lm`)."""
    if loaded.module is not None:
        return torch_logits_fn(loaded.module)
    from mlops_cli.services.onnx_lm.generate_onnx import OnnxDecoder

    assert loaded.path is not None
    return onnx_logits_fn(OnnxDecoder(loaded.path))


def find_tokenizer(*models: LoadedModel, folder: Path | None = None) -> Any:
    """The tokenizer in `folder` (the user's --tokenizer: one that cannot be loaded is an InputError, exit 3,
    naming it), else the first loaded with a model, else one beside an ONNX file (None if none is found there)."""
    if folder is not None:
        return explicit_tokenizer(folder)
    for model in models:
        if model.tokenizer is not None:
            return model.tokenizer
    from mlops_cli.services.onnx_lm.generate_onnx import load_text_side

    for place in [m.path.parent for m in models if m.path and m.path.is_file()]:
        try:
            return load_text_side(place).tokenizer
        except InputError:
            continue
    return None


def explicit_tokenizer(folder: Path) -> Any:
    """The tokenizer of the folder the user named with --tokenizer: a missing or unloadable one is an error
    (exit 3) rather than a perplexity silently not measured."""
    from mlops_cli.services.onnx_lm.generate_onnx import load_text_side

    try:
        return load_text_side(folder).tokenizer
    except InputError as exc:
        raise InputError(f"--tokenizer {folder}: {exc.message}",
                         hint="Name the HF folder holding the model's tokenizer files (tokenizer.json, "
                              "tokenizer_config.json), or drop --tokenizer to use the one beside the model.") from exc


def window_for(module: Any, window: int) -> int:
    """The window, no longer than the positions the model has (an HF config says; an ONNX graph does not)."""
    limit = getattr(getattr(module, "config", None), "max_position_embeddings", None)
    return min(window, limit) if isinstance(limit, int) and limit >= 2 else window


# ---------------------------------------------------------------- one comparison


@dataclass(frozen=True)
class PerplexityProbe:
    """The original model scored on the text once; each changed model is then compared with it."""

    text: EvaluationText
    tokens: np.ndarray
    window: int
    stride: int
    baseline: Scored

    @classmethod
    def of(cls, text: EvaluationText, reference: LogitsFn, tokenizer: Any, window: int | None = None
           ) -> PerplexityProbe:
        """Tokenise the text and score the reference; `window` caps the text's window (the model's positions)."""
        tokens = text_tokens(text, tokenizer)
        window = min(text.window, window or text.window)
        stride = min(text.stride, window)
        return cls(text, tokens, window, stride, score(reference, tokens, window, stride))

    def compare(self, candidate: LogitsFn | LoadedModel, compute: str | None = None) -> PerplexityComparison:
        """Score the changed model on the same tokens and windows, and compare it with the original."""
        logits = logits_fn_for(candidate) if isinstance(candidate, LoadedModel) else candidate
        after = score(logits, self.tokens, self.window, self.stride)
        return PerplexityComparison(
            text=str(self.text.text_file), tokens=len(self.tokens), scored_tokens=len(self.tokens) - 1,
            window=self.window, stride=self.stride, before=self.baseline.perplexity, after=after.perplexity,
            relative_change=math.exp(after.nll - self.baseline.nll) - 1,
            greedy_agreement=float((self.baseline.predictions == after.predictions).mean()), compute=compute)


def probe_for(text: EvaluationText | None, reference: LoadedModel, *others: LoadedModel, folder: Path | None = None,
              on_step: Callable[[str], None] | None = None) -> tuple[PerplexityProbe | None, str | None]:
    """The probe for a causal LM, or (None, why not) when it cannot be measured; (None, None) when the model is
    not a causal LM or measuring was switched off. `others` may lend their tokenizer."""
    if text is None or not is_causal_lm(reference):
        return None, None
    tokenizer = find_tokenizer(reference, *others, folder=folder)
    if tokenizer is None:
        return None, ("perplexity not measured: no usable tokenizer with the model nor beside it (save the tokenizer "
                      "files beside the model)")
    if on_step is not None:
        on_step("measuring perplexity")
    window = window_for(reference.module, text.window)
    return PerplexityProbe.of(text, logits_fn_for(reference), tokenizer, window), None
