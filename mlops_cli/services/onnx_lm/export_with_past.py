"""Export a decoder-only causal LM to ONNX with its KV cache as graph inputs and outputs.

One graph serves both passes of generation: the prompt pass (past tensors with past length 0) and every
next-token pass (the previous `present.*` fed back as `past_key_values.*`). Names follow Optimum's convention,
so ONNX Runtime GenAI-style loops and Optimum's ORTModelForCausalLM recognise the file:

- inputs: `input_ids` (batch, sequence), `attention_mask` (batch, past + sequence), `position_ids` (batch,
  sequence) where the model takes them, `past_key_values.N.key` / `.value` (batch, kv heads, past, head dim);
- outputs: `logits` (batch, sequence, vocab), `present.N.key` / `.value` (batch, kv heads, past + sequence,
  head dim).

The model is wrapped in a module taking flat past tensors: it rebuilds a transformers `DynamicCache` from them,
runs the model with `use_cache=True` and returns the logits and the flat cache. The legacy (TorchScript-based)
exporter traces it with batch 2, sequence 3 and past 2, so no dim is specialised to 0 or 1; before the file is
moved into place it is run on an empty past and on a cached pass at other sizes and compared with the model.
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from mlops_cli.core.contract import ModelRef, OutputOptions, Report
from mlops_cli.core.errors import InputError

_EXAMPLE_BATCH, _EXAMPLE_SEQUENCE, _EXAMPLE_PAST = 2, 3, 2
DEFAULT_OPSET = 17


@dataclass(frozen=True)
class KvLayout:
    """The shape of a model's KV cache, as the exported graph carries it."""

    layers: int
    kv_heads: int
    head_dim: int
    uses_position_ids: bool

    def past_names(self) -> list[str]:
        return [f"past_key_values.{i}.{kind}" for i in range(self.layers) for kind in ("key", "value")]

    def present_names(self) -> list[str]:
        return [f"present.{i}.{kind}" for i in range(self.layers) for kind in ("key", "value")]

    def input_names(self) -> list[str]:
        positions = ["position_ids"] if self.uses_position_ids else []
        return ["input_ids", "attention_mask", *positions, *self.past_names()]

    def output_names(self) -> list[str]:
        return ["logits", *self.present_names()]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        total = "past_sequence_length + sequence_length"
        axes = {"input_ids": {0: "batch_size", 1: "sequence_length"}, "attention_mask": {0: "batch_size", 1: total},
                "logits": {0: "batch_size", 1: "sequence_length"}}
        if self.uses_position_ids:
            axes["position_ids"] = {0: "batch_size", 1: "sequence_length"}
        axes.update({name: {0: "batch_size", 2: "past_sequence_length"} for name in self.past_names()})
        axes.update({name: {0: "batch_size", 2: total} for name in self.present_names()})
        return axes


@dataclass(frozen=True)
class ExportWithPast:
    """What was written."""

    path: Path
    family: str
    layout: KvLayout
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    opset: int
    external_data: bool
    checked_passes: tuple[tuple[int, int, int], ...]  # (batch, sequence, past) compared with the model


def family_of(model: Any) -> str:
    return str(getattr(model.config, "model_type", None) or type(model).__name__)


