"""`mlops generate GENAI_FOLDER`: generation on ONNX Runtime GenAI, reported like every `mlops generate` run.

The runtime's own search runs (greedy, seeded sampling with temperature/top-k/top-p, beam search; repetition
penalty and no-repeat n-grams), one `generate_next_token` per step so the step clock ticks when each token is
known: TTFT, decode tokens/s, per-token latency p50/p90 and peak memory mean what they mean for the PyTorch and
ONNX paths (`services/generate_measure.py`). The prompts are encoded with the transformers tokenizer of the
folder (or `--tokenizer`), the same ids the PyTorch model sees; a batch is right-padded with the folder's pad id,
from which the runtime builds the attention mask (see `padded_rows`). Sampling draws from the runtime's
generator seeded with `--seed`: reproducible, but not the PyTorch path's tokens.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from mlops_cli.core.errors import UsageError
from mlops_cli.core.timing import PeakMemory
from mlops_cli.services.decoding import DecodingParams
from mlops_cli.services.generate import GenerateOptions, GenerateReport, StrategyResult
from mlops_cli.services.generate_measure import RunRecord, StepClock, run_metrics, summarize_runs
from mlops_cli.services.onnx_lm.genai import GenaiFolder, new_generator, open_model, read_genai_folder, token_array
from mlops_cli.services.onnx_lm.generate_onnx import (
    TextSide,
    generated_texts,
    load_text_side,
    refuse_pytorch_options,
)

GENAI_STRATEGIES = ("greedy", "beam", "sample")  # beam-sample: the runtime's beam search does not sample


def _check(options: GenerateOptions) -> tuple[str, ...]:
    """The strategies to run (`all`: those the runtime has: greedy, beam and sample, where the ONNX cache loop
    refuses `all`); options it cannot honour are usage errors, as on an ONNX graph."""
    refuse_pytorch_options(options, (options.strategy not in (*GENAI_STRATEGIES, "all"),
                                     f"--strategy {options.strategy!r} on ONNX Runtime GenAI: greedy, beam and "
                                     "sample are supported"), "a genai folder runs in the precision it was built in")
    return tuple(s for s in options.strategies if s in GENAI_STRATEGIES)


def search_options(strategy: str, options: GenerateOptions, batch: int, max_length: int) -> dict[str, Any]:
    """The runtime's search options for one strategy (the names of genai_config.json's `search`)."""
    search: dict[str, Any] = {"batch_size": batch, "do_sample": strategy == "sample", "num_beams": 1,
                              "repetition_penalty": options.repetition_penalty,
                              "no_repeat_ngram_size": options.no_repeat_ngram_size}
    if options.fixed_length:
        search["min_length"] = max_length
    if strategy == "sample":
        search.update(temperature=options.temperature, top_k=options.top_k, top_p=options.top_p,
                      random_seed=options.seed)
    if strategy == "beam":
        search.update(num_beams=options.num_beams, num_return_sequences=1)
    return search


def padded_rows(text: TextSide, prompts: Sequence[str]) -> tuple[list[list[int]], int]:
    """Each prompt's ids, right-padded with the pad id to the longest, and the number of real prompt tokens.

    Right, not left: the runtime builds the attention mask from the pad id, and its GroupQueryAttention places
    each row's next token after that row's own length (measured: left-padded rows generate other tokens than
    the same prompts alone, right-padded ones the same). The new tokens follow the padded width."""
    rows = [list(text.tokenizer(prompt)["input_ids"]) for prompt in prompts]
    if not all(rows):
        raise UsageError("a prompt encodes to no tokens")
    width = max(len(row) for row in rows)
    return [row + [text.pad_token_id] * (width - len(row)) for row in rows], sum(len(row) for row in rows)


def timed_run(model: Any, rows: list[list[int]], max_length: int, search: dict[str, Any],
              folder: GenaiFolder) -> RunRecord:
    """One generation, the clock ticking after each `generate_next_token`; rows padded to one length with the
    folder's pad id."""
    clock = StepClock(cuda=False)
    clock.begin()
    generator = new_generator(model, max_length, **search)
    generator.append_tokens(token_array(rows))
    while not generator.is_done():
        generator.generate_next_token()
        clock.tick()
    end = time.perf_counter()
    last = [int(t) for t in generator.get_next_tokens()]
    produced = [with_final_eos([int(t) for t in generator.get_sequence(i)], len(rows[0]), max_length, folder,
                               last[i] if len(last) == len(rows) else None)
                for i in range(len(rows))]
    longest = max(len(row) for row in produced)
    sequences = torch.tensor([row + [folder.pad_token_id] * (longest - len(row)) for row in produced],
                             dtype=torch.long)
    return RunRecord(sequences, clock.start, clock.ticks, end, None)


