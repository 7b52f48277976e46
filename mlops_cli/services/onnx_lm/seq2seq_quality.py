"""Does an exported encoder-decoder folder generate what its PyTorch model generates?

The same checks as for a decoder-only export (`quality.py`), through both decoder graphs: greedy decoding of each
prompt on both sides with one loop (`seq2seq_generate.seq2seq_decode`: the PyTorch side is token-for-token
`model.generate`), the first divergence named; then both sides are fed the reference's tokens and the logits of
the first decoder pass (`decoder_model.onnx`, empty caches) and of every cached pass (`decoder_with_past_model.onnx`)
are compared, so a fault that only shows once the caches are read back is named at its step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch

from mlops_cli.core.compare import compare_arrays
from mlops_cli.core.contract import ModelRef
from mlops_cli.core.errors import UsageError
from mlops_cli.core.parity import Tolerances
from mlops_cli.services.decoding import DecodingParams
from mlops_cli.services.onnx_lm.quality import (
    GenerationParityOptions,
    GenerationParityReport,
    PassDiff,
    PromptParity,
    _first_divergence,
    _reference,
    generation_verdict,
)
from mlops_cli.services.onnx_lm.seq2seq_generate import (
    OnnxSeq2Seq,
    Seq2SeqSide,
    TorchSeq2Seq,
    decoder_start_token,
    seq2seq_decode,
)


def compare_seq2seq(model: Any, candidate: OnnxSeq2Seq, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int,
                    tolerances: Tolerances, start_token: int) -> tuple[PromptParity, ...]:
    """Greedy tokens and per-pass logits of both sides, prompt by prompt (batch 1)."""
    reference = TorchSeq2Seq(model)
    params = DecodingParams(max_new_tokens=max_new_tokens)  # no EOS: every prompt runs all its steps
    atol, rtol = tolerances.for_output("logits")
    results = []
    for prompt in prompts:
        input_ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        if input_ids.shape[1] == 0:
            raise UsageError(f"the prompt {prompt!r} encodes to no tokens")
        mask = torch.ones_like(input_ids)
        ref_new, ref_scores = _greedy(reference, input_ids, mask, params, start_token)
        cand_new, cand_scores = _greedy(candidate, input_ids, mask, params, start_token)
        divergence = _first_divergence(ref_new, cand_new, ref_scores, cand_scores, tokenizer)
        fed = [start_token, *ref_new[:-1]]
        passes = tuple(PassDiff(step, compare_arrays(f"logits (pass {step})", r, c, atol, rtol,
                                                     agreement=tolerances.agreement))
                       for step, (r, c) in enumerate(zip(decoder_passes(reference, input_ids, mask, fed),
                                                         decoder_passes(candidate, input_ids, mask, fed), strict=True)))
        results.append(PromptParity(prompt, tuple(ref_new), tuple(cand_new), divergence, passes))
    return tuple(results)


def _greedy(side: Seq2SeqSide, input_ids: torch.Tensor, mask: torch.Tensor, params: DecodingParams,
            start_token: int) -> tuple[list[int], list[torch.Tensor]]:
    """One side's new tokens, and each step's scores (the raw logits when greedy)."""
    scores: list[torch.Tensor] = []
    sequences = seq2seq_decode(side, input_ids, mask, params, start_token,
                               observers=[lambda _step, _tokens, step_scores: scores.append(step_scores[0].clone())])
    return sequences[0, 1:].tolist(), scores


def decoder_passes(side: Seq2SeqSide, input_ids: torch.Tensor, mask: torch.Tensor, tokens: Sequence[int]) -> list[Any]:
    """The logits of the first decoder pass (the first of `tokens`), then of one cached pass per next token."""
    decoder_pass = side.begin(input_ids, mask)
    return [decoder_pass(torch.tensor([[token]])).numpy() for token in tokens]


def parity_run(ref: ModelRef, options: GenerationParityOptions) -> GenerationParityReport:
    """`verify-parity MODEL FOLDER --generate` for a folder written by `export onnx --task seq2seq-lm`."""
    assert options.candidate is not None
    load = options.load if options.load.task else replace(options.load, task="seq2seq-lm")
    model, tokenizer, warnings = _reference(ref, load, options.tokenizer)
    candidate = OnnxSeq2Seq(options.candidate)
    options.on_step("generating")
    prompts = compare_seq2seq(model, candidate, tokenizer, options.prompts, options.max_new_tokens,
                              options.tolerances, decoder_start_token(options.candidate))
    return GenerationParityReport(
        reference=str(ref), candidate=str(options.candidate), max_new_tokens=options.max_new_tokens,
        atol=options.tolerances.atol, rtol=options.tolerances.rtol, preset=options.tolerances.preset,
        prompts=prompts, passed=all(p.passed for p in prompts), verdict=generation_verdict(prompts),
        warnings=tuple(warnings))