def kv_layout(model: Any) -> KvLayout:
    """Probe the model with a 2-token forward: its cache must be a plain per-layer key/value cache (batch, kv
    heads, sequence, head dim). Anything else (state-space, hybrid, encoder-decoder caches) is refused."""
    import torch

    family = family_of(model)
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        raise _unsupported(family, "it is an encoder-decoder model: export it with --task seq2seq-lm (a folder "
                                   "holding the encoder and the decoders with their caches)")
    accepted = inspect.signature(model.forward).parameters
    if "cache" not in accepted and "past_key_values" not in accepted:
        raise _unsupported(family, f"{type(model).__name__} takes no KV cache (is it a causal LM?)")
    try:
        with torch.inference_mode():
            output = model(input_ids=torch.zeros((1, 2), dtype=torch.long), use_cache=True, return_dict=True)
    except Exception as exc:
        raise _unsupported(family, f"a forward pass with use_cache=True failed: {exc}") from exc
    cache = output.get("cache", output.get("past_key_values"))
    pairs = _cache_pairs(cache)
    if not pairs:
        kinds = sorted({type(layer).__name__ for layer in getattr(cache, "layers", ())}) or [type(cache).__name__]
        raise _unsupported(family, f"its cache ({', '.join(kinds)}) is not a plain per-layer key/value cache "
                                   "(sliding-window, recurrent and linear-attention caches are not exported)")
    key = pairs[0][0]
    return KvLayout(len(pairs), int(key.shape[1]), int(key.shape[3]), "position_ids" in accepted)


