"""Does an ONNX decoder generate what its PyTorch model generates? Token, logit and perplexity checks.

- Generation parity: greedy decoding of each prompt on both sides (PyTorch: our KV-cache loop, which is
  token-for-token `model.generate`; ONNX: the same loop on ONNX Runtime); the first step where the tokens
  differ is named with both tokens and how far apart their logits were on each side.
- Logit parity with the cache: both sides are fed the same tokens (the reference's greedy ones): the prompt
  pass, then N single-token passes through the KV cache; every pass's logits are compared with the parity
  engine's `compare_arrays`, so a graph that is right on the prompt but wrong once the cache is used is caught,
  and the first failing pass is named.
- Perplexity: sliding-window perplexity of both sides on a text, and the share of positions where their greedy
  next-token predictions agree.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mlops_cli.core.compare import OutputDiff, compare_arrays
from mlops_cli.core.contract import ModelRef, Report, ServiceOptions
from mlops_cli.core.errors import InputError, UsageError
from mlops_cli.core.parity import Tolerances
from mlops_cli.services.decoding import DecodingParams, decode
from mlops_cli.services.onnx_lm.generate_onnx import OnnxDecoder, load_text_side, onnx_decode

DEFAULT_PROMPTS = ("The model", "Once upon a time", "In the beginning")
CORPUS = Path(__file__).resolve().parents[2] / "data" / "corpus.txt"


# ---------------------------------------------------------------- generation parity


@dataclass(frozen=True)
class Divergence:
    """The first step (1 = first new token) where the candidate chose another token than the reference."""

    step: int
    reference_token: int
    candidate_token: int
    reference_text: str
    candidate_text: str
    reference_gap: float  # reference logit of its token - reference logit of the candidate's token (>= 0)
    candidate_gap: float  # candidate logit of its token - candidate logit of the reference's token (>= 0)


@dataclass(frozen=True)
class PassDiff:
    """Logits of one pass compared: pass 0 is the prompt pass, pass k the k-th single-token cached pass."""

    step: int
    diff: OutputDiff


@dataclass(frozen=True)
class PromptParity:
    prompt: str
    reference_tokens: tuple[int, ...]
    candidate_tokens: tuple[int, ...]
    divergence: Divergence | None
    passes: tuple[PassDiff, ...]

    @property
    def first_failing_pass(self) -> PassDiff | None:
        return next((p for p in self.passes if not p.diff.passed), None)

    @property
    def passed(self) -> bool:
        return self.divergence is None and self.first_failing_pass is None


@dataclass(frozen=True, kw_only=True)
class GenerationParityOptions(ServiceOptions):
    """`verify-parity MODEL model.onnx --generate`."""

    candidate: Path  # the ONNX decoder with KV cache
    prompts: tuple[str, ...] = DEFAULT_PROMPTS
    max_new_tokens: int = 16
    tolerances: Tolerances = field(default_factory=lambda: Tolerances.for_preset("fp32"))  # scale-aware fp32
    tokenizer: Path | None = None  # default: the reference's tokenizer


@dataclass(frozen=True, kw_only=True)
class GenerationParityReport(Report):
    reference: str
    candidate: str
    max_new_tokens: int
    atol: float
    rtol: float
    preset: str | None  # scale-aware bound and criteria (None: --atol/--rtol as given)
    prompts: tuple[PromptParity, ...]
    passed: bool
    verdict: str


def compare_generation(model: Any, decoder: OnnxDecoder, tokenizer: Any, prompts: Sequence[str],
                       max_new_tokens: int, tolerances: Tolerances) -> tuple[PromptParity, ...]:
    """Greedy tokens and per-pass logits of both sides, prompt by prompt (batch 1: no padding involved)."""
    params = DecodingParams(max_new_tokens=max_new_tokens)  # no EOS: every prompt runs all its steps
    results = []
    for prompt in prompts:
        input_ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        if input_ids.shape[1] == 0:
            raise UsageError(f"the prompt {prompt!r} encodes to no tokens")
        reference, ref_scores = _greedy(decode, model, input_ids, params)
        candidate, cand_scores = _greedy(onnx_decode, decoder, input_ids, params)
        prompt_length = int(input_ids.shape[1])
        ref_new, cand_new = reference[0, prompt_length:].tolist(), candidate[0, prompt_length:].tolist()
        divergence = _first_divergence(ref_new, cand_new, ref_scores, cand_scores, tokenizer)
        ref_logits = torch_passes(model, input_ids, ref_new)
        cand_logits = onnx_passes(decoder, input_ids, ref_new)
        atol, rtol = tolerances.for_output("logits")
        passes = tuple(PassDiff(step, compare_arrays(f"logits (pass {step})", r, c, atol, rtol,
                                                     agreement=tolerances.agreement))
                       for step, (r, c) in enumerate(zip(ref_logits, cand_logits, strict=True)))
        results.append(PromptParity(prompt, tuple(ref_new), tuple(cand_new), divergence, passes))
    return tuple(results)


def _greedy(decoder_loop: Callable[..., torch.Tensor], side: Any, input_ids: torch.Tensor,
            params: DecodingParams) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run one side's decoding loop, keeping each step's scores (the raw last-position logits when greedy)."""
    scores: list[torch.Tensor] = []
    sequences = decoder_loop(side, input_ids, None, params,
                             observers=[lambda _step, _tokens, step_scores: scores.append(step_scores[0].clone())])
    return sequences, scores


