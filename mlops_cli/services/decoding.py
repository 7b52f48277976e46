"""Our own KV-cache decoding loop (`mlops generate --engine loop`).

`model.generate` spends measurable time per token outside the model: it re-derives model inputs, grows the
token tensor with `torch.cat`, evaluates several stopping criteria and masks finished rows on every step.
This loop does only what greedy decoding and multinomial sampling need, and stays token-for-token identical
to `model.generate` on decoder-only models:

- the model sees exactly the inputs `generate` gives it (prompt pass with the full position ids, then one
  token per step with a growing KV cache, the attention mask dropped when the prompt has no padding);
- the logits processors are transformers' own classes, built in the same order as
  `GenerationMixin._get_logits_processor` (repetition penalty, no-repeat-ngram, then for sampling
  temperature, top-k, top-p), applied to the float32 copy of the last position's logits;
- sampling draws with `torch.multinomial(softmax(scores), 1)` from the global RNG, as `generate` does, so the
  same seed gives the same tokens;
- finished rows of a batch are filled with the pad token, and decoding stops when every row has hit EOS, a stop
  string (transformers' `StopStringCriteria`) or `max_new_tokens`.

Beam search is left to `model.generate`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import (
    DynamicCache,
    LogitsProcessorList,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    StopStringCriteria,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

# Called after each step with (step index, next tokens [batch], processed scores [batch, vocab]).
StepObserver = Callable[[int, torch.Tensor, torch.Tensor], None]


@dataclass(frozen=True)
class DecodingParams:
    """What the loop needs to know; mirrors the GenerationConfig fields it honours."""

    max_new_tokens: int
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    eos_token_ids: tuple[int, ...] = ()  # empty: never stop on EOS (--fixed-length)
    pad_token_id: int = 0
    stop_strings: tuple[str, ...] = ()


def logits_processors(params: DecodingParams, prompt_ignore_length: torch.Tensor | None = None) -> LogitsProcessorList:
    """transformers' processors for `params`, in the order `model.generate` applies them."""
    processors = LogitsProcessorList()
    if params.repetition_penalty is not None and params.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty,
                                                           prompt_ignore_length=prompt_ignore_length))
    if params.no_repeat_ngram_size and params.no_repeat_ngram_size > 0:
        processors.append(NoRepeatNGramLogitsProcessor(params.no_repeat_ngram_size))
    if params.do_sample:
        if params.temperature is not None and params.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(params.temperature))
        if params.top_k is not None and params.top_k != 0:
            processors.append(TopKLogitsWarper(top_k=params.top_k, min_tokens_to_keep=1))
        if params.top_p is not None and params.top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p=params.top_p, min_tokens_to_keep=1))
    return processors


def _accepts(model: Any, name: str) -> bool:
    return name in inspect.signature(model.forward).parameters


def initial_positions(attention_mask: torch.Tensor | None, length: int, device: torch.device) -> torch.Tensor:
    """Position ids of the prompt, derived as `generate` does (left padding gets position 0)."""
    if attention_mask is None:
        return torch.arange(length, dtype=torch.long, device=device).unsqueeze(0)
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 0)


class StopState:
    """Which rows are finished: EOS tokens and stop strings, evaluated like `generate`'s criteria."""

    def __init__(self, params: DecodingParams, batch: int, device: torch.device, tokenizer: Any) -> None:
        self.eos = torch.tensor(params.eos_token_ids, device=device) if params.eos_token_ids else None
        self.stop_strings = (StopStringCriteria(tokenizer, list(params.stop_strings))
                             if params.stop_strings else None)
        self.active = self.eos is not None or self.stop_strings is not None
        self.unfinished = torch.ones(batch, dtype=torch.long, device=device)
        self.pad = params.pad_token_id

    def mask_finished(self, next_tokens: torch.Tensor) -> torch.Tensor:
        """Rows that finished earlier get the pad token, as in `generate` (which does it only when there is an
        EOS criterion: with stop strings alone, finished rows keep generating until the batch is done)."""
        if self.eos is None:
            return next_tokens
        return next_tokens * self.unfinished + self.pad * (1 - self.unfinished)

    def update(self, sequences: torch.Tensor, scores: torch.Tensor) -> bool:
        """Record which rows are done after `sequences` grew by one token; True when all are."""
        if not self.active:
            return False
        done = torch.zeros_like(self.unfinished, dtype=torch.bool)
        if self.stop_strings is not None:
            done |= self.stop_strings(sequences, scores)
        if self.eos is not None:
            done |= torch.isin(sequences[:, -1], self.eos)
        self.unfinished = self.unfinished & ~done
        return bool(self.unfinished.max() == 0)