def _cache_pairs(cache: Any) -> list[tuple[Any, Any]] | None:
    """The (key, value) tensors of each layer, or None when the cache is of another kind."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    if type(cache) is not DynamicCache or not cache.layers:
        return None
    if any(type(layer) is not DynamicLayer for layer in cache.layers):  # sliding-window, linear, recurrent
        return None
    pairs = [(layer.keys, layer.values) for layer in cache.layers]  # type: ignore[union-attr]
    if any(k is None or v is None or k.ndim != 4 or v.shape != k.shape for k, v in pairs):
        return None
    return pairs


def _unsupported(family: str, why: str) -> InputError:
    return InputError(f"cannot export the {family!r} model family with a KV cache: {why}",
                      hint="Only decoder-only causal LMs with a standard KV cache (GPT-2, Llama, Qwen2, Mistral...) "
                           "are exported with it: add --no-kv-cache for the plain graph (logits for the whole "
                           "sequence).")


def past_wrapper(model: Any, layout: KvLayout) -> Any:
    """A module taking (input_ids, attention_mask, [position_ids], *flat past) and returning (logits, *present)."""
    import torch
    from transformers.cache_utils import DynamicCache

    cache_argument = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    class WithPast(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: Any, attention_mask: Any, *rest: Any) -> tuple[Any, ...]:
            extra = {"position_ids": rest[0]} if layout.uses_position_ids else {}
            past = rest[1:] if layout.uses_position_ids else rest
            cache = DynamicCache(config=self.model.config)
            for index in range(layout.layers):
                cache.update(past[2 * index], past[2 * index + 1], index)
            output = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True,
                                return_dict=True, **{cache_argument: cache}, **extra)
            present = output.get("cache", output.get("past_key_values"))
            flat = [t for layer in present.layers for t in (layer.keys, layer.values)]
            return (output.logits, *flat)

    return WithPast().eval()


def example_feed(layout: KvLayout, vocab_size: int, dtype: Any, batch: int = _EXAMPLE_BATCH,
                 sequence: int = _EXAMPLE_SEQUENCE, past: int = _EXAMPLE_PAST, seed: int = 0) -> dict[str, Any]:
    """Inputs for one pass as numpy arrays (named like the graph inputs); random past tensors."""
    rng = np.random.default_rng(seed)
    feed: dict[str, Any] = {
        "input_ids": rng.integers(0, vocab_size, (batch, sequence), dtype=np.int64),
        "attention_mask": np.ones((batch, past + sequence), dtype=np.int64),
    }
    if layout.uses_position_ids:
        feed["position_ids"] = np.tile(np.arange(past, past + sequence, dtype=np.int64), (batch, 1))
    shape = (batch, layout.kv_heads, past, layout.head_dim)
    feed.update({name: rng.standard_normal(shape).astype(dtype) for name in layout.past_names()})
    return feed


def export_with_past(model: Any, output: Path, *, force: bool = False, opset: int = DEFAULT_OPSET,
                     external_data: bool | None = None, sources: list[Path] | None = None) -> ExportWithPast:
    """Export `model` (a transformers causal LM, eval mode, CPU) to `output` with its KV cache.

    The file appears only once exported and checked (empty-past and cached passes agree with the model);
    a family that cannot be exported raises InputError naming it and leaves nothing behind.
    `external_data`: weights in `<output>.data` (None: only past the external-data threshold).
    """
    import torch

    from mlops_cli.core.onnx_export import atomic_onnx, check_onnx_output, weights_need_external_data

    target = check_onnx_output(output, force, sources or [])
    model.eval()
    family = family_of(model)
    layout = kv_layout(model)
    external = weights_need_external_data(model) if external_data is None else external_data
    if any(p.dtype != torch.float32 for p in model.parameters()):
        raise InputError(f"the {family!r} model is not in float32: the KV-cache export traces float32 models",
                         hint="Load the model in float32 (`run` does), export, then convert the ONNX file.")
    feed = example_feed(layout, int(model.config.get_text_config().vocab_size), np.float32)
    args = tuple(torch.from_numpy(feed[name]) for name in layout.input_names())
    with atomic_onnx(target, force, sources or []) as written:
        try:
            with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # tracer warnings about Python branches, checked below
                torch.onnx.export(past_wrapper(model, layout), args, str(written), dynamo=False,
                                  input_names=layout.input_names(), output_names=layout.output_names(),
                                  dynamic_axes=layout.dynamic_axes(), opset_version=opset)  # type: ignore[arg-type]
        except Exception as exc:
            raise _unsupported(family, f"the ONNX exporter failed: {str(exc).strip().splitlines()[0]}") from exc
        gather_weights(written, external)
        _check_against_model(written, model, layout, family)
    return ExportWithPast(target, family, layout, tuple(layout.input_names()), tuple(layout.output_names()),
                          opset, external, _CHECKED_PASSES)


def gather_weights(written: Path, external: bool) -> None:
    """Gather the weights into one `<name>.data` beside the graph when external (the exporter may have written
    one file per tensor), else keep a single self-contained file. `written` is alone in a private folder."""
    if not external and len(list(written.parent.iterdir())) == 1:
        return
    import onnx

    from mlops_cli.core.onnx_export import save_model_proto

    model = onnx.load(str(written))
    for other in written.parent.iterdir():
        if other != written:
            other.unlink()
    save_model_proto(model, written, external)


def save_text_side(model: Any, tokenizer: Any, folder: Path) -> None:
    """The config, generation config and tokenizer beside the graphs: the folder generates on its own."""
    model.config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


# (batch, sequence, past) of the passes checked on the written graph against the model itself: prompt passes with
# an empty past (several tokens; one token on a batch), then a cached single-token pass.
_CHECKED_PASSES = ((1, 4, 0), (3, 1, 0), (2, 1, 3))


def _check_against_model(path: Path, model: Any, layout: KvLayout, family: str) -> None:
    """Run the written graph on an empty past and on a cached pass, at sizes other than the traced ones, and
    compare every output with the wrapped model in eager mode: a dim the trace specialised, or a Python branch
    it froze (causal-mask shortcuts, cache initialisation), shows up here rather than in the user's generation."""
    import torch

    from mlops_cli.core.compare import AGREEMENT, PRESETS, compare_arrays
    from mlops_cli.core.runtimes import onnx_session

    try:
        session = onnx_session(path)
    except InputError as exc:
        raise _unsupported(family, f"ONNX Runtime cannot load the exported graph: {exc.message}") from exc
    wrapper = past_wrapper(model, layout)
    vocab_size = int(model.config.get_text_config().vocab_size)
    for batch, sequence, past in _CHECKED_PASSES:
        feed = example_feed(layout, vocab_size, np.float32, batch=batch, sequence=sequence, past=past, seed=1)
        try:
            outputs = session.run(layout.output_names(), feed)
        except Exception as exc:
            raise _unsupported(family, f"the exported graph fails with batch {batch}, sequence {sequence}, past "
                                       f"{past}: {str(exc).splitlines()[0]}") from exc
        with torch.inference_mode():
            expected = wrapper(*(torch.from_numpy(feed[name]) for name in layout.input_names()))
        for name, got, want in zip(layout.output_names(), outputs, expected, strict=True):
            diff = compare_arrays(name, want.numpy(), got, *PRESETS["fp32"], agreement=AGREEMENT["fp32"])
            if not diff.passed:
                problem = diff.problem or f"max |diff| {diff.max_abs:.3g}"
                raise _unsupported(family, f"the exported graph's {name} differs from the model's with batch "
                                           f"{batch}, sequence {sequence}, past {past}: {problem}")


