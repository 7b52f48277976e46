"""Does an ONNX decoder generate what its PyTorch model generates? Token, logit and perplexity checks.

- Generation parity: greedy decoding of each prompt on both sides (PyTorch: our KV-cache loop, which is
  token-for-token `model.generate`; ONNX: the same loop on ONNX Runtime); the first step where the tokens
  differ is named with both tokens and how far apart their logits were on each side.
- Logit parity with the cache: both sides are fed the same tokens (the reference's greedy ones): the prompt
  pass, then N single-token passes through the KV cache; every pass's logits are compared with the parity
  engine's `compare_arrays`, so a graph that is right on the prompt but wrong once the cache is used is caught,
  and the first failing pass is named.
- Perplexity: sliding-window perplexity of both sides on a text, and the share of positions where their greedy
  next-token predictions agree (services/perplexity.py, shared with every command that changes a causal LM).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
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
from mlops_cli.services.perplexity import (
    EvaluationText,
    LogitsFn,
    PerplexityComparison,
    PerplexityProbe,
    onnx_logits_fn,
    torch_logits_fn,
    window_for,
)

DEFAULT_PROMPTS = ("The model", "Once upon a time", "In the beginning")


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
    evaluation: EvaluationText | None = field(default_factory=EvaluationText)  # perplexity of both; None: skip


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
    perplexity: PerplexityComparison | None = None  # the ONNX decoder's perplexity against the model's
    runtime: str = "onnxruntime"  # what ran the candidate: "onnxruntime" (our loop) or "onnxruntime-genai"


CandidateGreedy = Callable[[torch.Tensor, DecodingParams], tuple[list[int], Sequence[Any]]]
CandidatePasses = Callable[[torch.Tensor, Sequence[int]], list[np.ndarray]]


def compare_generation(model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int,
                       tolerances: Tolerances, greedy: CandidateGreedy, passes: CandidatePasses
                       ) -> tuple[PromptParity, ...]:
    """Greedy tokens and per-pass logits of the PyTorch model and a candidate, prompt by prompt (batch 1: no
    padding involved). The candidate's side: `greedy(input_ids, params)` -> (new tokens, the scores each was
    chosen from); `passes(input_ids, tokens)` -> logits of its prompt pass and of each cached pass."""
    params = DecodingParams(max_new_tokens=max_new_tokens)  # no EOS: every prompt runs all its steps
    results = []
    for prompt in prompts:
        input_ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        if input_ids.shape[1] == 0:
            raise UsageError(f"the prompt {prompt!r} encodes to no tokens")
        reference, ref_scores = _greedy(decode, model, input_ids, params)
        ref_new = reference[0, input_ids.shape[1]:].tolist()
        cand_new, cand_scores = greedy(input_ids, params)
        divergence = _first_divergence(ref_new, cand_new, ref_scores, cand_scores, tokenizer)
        diffs = pass_diffs(torch_passes(model, input_ids, ref_new), passes(input_ids, ref_new), tolerances)
        results.append(PromptParity(prompt, tuple(ref_new), tuple(cand_new), divergence, diffs))
    return tuple(results)


def onnx_greedy(decoder: OnnxDecoder, input_ids: torch.Tensor, params: DecodingParams
                ) -> tuple[list[int], list[torch.Tensor]]:
    """Our ONNX cache loop's greedy new tokens and their scores (the candidate side of `compare_generation`)."""
    candidate, scores = _greedy(onnx_decode, decoder, input_ids, params)
    return candidate[0, input_ids.shape[1]:].tolist(), scores


def pass_diffs(ref_logits: Sequence[np.ndarray], cand_logits: Sequence[np.ndarray],
               tolerances: Tolerances) -> tuple[PassDiff, ...]:
    """Each pass's logits compared (pass 0: the prompt pass, pass k: the k-th cached single-token pass)."""
    atol, rtol = tolerances.for_output("logits")
    return tuple(PassDiff(step, compare_arrays(f"logits (pass {step})", r, c, atol, rtol,
                                               agreement=tolerances.agreement))
                 for step, (r, c) in enumerate(zip(ref_logits, cand_logits, strict=True)))


def _greedy(decoder_loop: Callable[..., torch.Tensor], side: Any, input_ids: torch.Tensor,
            params: DecodingParams, attention_mask: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run one side's decoding loop, keeping each step's scores (the raw last-position logits when greedy)."""
    scores: list[torch.Tensor] = []
    sequences = decoder_loop(side, input_ids, attention_mask, params,
                             observers=[lambda _step, _tokens, step_scores: scores.append(step_scores[0].clone())])
    return sequences, scores


def _first_divergence(reference: list[int], candidate: list[int], ref_scores: list[torch.Tensor],
                      cand_scores: Sequence[Any], tokenizer: Any) -> Divergence | None:
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
    check_parity_options(options)
    from mlops_cli.services.onnx_lm import seq2seq_generate, seq2seq_quality

    if seq2seq_generate.is_seq2seq_folder(options.candidate):  # written by export onnx --task seq2seq-lm
        return seq2seq_quality.parity_run(ref, options)
    model, tokenizer, warnings = _reference(ref, options.load, options.tokenizer)
    decoder = OnnxDecoder(options.candidate)
    options.on_step("generating")
    prompts = compare_generation(model, tokenizer, options.prompts, options.max_new_tokens, options.tolerances,
                                 partial(onnx_greedy, decoder), partial(onnx_passes, decoder))
    perplexity = compare_perplexity(options, model, tokenizer, onnx_logits_fn(decoder))
    return parity_report(ref, options, prompts, warnings, perplexity)


def check_parity_options(options: GenerationParityOptions) -> None:
    """What every `--generate` run refuses before any model is loaded: no new tokens, a bad --eval-text."""
    if options.max_new_tokens < 1:
        raise UsageError("--max-new-tokens must be at least 1")
    if options.evaluation is not None:
        options.evaluation.read()


def compare_perplexity(options: GenerationParityOptions, model: Any, tokenizer: Any,
                       candidate: LogitsFn) -> PerplexityComparison | None:
    """The candidate's perplexity on the evaluation text against the PyTorch model's (None: --no-eval)."""
    if options.evaluation is None:
        return None
    options.on_step("measuring perplexity")
    probe = PerplexityProbe.of(options.evaluation, torch_logits_fn(model), tokenizer,
                               window_for(model, options.evaluation.window))
    return probe.compare(candidate)


def parity_report(ref: ModelRef, options: GenerationParityOptions, prompts: tuple[PromptParity, ...],
                  warnings: Sequence[str], perplexity: PerplexityComparison | None = None,
                  runtime: str = "onnxruntime") -> GenerationParityReport:
    """The report of every `--generate` run (ONNX decoder, genai folder, encoder-decoder folder), built once."""
    return GenerationParityReport(
        reference=str(ref), candidate=str(options.candidate), max_new_tokens=options.max_new_tokens,
        atol=options.tolerances.atol, rtol=options.tolerances.rtol, preset=options.tolerances.preset,
        prompts=prompts, passed=all(p.passed for p in prompts), verdict=generation_verdict(prompts),
        perplexity=perplexity, runtime=runtime, warnings=tuple(warnings))


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