def take_step(step: int, logits: torch.Tensor, sequences: torch.Tensor, length: int, processors: Any,
              params: DecodingParams, stop: StopState, observers: Sequence[Any]) -> tuple[torch.Tensor, bool]:
    """One decoding step shared by the PyTorch and ONNX Runtime loops: the logits processors, then the greedy or
    sampled token (finished rows get padding), written at `length` of `sequences`; observers see it. Returns the
    tokens and whether every row has finished."""
    scores = processors(sequences[:, :length], logits)  # a LongTensor view
    if params.do_sample:
        next_tokens = torch.multinomial(torch.nn.functional.softmax(scores, dim=-1), num_samples=1).squeeze(1)
    else:
        next_tokens = torch.argmax(scores, dim=-1)
    next_tokens = stop.mask_finished(next_tokens)
    sequences[:, length] = next_tokens
    all_done = stop.update(sequences[:, :length + 1], scores)
    for observe in observers:
        observe(step, next_tokens, scores)
    return next_tokens, all_done


@torch.inference_mode()
def decode(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, params: DecodingParams, *,
           tokenizer: Any = None, observers: Sequence[StepObserver] = ()) -> torch.Tensor:
    """Greedy or sampled decoding with a KV cache; returns prompt + new tokens like `model.generate`.

    `attention_mask` is needed only when the prompts are left-padded (None, or all ones, otherwise).
    Observers run after each step, once the token is known (timing, `--explain`).
    """
    if getattr(model.config, "is_encoder_decoder", False):
        raise ValueError("the decoding loop handles decoder-only models; use model.generate for encoder-decoders")
    device = input_ids.device
    batch, prompt_length = input_ids.shape
    if attention_mask is not None and bool((attention_mask == 1).all()):
        attention_mask = None  # as generate does: no padding, no mask (and the faster attention path)
    padding = None if attention_mask is None else (attention_mask != 0).int().argmax(dim=1)
    processors = logits_processors(params, prompt_ignore_length=padding)
    stop = StopState(params, batch, device, tokenizer)

    sequences = torch.full((batch, prompt_length + params.max_new_tokens), params.pad_token_id,
                           dtype=input_ids.dtype, device=device)
    sequences[:, :prompt_length] = input_ids
    positions = initial_positions(attention_mask, prompt_length, device)
    step_inputs: dict[str, Any] = {"input_ids": input_ids, "cache": DynamicCache(config=model.config),
                                   "use_cache": True, "return_dict": True}
    if _accepts(model, "position_ids"):
        step_inputs["position_ids"] = positions
    if attention_mask is not None:
        step_inputs["attention_mask"] = attention_mask
    if _accepts(model, "logits_to_keep"):
        step_inputs["logits_to_keep"] = 1
    next_position = positions[:, -1:] + 1

    length = prompt_length
    for step in range(params.max_new_tokens):
        outputs = model(**step_inputs)
        logits = outputs.logits[:, -1].to(copy=True, dtype=torch.float32, device=device)
        next_tokens, all_done = take_step(step, logits, sequences, length, processors, params, stop, observers)
        length += 1
        if all_done or step + 1 == params.max_new_tokens:
            break
        step_inputs["input_ids"] = next_tokens[:, None]
        step_inputs["cache"] = outputs.get("cache", step_inputs["cache"])
        if "position_ids" in step_inputs:
            step_inputs["position_ids"] = next_position
            next_position = next_position + 1
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones((batch, 1))], dim=-1)
            step_inputs["attention_mask"] = attention_mask
        del outputs
    return sequences[:, :length]