# ---------------------------------------------------------------- the service


@dataclass(frozen=True, kw_only=True)
class ExportWithPastOptions(OutputOptions):
    """`mlops export onnx MODEL --task causal-lm`: a decoder graph with KV-cache inputs and outputs."""

    opset: int = DEFAULT_OPSET
    external_data: bool | None = None  # None: only past the external-data threshold (core.onnx_export)
    text_side: bool = False  # also save the config and tokenizer beside the file (`generate FILE` finds them)


@dataclass(frozen=True, kw_only=True)
class ExportWithPastReport(Report):
    model: str
    output: str
    family: str
    layers: int
    kv_heads: int
    head_dim: int
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    opset: int
    external_data: bool
    files: dict[str, int]  # file name -> bytes (the .onnx, and its .data when external)
    checked_passes: tuple[tuple[int, int, int], ...]  # (batch, sequence, past) run and compared with the model
    engine: str = "torch"  # `--engine`: torch (this exporter) or genai (services/onnx_lm/genai_export.py)
    engine_reason: str = "--engine torch"  # why this engine ran (`--engine auto` says what it decided)


def run(ref: ModelRef, options: ExportWithPastOptions) -> ExportWithPastReport:
    """Load MODEL as a causal LM and export it with its KV cache."""
    import torch

    from mlops_cli.core.loading import ModelKind, load_model
    from mlops_cli.core.onnx_export import check_onnx_output, files_on_disk
    from mlops_cli.core.runtimes import gather_on_cpu

    check_onnx_output(options.output, options.force, ref.sources)  # before loading: an existing output fails fast
    load = options.load if options.load.task else replace(options.load, task="causal-lm")
    loaded = load_model(ref, load)
    if loaded.kind != ModelKind.HF or loaded.module is None:
        raise InputError(f"{ref} is not a transformers model ({loaded.kind.value}); exporting with a KV cache "
                         "needs one", hint="Pass a Hugging Face folder holding a causal LM.")
    gather_on_cpu(loaded, "export")  # a model placed by --device-map is traced whole, on CPU
    warnings = list(loaded.warnings)
    dtype = next(loaded.module.parameters()).dtype
    if dtype != torch.float32:
        loaded.module.float()
        warnings.append(f"the model's {str(dtype).removeprefix('torch.')} weights were exported as float32 (the "
                        "traced half-precision graph mixes types ONNX Runtime refuses)")
    options.on_step("exporting")
    written = export_with_past(loaded.module, options.output, force=options.force, opset=options.opset,
                               external_data=options.external_data, sources=ref.sources)
    if options.text_side:
        save_text_side(loaded.module, loaded.tokenizer, written.path.parent)
        if loaded.tokenizer is None:
            warnings.append(f"{ref} has no tokenizer: none was saved beside {written.path.name}")
    files = files_on_disk(written.path)
    layout = written.layout
    return ExportWithPastReport(
        model=str(ref), output=str(written.path), family=written.family, layers=layout.layers,
        kv_heads=layout.kv_heads, head_dim=layout.head_dim, input_names=written.input_names,
        output_names=written.output_names, opset=written.opset, external_data=written.external_data, files=files,
        checked_passes=written.checked_passes, warnings=tuple(warnings))