def _first_divergence(reference: list[int], candidate: list[int], ref_scores: list[torch.Tensor],
                      cand_scores: list[torch.Tensor], tokenizer: Any) -> Divergence | None:
    for index, (ref_token, cand_token) in enumerate(zip(reference, candidate, strict=False)):
        if ref_token != cand_token:
            ref_row, cand_row = ref_scores[index], cand_scores[index]
            return Divergence(
                step=index + 1, reference_token=ref_token, candidate_token=cand_token,
                reference_text=tokenizer.decode([ref_token]), candidate_text=tokenizer.decode([cand_token]),
                reference_gap=float(ref_row[ref_token] - ref_row[cand_token]),
                candidate_gap=float(cand_row[cand_token] - cand_row[ref_token]))
    if len(reference) != len(candidate):
        step = min(len(reference), len(candidate)) + 1
        return Divergence(step, -1, -1, "(ended)", "(ended)", math.nan, math.nan)
    return None


@torch.inference_mode()
def torch_passes(model: Any, input_ids: torch.Tensor, tokens: Sequence[int]) -> list[np.ndarray]:
    """Logits of the prompt pass, then of one cached pass per token of `tokens` but the last."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    length = int(input_ids.shape[1])
    takes_positions = "position_ids" in inspect.signature(model.forward).parameters

    def positions(start: int, stop: int) -> dict[str, torch.Tensor]:
        return {"position_ids": torch.arange(start, stop)[None]} if takes_positions else {}

    output = model(input_ids=input_ids, cache=cache, use_cache=True, return_dict=True, **positions(0, length))
    logits = [output.logits.float().numpy()]
    for token in tokens[:-1]:
        cache = output.get("cache", cache)
        output = model(input_ids=torch.tensor([[token]]), cache=cache, use_cache=True, return_dict=True,
                       **positions(length, length + 1))
        length += 1
        logits.append(output.logits.float().numpy())
    return logits


def onnx_passes(decoder: OnnxDecoder, input_ids: torch.Tensor, tokens: Sequence[int]) -> list[np.ndarray]:
    """The same passes on the ONNX graph, its presents fed back as the past."""
    ids = input_ids.numpy().astype(np.int64)
    length = ids.shape[1]
    logits, past = decoder(ids, np.ones_like(ids), np.arange(length, dtype=np.int64)[None], decoder.empty_past(1))
    results = [logits.astype(np.float32)]
    for token in tokens[:-1]:
        length += 1
        logits, past = decoder(np.array([[token]], dtype=np.int64), np.ones((1, length), dtype=np.int64),
                               np.array([[length - 1]], dtype=np.int64), past)
        results.append(logits.astype(np.float32))
    return results


def generation_verdict(prompts: Sequence[PromptParity]) -> str:
    """One line: all agree, or the first problem (token divergence first, then logits)."""
    for result in prompts:
        d = result.divergence
        if d is not None:
            return (f"prompt {result.prompt!r}: tokens diverge at step {d.step}: reference {d.reference_token} "
                    f"({d.reference_text!r}) vs candidate {d.candidate_token} ({d.candidate_text!r}); logit gap "
                    f"{d.reference_gap:.3g} on the reference, {d.candidate_gap:.3g} on the candidate")
    for result in prompts:
        failing = result.first_failing_pass
        if failing is not None:
            where = "the prompt pass" if failing.step == 0 else f"cached step {failing.step}"
            problem = failing.diff.problem or f"max |diff| {failing.diff.max_abs:.3g}"
            return f"prompt {result.prompt!r}: logits differ at {where}: {problem}"
    steps = sum(len(r.reference_tokens) for r in prompts)
    worst = max((p.diff.max_abs or 0.0 for r in prompts for p in r.passes), default=0.0)
    return (f"greedy tokens identical on {len(prompts)} prompt(s) ({steps} tokens); logits within tolerance on "
            f"every pass (worst max |diff| {worst:.3g})")


def parity_run(ref: ModelRef, options: GenerationParityOptions) -> GenerationParityReport:
    """`verify-parity MODEL model.onnx --generate`: the PyTorch model is the reference."""
    if options.max_new_tokens < 1:
        raise UsageError("--max-new-tokens must be at least 1")
    from mlops_cli.services.onnx_lm import seq2seq_generate, seq2seq_quality

    if seq2seq_generate.is_seq2seq_folder(options.candidate):  # written by export onnx --task seq2seq-lm
        return seq2seq_quality.parity_run(ref, options)
    model, tokenizer, warnings = _reference(ref, options.load, options.tokenizer)
    decoder = OnnxDecoder(options.candidate)
    options.on_step("generating")
    prompts = compare_generation(model, decoder, tokenizer, options.prompts, options.max_new_tokens,
                                 options.tolerances)
    return GenerationParityReport(
        reference=str(ref), candidate=str(options.candidate), max_new_tokens=options.max_new_tokens,
        atol=options.tolerances.atol, rtol=options.tolerances.rtol, preset=options.tolerances.preset,
        prompts=prompts, passed=all(p.passed for p in prompts),
        verdict=generation_verdict(prompts), warnings=tuple(warnings))


def _reference(ref: ModelRef, load: Any, tokenizer_folder: Path | None) -> tuple[Any, Any, list[str]]:
    """The PyTorch causal LM and its tokenizer (from the model, or `tokenizer_folder`)."""
    from dataclasses import replace

    from mlops_cli.core.loading import ModelKind, load_model

    loaded = load_model(ref, load if load.task else replace(load, task="causal-lm"))
    if loaded.kind != ModelKind.HF or loaded.module is None:
        raise InputError(f"{ref} is not a transformers causal LM", hint="The reference is the model's HF folder.")
    tokenizer = loaded.tokenizer
    if tokenizer_folder is not None or tokenizer is None:
        tokenizer = load_text_side(tokenizer_folder or loaded.path or Path(".")).tokenizer
    return loaded.module.eval(), tokenizer, list(loaded.warnings)


# ---------------------------------------------------------------- perplexity


@dataclass(frozen=True)
class Perplexity:
    backend: str
    perplexity: float
    mean_nll: float


@dataclass(frozen=True, kw_only=True)
class EvaluationText:
    """The text a causal LM's perplexity is measured on, and the sliding window it is scored with."""

    text_file: Path = CORPUS
    window: int = 128
    stride: int = 64
    max_tokens: int = 512


