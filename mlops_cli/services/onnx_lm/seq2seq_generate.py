"""Generation with an encoder-decoder exported by `seq2seq_export` (a folder of three graphs), and the same loop on
the PyTorch model, so both sides of a parity check run one algorithm.

The loop is `model.generate`'s greedy/sampling for encoder-decoders: the encoder runs once on the prompts; the
decoder starts from the decoder start token; its first pass (`decoder_model.onnx`) returns both caches, every next
pass (`decoder_with_past_model.onnx`) takes one token and both caches and returns the grown self-attention cache.
The token is chosen by `services/decoding.take_step` (transformers' logits processors, argmax or a seeded draw),
and the figures are measured and reported by `generate_onnx.measured_report`, like any `mlops generate`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from mlops_cli.core.contract import ModelRef
from mlops_cli.core.errors import InputError
from mlops_cli.services.decoding import DecodingParams, StopState, logits_processors, take_step
from mlops_cli.services.generate import GenerateOptions, GenerateReport
from mlops_cli.services.generate_measure import RunRecord, StepClock
from mlops_cli.services.onnx_lm.generate_onnx import (
    OnnxGeneration,
    TextSide,
    _check,
    decoding_params,
    encode_prompts,
    generation_session,
    load_text_side,
    measured_report,
)
from mlops_cli.services.onnx_lm.seq2seq_export import DECODER_FILE, DECODER_WITH_PAST_FILE, ENCODER_FILE

# One decoder pass: decoder token ids [batch, n] -> float32 logits [batch, n, vocab]; the pass keeps its caches.
DecoderPass = Callable[[torch.Tensor], torch.Tensor]


def is_seq2seq_folder(path: Path | None) -> bool:
    """A folder written by `export onnx --task seq2seq-lm` (Optimum's encoder + decoder layout)."""
    return path is not None and path.is_dir() and (path / ENCODER_FILE).is_file() and (path / DECODER_FILE).is_file()


class Seq2SeqSide(Protocol):
    """An encoder-decoder that `seq2seq_decode` can run: the ONNX folder or the PyTorch model."""

    def begin(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> DecoderPass:
        """Encode the prompts; return the decoder's pass function, with empty caches."""


class OnnxSeq2Seq:
    """The three graphs of an exported folder, in ONNX Runtime."""

    def __init__(self, folder: Path, device: str = "cpu", threads: int | None = None) -> None:
        graphs = (ENCODER_FILE, DECODER_FILE, DECODER_WITH_PAST_FILE)
        missing = [name for name in graphs if not (folder / name).is_file()]
        if missing:
            raise InputError(f"{folder} lacks {', '.join(missing)}",
                             hint="Export the model again: mlops export onnx MODEL --task seq2seq-lm -o FOLDER")
        self.folder = folder
        self.encoder = generation_session(folder / ENCODER_FILE, device, threads)
        self.first = _Session(generation_session(folder / DECODER_FILE, device, threads))
        self.next = _Session(generation_session(folder / DECODER_WITH_PAST_FILE, device, threads))
        self.own_names = [n for n in self.first.outputs if n.startswith("present.") and ".decoder." in n]
        self.cross_names = [n for n in self.first.outputs if n.startswith("present.") and ".encoder." in n]
        expected = {_past_name(n) for n in self.own_names + self.cross_names}
        if "logits" not in self.first.outputs or not self.own_names or not expected <= self.next.inputs:
            raise InputError(f"the decoders in {folder} do not carry a KV cache with Optimum's names "
                             "(present.N.decoder/encoder.key/value, past_key_values.N...)",
                             hint="Export the model again: mlops export onnx MODEL --task seq2seq-lm -o FOLDER")

    def begin(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> DecoderPass:
        mask = attention_mask.numpy().astype(np.int64)
        hidden = self.encoder.run(None, {"input_ids": input_ids.numpy().astype(np.int64), "attention_mask": mask})[0]
        context = {"encoder_attention_mask": mask, "encoder_hidden_states": hidden}
        past: dict[str, np.ndarray] = {}  # empty until the first pass has filled both caches

        def decoder_pass(ids: torch.Tensor) -> torch.Tensor:
            graph = self.next if past else self.first
            outputs = graph({"input_ids": ids.numpy().astype(np.int64), **context, **past})
            for name in self.own_names + ([] if past else self.cross_names):
                past[_past_name(name)] = outputs[name]
            return torch.from_numpy(outputs["logits"].astype(np.float32, copy=False))

        return decoder_pass


class _Session:
    """A session fed only the inputs its graph kept (the exporter drops inputs a graph does not read)."""

    def __init__(self, session: Any) -> None:
        self.session = session
        self.inputs = {i.name for i in session.get_inputs()}
        self.outputs = [o.name for o in session.get_outputs()]

    def __call__(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        taken = {name: value for name, value in feed.items() if name in self.inputs}
        return dict(zip(self.outputs, self.session.run(self.outputs, taken), strict=True))


def _past_name(present: str) -> str:
    return present.replace("present.", "past_key_values.", 1)


class TorchSeq2Seq:
    """The PyTorch model, run pass by pass with an `EncoderDecoderCache` exactly as `model.generate` runs it."""

    def __init__(self, model: Any) -> None:
        self.model = model

    @torch.inference_mode()
    def begin(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> DecoderPass:
        from transformers.cache_utils import DynamicCache, EncoderDecoderCache

        model = self.model
        encoded = model.get_encoder()(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)
        cache = EncoderDecoderCache(DynamicCache(config=model.config), DynamicCache(config=model.config))

        @torch.inference_mode()
        def decoder_pass(ids: torch.Tensor) -> torch.Tensor:
            output = model(encoder_outputs=encoded, attention_mask=attention_mask, decoder_input_ids=ids, cache=cache,
                           use_cache=True, return_dict=True)
            return output.logits.float()

        return decoder_pass


@torch.inference_mode()
def seq2seq_decode(side: Seq2SeqSide, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   params: DecodingParams, start_token: int, *, tokenizer: Any = None,
                   observers: Sequence[Any] = ()) -> torch.Tensor:
    """Greedy or sampled decoding; returns the decoder sequences (start token + new tokens), as `model.generate`
    returns them for an encoder-decoder."""
    batch = int(input_ids.shape[0])
    processors = logits_processors(params)
    stop = StopState(params, batch, input_ids.device, tokenizer)
    sequences = torch.full((batch, 1 + params.max_new_tokens), params.pad_token_id, dtype=torch.long)
    sequences[:, 0] = start_token
    decoder_pass = side.begin(input_ids, attention_mask)
    logits = decoder_pass(sequences[:, :1])
    length = 1
    for step in range(params.max_new_tokens):
        next_tokens, all_done = take_step(step, logits[:, -1].clone(), sequences, length, processors, params, stop,
                                          observers)
        length += 1
        if all_done or step + 1 == params.max_new_tokens:
            break
        logits = decoder_pass(next_tokens[:, None])
    return sequences[:, :length]


def decoder_start_token(folder: Path) -> int:
    """The token the decoder starts from, found as `model.generate` finds it (generation config, then the model's
    config: decoder_start_token_id, else bos_token_id)."""
    import json

    configs = []
    for name in ("generation_config.json", "config.json"):
        try:
            configs.append(json.loads((folder / name).read_text(encoding="utf-8")))
        except (OSError, ValueError):
            continue
    for key in ("decoder_start_token_id", "bos_token_id"):
        for values in configs:
            if isinstance(values, dict) and isinstance(values.get(key), int):
                return int(values[key])
    raise InputError(f"no decoder_start_token_id in {folder}'s generation_config.json or config.json",
                     hint="Export the model again (the export saves its config beside the graphs).")


# Generation-config settings `model.generate` applies by default and this loop does not (their neutral values).
_GENERATE_DEFAULTS: dict[str, Any] = {
    "num_beams": 1, "forced_bos_token_id": None, "forced_eos_token_id": None, "bad_words_ids": None,
    "suppress_tokens": None, "begin_suppress_tokens": None, "min_length": 0, "min_new_tokens": None,
    "no_repeat_ngram_size": 0, "encoder_no_repeat_ngram_size": 0, "repetition_penalty": 1.0,
}


def ignored_generation_defaults(folder: Path) -> list[str]:
    """`name=value` for each setting of the folder's generation config that `model.generate` would apply by
    default and this loop does not (only the command line's options are applied)."""
    import json

    try:
        values = json.loads((folder / "generation_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return [f"{name}={values[name]}" for name, neutral in _GENERATE_DEFAULTS.items()
            if name in values and values[name] not in (neutral, None)]


def encode_sources(tokenizer: Any, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and mask of the encoder's input, several prompts right-padded."""
    return encode_prompts(tokenizer, prompts, padding_side="right")


@dataclass(frozen=True)
class Seq2SeqText:
    """The tokenizer side of a folder and the decoder's start token."""

    text: TextSide
    start_token: int


def load_seq2seq_text(folder: Path, tokenizer: Path | None) -> Seq2SeqText:
    return Seq2SeqText(load_text_side(tokenizer or folder), decoder_start_token(folder))


def generate(ref: ModelRef, options: GenerateOptions) -> GenerateReport:
    """`mlops generate FOLDER`: greedy or seeded sampling on the exported graphs, measured like any generation."""
    from mlops_cli.core.runtimes import resolve_device

    _check(options)
    folder = ref.path
    assert folder is not None
    device = "cuda" if resolve_device(options.device).startswith("cuda") else "cpu"
    side = OnnxSeq2Seq(folder, device, options.threads or torch.get_num_threads())
    text = load_seq2seq_text(folder, options.tokenizer)
    input_ids, attention_mask = encode_sources(text.text.tokenizer, options.prompts)
    params = decoding_params(options, text.text)

    def run_once() -> RunRecord:
        clock = StepClock(cuda=False)
        torch.default_generator.manual_seed(options.seed)
        clock.begin()
        sequences = seq2seq_decode(side, input_ids, attention_mask, params, text.start_token,
                                   tokenizer=text.text.tokenizer, observers=[lambda *_: clock.tick()])
        return RunRecord(sequences, clock.start, clock.ticks, time.perf_counter(), None)

    report = measured_report(OnnxGeneration(
        model=str(ref), architecture=f"ONNX encoder-decoder with KV cache ({folder.name}: encoder, decoder, "
                                     "decoder with past)",
        cache="the decoders' past_key_values (self- and cross-attention)", device=device, text=text.text,
        params=params, prompt_length=1, prompt_tokens=int(attention_mask.sum()), batch=int(input_ids.shape[0]),
        run_once=run_once), options)
    ignored = ignored_generation_defaults(folder)
    if not ignored:
        return report
    return replace(report, warnings=(*report.warnings, f"the folder's generation config sets {', '.join(ignored)}: "
                                     "model.generate applies these by default, this loop only the options given "
                                     "(--repetition-penalty, --no-repeat-ngram-size...), so texts may differ"))