def with_final_eos(row: list[int], width: int, max_length: int, folder: GenaiFolder, last: int | None) -> list[int]:
    """The row with the EOS that ended it: the runtime leaves the EOS chosen on the run's last step out of
    `get_sequence` (a row that finished earlier keeps its own), so without it the row would count one token
    fewer and stop on 'max_new_tokens' where the PyTorch and ONNX paths count the EOS and stop on 'eos'. A row
    shorter than `max_length` stopped on an EOS (the search stops for nothing else); `last` is the token the
    last step chose for it, when the search says (greedy and sampling: one per row)."""
    if len(row) >= max_length or not folder.eos_token_ids or (len(row) > width and row[-1] in folder.eos_token_ids):
        return row
    return [*row, last if last in folder.eos_token_ids else folder.eos_token_ids[0]]


def run_strategy(model: Any, folder: GenaiFolder, text: TextSide, options: GenerateOptions, strategy: str,
                 rows: list[list[int]], prompt_tokens: int) -> StrategyResult:
    """Warm-up runs, then `repeat` measured ones, summarised like the PyTorch path's."""
    max_length = len(rows[0]) + options.max_new_tokens
    search = search_options(strategy, options, len(rows), max_length)
    records: list[RunRecord] = []
    memory = PeakMemory()
    for index in range(options.warmup + options.repeat):
        options.on_step(f"{strategy} decoding on ONNX Runtime GenAI")
        with memory:
            record = timed_run(model, rows, max_length, search, folder)
        if index >= options.warmup:
            records.append(replace(record, peak_memory_bytes=memory.growth_bytes))
    eos = () if options.fixed_length else folder.eos_token_ids
    params = DecodingParams(max_new_tokens=options.max_new_tokens, eos_token_ids=eos, pad_token_id=folder.pad_token_id)
    outputs = generated_texts(options.prompts, records[0].sequences, len(rows[0]), params, text)
    new_tokens = sum(o.new_tokens for o in outputs)
    metrics = summarize_runs([run_metrics(r, new_tokens, len(rows)) for r in records], prompt_tokens, options.warmup)
    reproducible = all(torch.equal(r.sequences, records[0].sequences) for r in records)
    fixed_ok = all(o.new_tokens == options.max_new_tokens for o in outputs) if options.fixed_length else None
    return StrategyResult(strategy, "onnxruntime-genai", search, outputs, metrics, reproducible, fixed_ok)


def generate(path: Path, options: GenerateOptions) -> GenerateReport:
    """`mlops generate GENAI_FOLDER`: every requested strategy on the runtime, figures per strategy."""
    from mlops_cli.core.runtimes import resolve_device

    strategies = _check(options)
    folder = read_genai_folder(path)
    device = "cuda" if resolve_device(options.device).startswith("cuda") else "cpu"
    options.on_step("loading the genai folder")
    model = open_model(folder, options.threads or torch.get_num_threads(), device)
    text = replace(load_text_side(options.tokenizer or folder.folder), eos_token_ids=folder.eos_token_ids,
                   pad_token_id=folder.pad_token_id)
    rows, prompt_tokens = padded_rows(text, options.prompts)
    if folder.context_length is not None and len(rows[0]) + options.max_new_tokens > folder.context_length:
        raise UsageError(f"prompt ({len(rows[0])} tokens) + --max-new-tokens exceed the model's context length "
                         f"({folder.context_length})", hint="Shorten the prompt or lower --max-new-tokens.")
    results = tuple(run_strategy(model, folder, text, options, s, rows, prompt_tokens) for s in strategies)
    notes = [f"tokenizer: {text.folder}", f"threads: {options.threads or torch.get_num_threads()} (intra-op, "
             "through the genai config's session options)"]
    if "sample" in strategies:
        notes.append("sampling uses the runtime's random generator seeded with --seed: reproducible, not the "
                     "PyTorch path's tokens")
    return GenerateReport(
        model=str(path), architecture=f"ONNX Runtime GenAI {folder.model_type} ({folder.model_file.name})",
        device=device, dtype="as built", engine="onnxruntime-genai", cache="the runtime's KV cache", compiled=False,
        batch_size=len(rows), max_new_tokens=options.max_new_tokens, seed=options.seed,
        memory_measure="RSS growth on CPU, sampled every 2 ms during the run" if device == "cpu"
        else "RSS growth of the process (the runtime's CUDA memory is not counted)",
        results=results, explanation=None, notes=tuple(notes),
        warnings=() if all(r.reproducible for r in results)
        else ("some runs with the same seed produced different tokens",))