@dataclass(frozen=True, kw_only=True)
class PerplexityOptions(ServiceOptions, EvaluationText):
    candidate: Path | None = None  # an ONNX decoder to score beside the PyTorch model
    max_tokens: int = 1024


@dataclass(frozen=True, kw_only=True)
class PerplexityReport(Report):
    model: str
    text: str
    tokens: int
    scored_tokens: int
    window: int
    stride: int
    results: tuple[Perplexity, ...]
    greedy_agreement: float | None  # share of positions where both sides predict the same next token
    relative_change: float | None  # candidate perplexity / reference perplexity - 1


LogitsFn = Callable[[np.ndarray], np.ndarray]  # token ids [1, L] -> logits [1, L, vocab]


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


def score(logits_fn: LogitsFn, tokens: np.ndarray, window: int, stride: int) -> tuple[float, np.ndarray]:
    """(mean negative log-likelihood per scored token, greedy prediction at each scored position)."""
    total, predictions = 0.0, []
    for begin, end, first in sliding_windows(len(tokens), window, stride):
        logits = logits_fn(tokens[None, begin:end])[0].astype(np.float64)
        rows = logits[first - begin - 1:end - begin - 1]  # position p predicts token p + 1
        targets = tokens[first:end]
        shifted = rows - rows.max(axis=-1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
        total -= float(log_probs[np.arange(len(targets)), targets].sum())
        predictions.append(rows.argmax(-1))
    count = len(tokens) - 1
    return total / count, np.concatenate(predictions)


def torch_logits_fn(model: Any) -> LogitsFn:
    def logits(ids: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(input_ids=torch.from_numpy(ids), use_cache=False).logits.float().numpy()

    return logits


def onnx_logits_fn(decoder: OnnxDecoder) -> LogitsFn:
    def logits(ids: np.ndarray) -> np.ndarray:
        positions = np.arange(ids.shape[1], dtype=np.int64)[None]
        return decoder(ids, np.ones_like(ids), positions, decoder.empty_past(1))[0]

    return logits


def text_tokens(path: Path, tokenizer: Any, max_tokens: int) -> np.ndarray:
    """The evaluation text's first `max_tokens` token ids (InputError, exit 3, when unreadable or too short)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"the evaluation text {path} could not be read: {exc}",
                         hint="Give a UTF-8 text file with --eval-text.") from exc
    tokens = np.asarray(tokenizer(text)["input_ids"][:max_tokens], dtype=np.int64)
    if len(tokens) < 2:
        raise InputError(f"the evaluation text {path} holds fewer than 2 tokens: nothing to score")
    return tokens


def perplexity_run(ref: ModelRef, options: PerplexityOptions) -> PerplexityReport:
    """Perplexity of the PyTorch model (and of `candidate`, an ONNX export of it) on a text."""
    if options.window < 2 or not 0 < options.stride <= options.window or options.max_tokens < 2:
        raise UsageError("need --window >= 2, 0 < --stride <= --window and --max-tokens >= 2")
    model, tokenizer, warnings = _reference(ref, options.load, None)
    limit = getattr(model.config, "max_position_embeddings", None)
    window = min(options.window, limit) if isinstance(limit, int) else options.window
    tokens = text_tokens(options.text_file, tokenizer, options.max_tokens)
    stride = min(options.stride, window)
    options.on_step("scoring")
    nll, predictions = score(torch_logits_fn(model), tokens, window, stride)
    results = [Perplexity("torch", math.exp(nll), nll)]
    agreement = change = None
    if options.candidate is not None:
        cand_nll, cand_predictions = score(onnx_logits_fn(OnnxDecoder(options.candidate)), tokens, window, stride)
        results.append(Perplexity("onnxruntime", math.exp(cand_nll), cand_nll))
        agreement = float((predictions == cand_predictions).mean())
        change = math.exp(cand_nll - nll) - 1
    return PerplexityReport(
        model=str(ref), text=str(options.text_file), tokens=len(tokens), scored_tokens=len(tokens) - 1,
        window=window, stride=stride, results=tuple(results), greedy_agreement=agreement,
        relative_change=change, warnings=tuple(warnings))
