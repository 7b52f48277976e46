"""`verify-parity HF_FOLDER GENAI_FOLDER --generate`: does a genai folder generate what its PyTorch model does?

The same checks as for an ONNX decoder (`quality.py`), the candidate side run by ONNX Runtime GenAI: greedy
tokens of each prompt (the argmax of the runtime's logits, fed back into its own cache) against our PyTorch
loop, the first divergence named with both tokens and their logit gaps; then logit-level parity with the cache:
the reference's greedy tokens appended one by one to the runtime's cache, and the logits of the prompt pass and
of every cached pass (`generator.get_output("logits")`) compared with PyTorch's; then, unless --no-eval, the
perplexity of both on the evaluation text.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

from mlops_cli.core.contract import ModelRef
from mlops_cli.core.parity import Tolerances
from mlops_cli.services.onnx_lm.genai import (
    greedy_with_scores,
    open_model,
    pass_logits,
    read_genai_folder,
    teacher_forced_passes,
)
from mlops_cli.services.onnx_lm.quality import (
    GenerationParityOptions,
    GenerationParityReport,
    PromptParity,
    _reference,
    check_parity_options,
    compare_generation,
    compare_perplexity,
    parity_report,
)


def compare_genai_generation(model: Any, genai_model: Any, tokenizer: Any, prompts: Sequence[str],
                             max_new_tokens: int, tolerances: Tolerances) -> tuple[PromptParity, ...]:
    """Greedy tokens and per-pass logits of the PyTorch model and the genai model, prompt by prompt (batch 1)."""
    return compare_generation(
        model, tokenizer, prompts, max_new_tokens, tolerances,
        greedy=lambda input_ids, params: greedy_with_scores(genai_model, input_ids[0].tolist(),
                                                            params.max_new_tokens),
        passes=lambda input_ids, tokens: teacher_forced_passes(genai_model, input_ids[0].tolist(), tokens))


def genai_parity_run(ref: ModelRef, options: GenerationParityOptions) -> GenerationParityReport:
    """`verify-parity MODEL GENAI_FOLDER --generate`: the PyTorch model is the reference, `options.candidate`
    the genai folder; its perplexity is scored on the runtime's logits of whole windows (`pass_logits`)."""
    check_parity_options(options)
    folder = read_genai_folder(Path(options.candidate))
    model, tokenizer, warnings = _reference(ref, options.load, options.tokenizer)
    genai_model = open_model(folder, options.threads)
    options.on_step("generating")
    prompts = compare_genai_generation(model, genai_model, tokenizer, options.prompts, options.max_new_tokens,
                                       options.tolerances)
    perplexity = compare_perplexity(options, model, tokenizer, partial(pass_logits, genai_model))
    return parity_report(ref, options, prompts, warnings, perplexity, runtime="onnxruntime-genai")
