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
from functools import partial
from typing import Any

import torch

from mlops_cli.core.contract import ModelRef
from mlops_cli.core.errors import UsageError
from mlops_cli.core.parity import Tolerances
from mlops_cli.services.decoding import DecodingParams
from mlops_cli.services.onnx_lm.quality import (
    GenerationParityOptions,
    GenerationParityReport,
    PromptParity,
    _first_divergence,
    _greedy,
    _reference,
    parity_report,
    pass_diffs,
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
    decode = partial(seq2seq_decode, start_token=start_token)
    results = []
    for prompt in prompts:
        input_ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        if input_ids.shape[1] == 0:
            raise UsageError(f"the prompt {prompt!r} encodes to no tokens")
        mask = torch.ones_like(input_ids)
        reference_ids, ref_scores = _greedy(decode, reference, input_ids, params, mask)
        candidate_ids, cand_scores = _greedy(decode, candidate, input_ids, params, mask)
        ref_new, cand_new = reference_ids[0, 1:].tolist(), candidate_ids[0, 1:].tolist()  # after the start token
        divergence = _first_divergence(ref_new, cand_new, ref_scores, cand_scores, tokenizer)
        fed = [start_token, *ref_new[:-1]]
        passes = pass_diffs(decoder_passes(reference, input_ids, mask, fed),
                            decoder_passes(candidate, input_ids, mask, fed), tolerances)
        results.append(PromptParity(prompt, tuple(ref_new), tuple(cand_new), divergence, passes))
    return tuple(results)


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
    return parity_report(ref, options, prompts, warnings)
