"""Generation on ONNX Runtime with the KV cache of a graph exported by `export_with_past`.

The loop is `services/decoding.py`'s, on ONNX Runtime: one prompt pass with an empty past (past length 0),
then one token per step, the `present.*` outputs fed back as `past_key_values.*`, the attention mask grown
by one column and the position ids advanced. transformers' own logits processors choose the token (the same
ones, in the same order, as `model.generate`), and sampling draws from torch's global RNG, so a seed gives
the same tokens as the PyTorch loop when the logits agree. Figures are measured like `mlops generate`'s
(`services/generate_measure.py`): TTFT, decode tokens/s, per-token latency p50/p90.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mlops_cli.core.errors import InputError, UsageError
from mlops_cli.core.loading import LoadedModel
from mlops_cli.core.timing import PeakMemory
from mlops_cli.services.decoding import DecodingParams, StopState, initial_positions, logits_processors, take_step
from mlops_cli.services.generate import GeneratedText, GenerateOptions, GenerateReport, StrategyResult
from mlops_cli.services.generate_measure import RunRecord, StepClock, run_metrics, summarize_runs

_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}
# Called after each step with (step index, next tokens [batch], processed scores [batch, vocab]).
OnnxStepObserver = Callable[[int, torch.Tensor, torch.Tensor], None]


class OnnxDecoder:
    """An ONNX decoder graph with KV-cache inputs, run one pass at a time."""

    def __init__(self, path: str | Path, device: str = "cpu", threads: int | None = None) -> None:
        self.path = Path(path)
        self.session = generation_session(path, device, threads)
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.past_names = sorted((n for n in inputs if _PAST.match(n)), key=_past_order)
        if not self.past_names or "input_ids" not in inputs:
            raise no_kv_cache_error(self.path, list(inputs))
        first = inputs[self.past_names[0]]
        self.kv_heads, self.head_dim = _fixed_dim(first.shape, 1), _fixed_dim(first.shape, 3)
        self.past_dtype = _NUMPY_TYPES.get(first.type, np.float32)
        self.takes_positions = "position_ids" in inputs
        self.takes_mask = "attention_mask" in inputs
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.present_names = [name.replace("past_key_values.", "present.") for name in self.past_names]
        missing = [name for name in ["logits", *self.present_names] if name not in self.output_names]
        if missing:
            raise InputError(f"{self.path} takes a KV cache but does not return {', '.join(missing)}",
                             hint="Export it with `mlops export onnx MODEL --engine torch -o lm.onnx` (Optimum's "
                                  "names).")

    def empty_past(self, batch: int) -> dict[str, np.ndarray]:
        shape = (batch, self.kv_heads, 0, self.head_dim)
        return {name: np.zeros(shape, dtype=self.past_dtype) for name in self.past_names}

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
                 past: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """One pass: (logits [batch, sequence, vocab], the next pass's past)."""
        feed = {"input_ids": input_ids, **past}
        if self.takes_mask:
            feed["attention_mask"] = attention_mask
        if self.takes_positions:
            feed["position_ids"] = position_ids
        outputs = dict(zip(self.output_names, self.session.run(self.output_names, feed), strict=True))
        present = {name: outputs[out] for name, out in zip(self.past_names, self.present_names, strict=True)}
        return outputs["logits"], present


def generation_session(path: str | Path, device: str = "cpu", threads: int | None = None) -> Any:
    """An ONNX Runtime session for a generation loop: `threads` intra-op threads, no spinning between passes."""
    import onnxruntime as ort

    from mlops_cli.core.runtimes import onnx_session

    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return onnx_session(path, device, options)


def _past_order(name: str) -> tuple[int, int]:
    match = _PAST.match(name)
    assert match is not None
    return int(match.group(1)), 0 if match.group(2) == "key" else 1


def _fixed_dim(shape: Sequence[Any], index: int) -> int:
    value = shape[index] if len(shape) > index else None
    if not isinstance(value, int):
        raise InputError(f"the KV-cache inputs have a symbolic dim {index} ({value}); mlops needs the head count "
                         "and head size fixed in the graph",
                         hint="For mlops' loop export with `mlops export onnx MODEL --engine torch -o lm.onnx`; a "
                              "genai folder runs as a folder (`mlops generate FOLDER`), and is quantised while "
                              "exporting (`export onnx MODEL --engine genai --precision int4 -o FOLDER`).")
    return value


def no_kv_cache_error(path: Path, inputs: Sequence[str]) -> InputError:
    return InputError(
        f"{path} has no KV-cache inputs (it takes {', '.join(inputs) or 'nothing'}): generating with it would "
        "re-run the whole sequence for every new token, so each token would cost as much as the prompt",
        hint="Export the model with its cache: `mlops export onnx MODEL -o lm.onnx` (without --no-kv-cache) "
             "writes past_key_values.N.key/value inputs and present.N.key/value outputs.")


@torch.inference_mode()
def onnx_decode(decoder: OnnxDecoder, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                params: DecodingParams, *, tokenizer: Any = None,
                observers: Sequence[OnnxStepObserver] = ()) -> torch.Tensor:
    """`services.decoding.decode` on ONNX Runtime: prompt + new tokens, as `model.generate` returns them."""
    batch, prompt_length = input_ids.shape
    if attention_mask is not None and bool((attention_mask == 1).all()):
        attention_mask = None
    padding = None if attention_mask is None else (attention_mask != 0).int().argmax(dim=1)
    processors = logits_processors(params, prompt_ignore_length=padding)
    stop = StopState(params, batch, input_ids.device, tokenizer)
    sequences = torch.full((batch, prompt_length + params.max_new_tokens), params.pad_token_id, dtype=torch.long)
    sequences[:, :prompt_length] = input_ids
    mask = (np.ones((batch, prompt_length), dtype=np.int64) if attention_mask is None
            else attention_mask.numpy().astype(np.int64))
    positions = np.ascontiguousarray(initial_positions(attention_mask, prompt_length, input_ids.device)
                                     .expand(batch, -1).numpy())
    step_ids, past = input_ids.numpy().astype(np.int64), decoder.empty_past(batch)
    next_position = positions[:, -1:] + 1
    length = prompt_length
    for step in range(params.max_new_tokens):
        logits, past = decoder(step_ids, mask, positions, past)
        next_tokens, all_done = take_step(step, torch.from_numpy(logits[:, -1].astype(np.float32)), sequences, length,
                                          processors, params, stop, observers)
        length += 1
        if all_done or step + 1 == params.max_new_tokens:
            break
        step_ids = next_tokens.numpy()[:, None].astype(np.int64)
        positions, next_position = next_position, next_position + 1
        mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
    return sequences[:, :length]


# ---------------------------------------------------------------- the service


ONNX_STRATEGIES = ("greedy", "sample")  # what the cache loop runs; beams need the model's reorder of the cache


@dataclass(frozen=True)
class TextSide:
    """What generation needs beside the graph: the tokenizer, and the EOS/pad ids of the model's config."""

    folder: Path
    tokenizer: Any
    eos_token_ids: tuple[int, ...]
    pad_token_id: int


def load_text_side(where: Path) -> TextSide:
    """The tokenizer (and EOS ids) from an HF folder: the one given, or the one holding the ONNX file."""
    from transformers import AutoTokenizer, GenerationConfig

    if not any((where / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        raise InputError(f"no tokenizer in {where}",
                         hint="Save the model's tokenizer files beside the .onnx file, or name the HF folder "
                              "holding them with --tokenizer.")
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, local_files_only=True, trust_remote_code=False)
    except Exception as exc:
        raise InputError(f"the tokenizer in {where} could not be loaded: {exc}") from exc
    eos: Any = None
    if (where / "generation_config.json").is_file() or (where / "config.json").is_file():
        try:
            eos = GenerationConfig.from_pretrained(where, local_files_only=True).eos_token_id
        except (OSError, ValueError):
            eos = None
    if eos is None:
        eos = tokenizer.eos_token_id
    eos_ids = () if eos is None else tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos_ids[0] if eos_ids else 0)
    return TextSide(where, tokenizer, eos_ids, int(pad))


def encode_prompts(tokenizer: Any, prompts: Sequence[str], padding_side: str = "left"
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and mask; several prompts are padded on `padding_side`: left for a decoder-only model (it
    continues from the end), right for an encoder's input (the mask hides the padding, and absolute-position
    encoders such as BART's keep the positions they were trained with)."""
    if len(prompts) > 1:
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        tokenizer.padding_side = padding_side
    encoded = tokenizer(list(prompts), return_tensors="pt", padding=len(prompts) > 1)
    if encoded["input_ids"].shape[1] == 0:
        raise UsageError("the prompt encodes to no tokens")
    return encoded["input_ids"], encoded.get("attention_mask", torch.ones_like(encoded["input_ids"]))


def _check(options: GenerateOptions) -> None:
    """What the ONNX cache loop cannot do (the rest was checked like any `mlops generate` run)."""
    refuse_pytorch_options(options, (options.strategy not in ONNX_STRATEGIES,
                                     f"--strategy {options.strategy!r} on ONNX Runtime: greedy and sample are "
                                     "supported"), "an ONNX graph runs in the precision it was exported in")


def refuse_pytorch_options(options: GenerateOptions, strategy: tuple[bool, str], dtype_note: str) -> None:
    """Options only the PyTorch path honours are usage errors (exit 2) on an ONNX graph or a genai folder; so is
    placement (`--device-map/--max-memory/--tp-plan/--offload-folder`), which has nothing to place there."""
    from mlops_cli.core.loading import wants_placement

    unsupported = [strategy,
                   (options.engine != "generate", "--engine applies to PyTorch models"),
                   (options.explain, "--explain applies to PyTorch models"),
                   (bool(options.stop), "--stop applies to PyTorch models"),
                   (options.chat, "--chat applies to PyTorch models"),
                   (options.stream, "--stream applies to PyTorch models"),
                   (options.dtype != "fp32", f"--dtype: {dtype_note}"),
                   (options.cache != "dynamic" or options.compile, "--cache/--compile apply to PyTorch models"),
                   (wants_placement(options.load) or options.load.offload_folder is not None,
                    "--device-map/--max-memory/--tp-plan/--offload-folder: placement does not apply to an ONNX "
                    "graph (use --device)")]
    for failed, message in unsupported:
        if failed:
            raise UsageError(message, hint="Drop the option, or generate from the PyTorch model.")


def decoding_params(options: GenerateOptions, text: TextSide) -> DecodingParams:
    sample = options.strategy == "sample"
    return DecodingParams(
        max_new_tokens=options.max_new_tokens, do_sample=sample,
        temperature=options.temperature if sample else 1.0, top_k=options.top_k if sample else None,
        top_p=options.top_p if sample else None, repetition_penalty=options.repetition_penalty,
        no_repeat_ngram_size=options.no_repeat_ngram_size,
        eos_token_ids=() if options.fixed_length else text.eos_token_ids, pad_token_id=text.pad_token_id)


def generate(loaded: LoadedModel, options: GenerateOptions, tokenizer: Path | None = None) -> GenerateReport:
    """`mlops generate model.onnx`: the same report as for a PyTorch model, from an ONNX decoder with its KV cache
    (warm-up runs, then `repeat` measured runs); the tokenizer from `tokenizer` or the ONNX file's folder."""
    from mlops_cli.core.runtimes import resolve_device

    _check(options)
    assert loaded.path is not None
    device = "cuda" if resolve_device(options.device).startswith("cuda") else "cpu"
    decoder = OnnxDecoder(loaded.path, device, options.threads or torch.get_num_threads())
    text = load_text_side(tokenizer or loaded.path.parent)
    input_ids, attention_mask = encode_prompts(text.tokenizer, options.prompts)
    params = decoding_params(options, text)
    run = OnnxGeneration(
        model=loaded.reference, architecture=f"ONNX decoder with KV cache ({loaded.path.name})",
        cache="the graph's past_key_values", device=device, text=text, params=params,
        prompt_length=int(input_ids.shape[1]), prompt_tokens=int(attention_mask.sum()), batch=int(input_ids.shape[0]),
        run_once=lambda: timed_run(decoder, input_ids, attention_mask, params, options.seed, text.tokenizer))
    return measured_report(run, options)


@dataclass(frozen=True, kw_only=True)
class OnnxGeneration:
    """One generation on ONNX Runtime, ready to be run and measured (a decoder-only or an encoder-decoder)."""

    model: str
    architecture: str
    cache: str
    device: str
    text: TextSide
    params: DecodingParams
    prompt_length: int  # tokens at the start of each returned sequence that are not new
    prompt_tokens: int  # the prompts' tokens, padding excluded
    batch: int
    run_once: Callable[[], RunRecord]


def measured_report(run: OnnxGeneration, options: GenerateOptions) -> GenerateReport:
    """Warm-up runs, then `repeat` measured ones (peak memory of each), reported like a PyTorch generation."""
    records: list[RunRecord] = []
    memory = PeakMemory()
    for index in range(options.warmup + options.repeat):
        options.on_step(f"{options.strategy} decoding on ONNX Runtime")
        with memory:
            record = run.run_once()
        if index >= options.warmup:
            records.append(replace(record, peak_memory_bytes=memory.growth_bytes))
    outputs = generated_texts(options.prompts, records[0].sequences, run.prompt_length, run.params, run.text)
    new_tokens = sum(o.new_tokens for o in outputs)
    metrics = summarize_runs([run_metrics(r, new_tokens, run.batch) for r in records], run.prompt_tokens,
                             options.warmup)
    reproducible = all(torch.equal(r.sequences, records[0].sequences) for r in records)
    settings = {name: value for name, value in dataclasses.asdict(run.params).items() if name != "eos_token_ids"}
    result = StrategyResult(options.strategy, "onnxruntime", settings, outputs, metrics, reproducible,
                            all(o.new_tokens == options.max_new_tokens for o in outputs) if options.fixed_length
                            else None)
    return GenerateReport(
        model=run.model, architecture=run.architecture, device=run.device,
        dtype="as exported", engine="onnxruntime", cache=run.cache, compiled=False,
        batch_size=run.batch, max_new_tokens=options.max_new_tokens, seed=options.seed,
        memory_measure="RSS growth on CPU, sampled every 2 ms during the run" if run.device == "cpu"
        else "RSS growth of the process (ONNX Runtime's CUDA memory is not counted)",
        results=(result,), explanation=None, notes=(f"tokenizer: {run.text.folder}",),
        warnings=() if reproducible else ("some runs with the same seed produced different tokens",))


def timed_run(decoder: OnnxDecoder, input_ids: torch.Tensor, attention_mask: torch.Tensor, params: DecodingParams,
              seed: int, tokenizer: Any = None) -> RunRecord:
    """One generation, its step clock ticking when each token is known (seeded like `mlops generate`)."""
    clock = StepClock(cuda=False)
    torch.default_generator.manual_seed(seed)
    clock.begin()
    sequences = onnx_decode(decoder, input_ids, attention_mask, params, tokenizer=tokenizer,
                            observers=[lambda *_: clock.tick()])
    return RunRecord(sequences, clock.start, clock.ticks, time.perf_counter(), None)


def generated_texts(prompts: Sequence[str], sequences: torch.Tensor, prompt_length: int, params: DecodingParams,
                    text: TextSide) -> tuple[GeneratedText, ...]:
    """Each row's new tokens, cut after the first EOS (finished rows are padded with the pad token)."""
    eos = set(params.eos_token_ids)
    results = []
    for prompt, row in zip(prompts, sequences.tolist(), strict=True):
        new = row[prompt_length:]
        end = next((i + 1 for i, token in enumerate(new) if token in eos), None)
        kept = new[:end] if end is not None else new
        decoded = text.tokenizer.decode([t for t in kept if t not in eos], skip_special_tokens=True)
        results.append(GeneratedText(prompt, decoded, tuple(kept), len(kept),
                                     "eos" if end is not None else "max_new_tokens"))
    return tuple(results)
