"""Export an encoder-decoder LM (T5, BART, Marian...) to ONNX as Optimum lays it out: three graphs in a folder.

- `encoder_model.onnx`: `input_ids`, `attention_mask` (batch, encoder sequence) -> `last_hidden_state`;
- `decoder_model.onnx`, the first decoder pass (no past): `encoder_attention_mask`, `input_ids` (batch, decoder
  sequence), `encoder_hidden_states` -> `logits`, `present.N.decoder.key/value` (self-attention cache) and
  `present.N.encoder.key/value` (the cross-attention keys/values, computed once from the encoder's output);
- `decoder_with_past_model.onnx`, every next pass: the same inputs plus `past_key_values.N.decoder.key/value`
  and `past_key_values.N.encoder.key/value` -> `logits`, `present.N.decoder.key/value` (the cross-attention
  cache does not change, so it is not returned: Optimum's convention).

Two decoder files rather than Optimum's merged one (an `If` node choosing between both bodies): each is a plain
trace of the model, checked on its own; the price is the decoder's weights stored twice. The folder also holds
the model's config, generation config and tokenizer, so `mlops generate FOLDER` runs it alone.

The decoder is wrapped in a module taking flat cache tensors, rebuilding transformers' `EncoderDecoderCache`
(a self-attention and a cross-attention `DynamicCache`) from them. The legacy exporter traces each graph at sizes
with no dim 0 or 1; every graph is then run at other sizes (padded encoder masks, one and several decoder tokens,
several past lengths) and compared with the model before the folder is moved into place.
"""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from mlops_cli.core.contract import LoadOptions, ModelRef, OutputOptions, Report
from mlops_cli.core.errors import InputError
from mlops_cli.services.onnx_lm.export_with_past import DEFAULT_OPSET, family_of, gather_weights, save_text_side

ENCODER_FILE, DECODER_FILE, DECODER_WITH_PAST_FILE = (
    "encoder_model.onnx", "decoder_model.onnx", "decoder_with_past_model.onnx")
_KINDS = ("key", "value")
# Sizes the graphs are traced at: (batch, encoder sequence, decoder sequence, past decoder sequence).
_TRACE = (2, 5, 3, 2)


@dataclass(frozen=True)
class Seq2SeqLayout:
    """The shape of the decoder's two caches, as the exported graphs carry them."""

    layers: int
    heads: int
    head_dim: int
    hidden_size: int  # of the encoder's output
    vocab_size: int

    def cache_names(self, prefix: str, stream: str) -> list[str]:
        """`prefix.N.stream.key/value` for every layer (stream: decoder or encoder)."""
        return [f"{prefix}.{i}.{stream}.{kind}" for i in range(self.layers) for kind in _KINDS]

    def past_names(self) -> list[str]:
        """Optimum's order: per layer, the decoder's key and value, then the encoder's."""
        return [f"past_key_values.{i}.{stream}.{kind}" for i in range(self.layers)
                for stream in ("decoder", "encoder") for kind in _KINDS]

    def decoder_inputs(self, with_past: bool) -> list[str]:
        past = self.past_names() if with_past else []
        return ["encoder_attention_mask", "input_ids", "encoder_hidden_states", *past]

    def decoder_outputs(self, with_past: bool) -> list[str]:
        encoder = [] if with_past else self.cache_names("present", "encoder")
        return ["logits", *self.cache_names("present", "decoder"), *encoder]

    def decoder_axes(self, with_past: bool) -> dict[str, dict[int, str]]:
        batch, encoder, decoder = "batch_size", "encoder_sequence_length", "decoder_sequence_length"
        total = f"past_decoder_sequence_length + {decoder}" if with_past else decoder
        axes = {"encoder_attention_mask": {0: batch, 1: encoder}, "input_ids": {0: batch, 1: decoder},
                "encoder_hidden_states": {0: batch, 1: encoder}, "logits": {0: batch, 1: decoder}}
        axes.update({name: {0: batch, 2: total} for name in self.cache_names("present", "decoder")})
        axes.update({name: {0: batch, 2: "encoder_sequence_length_out"}
                     for name in self.cache_names("present", "encoder")})
        if with_past:
            axes.update({name: {0: batch, 2: "past_decoder_sequence_length" if ".decoder." in name
                                else "encoder_sequence_length_out"} for name in self.past_names()})
        return {name: dims for name, dims in axes.items()
                if name in self.decoder_inputs(with_past) + self.decoder_outputs(with_past)}


ENCODER_INPUTS, ENCODER_OUTPUTS = ["input_ids", "attention_mask"], ["last_hidden_state"]
ENCODER_AXES = {name: {0: "batch_size", 1: "encoder_sequence_length"} for name in [*ENCODER_INPUTS, *ENCODER_OUTPUTS]}


def _unsupported(family: str, why: str) -> InputError:
    return InputError(f"cannot export the {family!r} model family as an encoder-decoder with a KV cache: {why}",
                      hint="Text encoder-decoders with a standard cache are supported (T5, BART, Marian, mBART, "
                           "Pegasus...); export other models without --task seq2seq-lm.")


def seq2seq_layout(model: Any) -> Seq2SeqLayout:
    """Probe the model with a short forward: it must take token ids and return an `EncoderDecoderCache` of plain
    per-layer key/value caches; anything else is refused, naming the family and why."""
    import torch
    from transformers.cache_utils import DynamicCache, DynamicLayer, EncoderDecoderCache

    family = family_of(model)
    if not getattr(model.config, "is_encoder_decoder", False):
        raise _unsupported(family, "it is not an encoder-decoder model (export a decoder-only LM with --task "
                                   "causal-lm)")
    main_input = getattr(model, "main_input_name", "input_ids")
    if main_input != "input_ids":
        raise _unsupported(family, f"its encoder reads {main_input}, not token ids (speech and vision "
                                   "encoder-decoders are not exported)")
    ids = torch.ones((1, 3), dtype=torch.long)
    try:
        with torch.inference_mode():
            output = model(input_ids=ids, attention_mask=torch.ones_like(ids), decoder_input_ids=ids[:, :2],
                           use_cache=True, return_dict=True)
    except Exception as exc:
        raise _unsupported(family, f"a forward pass with use_cache=True failed: {exc}") from exc
    cache = output.cache
    parts: list[Any] = [cache.self_attention_cache, cache.cross_attention_cache] \
        if type(cache) is EncoderDecoderCache else []
    if not parts or any(type(part) is not DynamicCache or not part.layers
                        or any(type(layer) is not DynamicLayer for layer in part.layers) for part in parts):
        raise _unsupported(family, f"its cache ({type(cache).__name__}) is not an EncoderDecoderCache of plain "
                                   "per-layer key/value caches")
    keys: Any = parts[0].layers[0].keys
    return Seq2SeqLayout(len(parts[0].layers), int(keys.shape[1]), int(keys.shape[3]),
                         int(output.encoder_last_hidden_state.shape[-1]), int(output.logits.shape[-1]))


def encoder_wrapper(model: Any) -> Any:
    """`(input_ids, attention_mask) -> last_hidden_state`: the model's encoder alone."""
    import torch

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            encoder = self.model.get_encoder()
            return encoder(input_ids=input_ids, attention_mask=attention_mask, return_dict=True).last_hidden_state

    return Encoder().eval()


def decoder_wrapper(model: Any, layout: Seq2SeqLayout, with_past: bool) -> Any:
    """`(encoder_attention_mask, input_ids, encoder_hidden_states, *flat past) -> (logits, *present)`: the whole
    model (decoder, LM head and its scaling) run from the encoder's output with an `EncoderDecoderCache`."""
    import torch
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache
    from transformers.modeling_outputs import BaseModelOutput

    class Decoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, encoder_attention_mask: Any, input_ids: Any, encoder_hidden_states: Any,
                    *past: Any) -> tuple[Any, ...]:
            config = self.model.config
            own, cross = DynamicCache(config=config), DynamicCache(config=config)
            for index in range(layout.layers if with_past else 0):
                own.update(past[4 * index], past[4 * index + 1], index)
                cross.update(past[4 * index + 2], past[4 * index + 3], index)
            encoded = BaseModelOutput(last_hidden_state=encoder_hidden_states)
            output = self.model(encoder_outputs=encoded, attention_mask=encoder_attention_mask,
                                decoder_input_ids=input_ids, cache=EncoderDecoderCache(own, cross), use_cache=True,
                                return_dict=True)
            cache = output.cache
            flat = [t for layer in cache.self_attention_cache.layers for t in (layer.keys, layer.values)]
            if not with_past:
                flat += [t for layer in cache.cross_attention_cache.layers for t in (layer.keys, layer.values)]
            return (output.logits, *flat)

    return Decoder().eval()


def encoder_feed(layout: Seq2SeqLayout, batch: int, sequence: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random token ids; the first row is padded at its end (when longer than one token)."""
    rng = np.random.default_rng(seed)
    mask = np.ones((batch, sequence), dtype=np.int64)
    if sequence > 1:
        mask[0, -1] = 0
    return {"input_ids": rng.integers(0, layout.vocab_size, (batch, sequence), dtype=np.int64),
            "attention_mask": mask}


def decoder_feed(layout: Seq2SeqLayout, batch: int, encoder: int, decoder: int, past: int | None,
                 seed: int = 0) -> dict[str, np.ndarray]:
    """A decoder pass's inputs (named like the graph's); random hidden states and cache (`past` None: no past)."""
    rng = np.random.default_rng(seed)
    mask = encoder_feed(layout, batch, encoder, seed)["attention_mask"]
    feed = {"encoder_attention_mask": mask,
            "input_ids": rng.integers(0, layout.vocab_size, (batch, decoder), dtype=np.int64),
            "encoder_hidden_states": rng.standard_normal((batch, encoder, layout.hidden_size)).astype(np.float32)}
    for name in layout.past_names() if past is not None else []:
        length = past if past is not None and ".decoder." in name else encoder
        feed[name] = rng.standard_normal((batch, layout.heads, length, layout.head_dim)).astype(np.float32)
    return feed


@dataclass(frozen=True)
class _Graph:
    """One graph of the folder: how to build its module, its names, and the sizes it is traced and checked at."""

    file: str
    module: Callable[[], Any]
    inputs: list[str]
    outputs: list[str]
    axes: dict[str, dict[int, str]]
    feed: Callable[[tuple[int, ...]], dict[str, np.ndarray]]
    trace: tuple[int, ...]
    checks: tuple[tuple[int, ...], ...]


def _graphs(model: Any, layout: Seq2SeqLayout) -> list[_Graph]:
    batch, encoder, decoder, past = _TRACE

    def decoder_graph(file: str, with_past: bool, checks: tuple[tuple[int, ...], ...]) -> _Graph:
        def feed(sizes: tuple[int, ...]) -> dict[str, np.ndarray]:
            past_length = sizes[3] if with_past else None
            return decoder_feed(layout, sizes[0], sizes[1], sizes[2], past_length, seed=sum(sizes))

        trace = (batch, encoder, decoder, past) if with_past else (batch, encoder, decoder)
        return _Graph(file, lambda: decoder_wrapper(model, layout, with_past), layout.decoder_inputs(with_past),
                      layout.decoder_outputs(with_past), layout.decoder_axes(with_past), feed, trace, checks)

    return [
        _Graph(ENCODER_FILE, lambda: encoder_wrapper(model), ENCODER_INPUTS, ENCODER_OUTPUTS, ENCODER_AXES,
               lambda sizes: encoder_feed(layout, sizes[0], sizes[1], seed=sum(sizes)), (batch, encoder),
               ((1, 7), (3, 2))),
        decoder_graph(DECODER_FILE, False, ((1, 4, 1), (3, 2, 4))),
        decoder_graph(DECODER_WITH_PAST_FILE, True, ((1, 6, 1, 1), (3, 3, 1, 4), (2, 4, 2, 3))),
    ]


@dataclass(frozen=True)
class Seq2SeqExport:
    """What was written: the folder, the three graphs' input and output names (as written), and the sizes each
    graph was checked at."""

    folder: Path
    family: str
    layout: Seq2SeqLayout
    graphs: dict[str, tuple[tuple[str, ...], tuple[str, ...]]]  # file -> (input names, output names)
    checked: dict[str, tuple[tuple[int, ...], ...]]  # file -> sizes run and compared with the model
    opset: int
    external_data: bool


def export_seq2seq(model: Any, output: Path, *, tokenizer: Any = None, force: bool = False,
                   opset: int = DEFAULT_OPSET, external_data: bool | None = None,
                   sources: list[Path] | None = None) -> Seq2SeqExport:
    """Export `model` (a transformers encoder-decoder LM, float32, CPU) to the folder `output`.

    The folder appears only once every graph is exported and checked against the model (and replaces the old
    one with `force`); a family that cannot be exported raises InputError naming it and leaves nothing behind.
    `external_data`: each graph's weights in `<graph>.onnx.data` (None: only when they exceed protobuf's 2 GiB).
    """
    import torch

    from mlops_cli.core.io import atomic_dir, check_output
    from mlops_cli.core.onnx_export import weights_need_external_data

    check_output(output, force, sources or [])
    model.eval()
    family = family_of(model)
    if any(p.dtype != torch.float32 for p in model.parameters()):
        raise InputError(f"the {family!r} model is not in float32: the seq2seq export traces float32 models",
                         hint="Load the model in float32 (`run` does), export, then convert the ONNX files.")
    layout = seq2seq_layout(model)
    external = weights_need_external_data(model) if external_data is None else external_data
    graphs = _graphs(model, layout)
    names: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {}
    with atomic_dir(output, force, sources or []) as folder:
        scratch = folder / ".scratch"
        for graph in graphs:
            written = scratch / graph.file.removesuffix(".onnx") / graph.file
            written.parent.mkdir(parents=True)
            _export_graph(graph, written, opset, family)
            gather_weights(written, external)
            names[graph.file] = _check_graph(graph, written, family)
            for file in written.parent.iterdir():
                file.rename(folder / file.name)
        shutil.rmtree(scratch)
        save_text_side(model, tokenizer, folder)
    return Seq2SeqExport(Path(output), family, layout, names, {g.file: g.checks for g in graphs}, opset, external)


def _export_graph(graph: _Graph, written: Path, opset: int, family: str) -> None:
    """The legacy exporter, without its constant folding: folding stores the transpose of a tied embedding (T5's,
    BART's LM head) as a second copy of it (t5-small's decoders: 232 and 220 MB instead of 167 and 154 MB);
    ONNX Runtime folds that transpose in memory when it loads the graph, at no measurable cost per token."""
    import torch

    feed = graph.feed(graph.trace)
    args = tuple(torch.from_numpy(feed[name]) for name in graph.inputs)
    try:
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about Python branches: the check below runs the graph
            torch.onnx.export(graph.module(), args, str(written), dynamo=False, input_names=graph.inputs,
                              output_names=graph.outputs, dynamic_axes=graph.axes,  # type: ignore[arg-type]
                              opset_version=opset, do_constant_folding=False)
    except Exception as exc:
        raise _unsupported(family, f"the ONNX exporter failed on {graph.file}: "
                                   f"{str(exc).strip().splitlines()[0]}") from exc


def _check_graph(graph: _Graph, written: Path, family: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Run the written graph at sizes other than the traced ones and compare every output with the wrapped model
    in eager mode (a padded encoder row, one and several decoder tokens, short and long pasts). Returns the
    graph's input and output names (the exporter drops an input the graph does not read)."""
    import torch

    from mlops_cli.core.compare import AGREEMENT, PRESETS, compare_arrays
    from mlops_cli.core.runtimes import onnx_session

    try:
        session = onnx_session(written)
    except InputError as exc:
        raise _unsupported(family, f"ONNX Runtime cannot load {graph.file}: {exc.message}") from exc
    takes = {i.name for i in session.get_inputs()}
    module = graph.module()
    for sizes in graph.checks:
        feed = graph.feed(sizes)
        where = f"{graph.file} at sizes {sizes}"
        try:
            outputs = session.run(graph.outputs, {name: value for name, value in feed.items() if name in takes})
        except Exception as exc:
            raise _unsupported(family, f"{where} fails: {str(exc).splitlines()[0]}") from exc
        with torch.inference_mode():
            expected = module(*(torch.from_numpy(feed[name]) for name in graph.inputs))
        expected = (expected,) if isinstance(expected, torch.Tensor) else expected
        for name, got, want in zip(graph.outputs, outputs, expected, strict=True):
            diff = compare_arrays(name, want.numpy(), got, *PRESETS["fp32"], agreement=AGREEMENT["fp32"])
            if not diff.passed:
                problem = diff.problem or f"max |diff| {diff.max_abs:.3g}"
                raise _unsupported(family, f"{where}: {name} differs from the model's: {problem}")
    return tuple(i.name for i in session.get_inputs()), tuple(o.name for o in session.get_outputs())


# ---------------------------------------------------------------- the service


@dataclass(frozen=True, kw_only=True)
class Seq2SeqExportOptions(OutputOptions):
    """`mlops export onnx MODEL --task seq2seq-lm -o FOLDER`: encoder and decoders with their caches."""

    opset: int = DEFAULT_OPSET
    external_data: bool | None = None  # None: only for weights over protobuf's 2 GiB


@dataclass(frozen=True, kw_only=True)
class Seq2SeqExportReport(Report):
    model: str
    output: str
    family: str
    layers: int
    heads: int
    head_dim: int
    graphs: dict[str, dict[str, tuple[str, ...]]]  # file -> {"inputs": names, "outputs": names}
    checked: dict[str, tuple[tuple[int, ...], ...]]  # file -> sizes run and compared with the model
    opset: int
    external_data: bool
    files: dict[str, int]  # every file of the folder -> bytes
    tokenizer: bool  # whether the tokenizer was saved beside the graphs


def seq2seq_load_options(ref: ModelRef, load: LoadOptions) -> LoadOptions:
    """The class config.json names when it names an encoder-decoder LM (the exact one: MarianMTModel, and speech
    models the probe then refuses by name), else AutoModelForSeq2SeqLM unless --task says otherwise."""
    from mlops_cli.core.loading import is_seq2seq_lm_folder

    return load if load.task or is_seq2seq_lm_folder(ref.path) else replace(load, task="seq2seq-lm")


def run(ref: ModelRef, options: Seq2SeqExportOptions) -> Seq2SeqExportReport:
    """Load MODEL as an encoder-decoder LM and export it to a folder of three graphs with their caches."""
    import torch

    from mlops_cli.core.io import check_output
    from mlops_cli.core.loading import ModelKind, load_model
    from mlops_cli.core.runtimes import gather_on_cpu

    check_output(options.output, options.force, ref.sources)  # before loading: an existing output fails fast
    load = seq2seq_load_options(ref, options.load)
    loaded = load_model(ref, load)
    if loaded.kind != ModelKind.HF or loaded.module is None:
        raise InputError(f"{ref} is not a transformers model ({loaded.kind.value}); the seq2seq export needs one",
                         hint="Pass a Hugging Face folder holding an encoder-decoder LM (T5, BART, Marian...).")
    gather_on_cpu(loaded, "export")  # a model placed by --device-map is traced whole, on CPU
    warnings = list(loaded.warnings)
    dtype = next(loaded.module.parameters()).dtype
    if dtype != torch.float32:
        loaded.module.float()
        warnings.append(f"the model's {str(dtype).removeprefix('torch.')} weights were exported as float32")
    if loaded.tokenizer is None:
        warnings.append("no tokenizer was found with the model: `mlops generate` on the folder will need one "
                        "copied into it")
    options.on_step("exporting")
    written = export_seq2seq(loaded.module, options.output, tokenizer=loaded.tokenizer, force=options.force,
                             opset=options.opset, external_data=options.external_data, sources=ref.sources)
    files = {p.name: p.stat().st_size for p in sorted(written.folder.iterdir()) if p.is_file()}
    layout = written.layout
    return Seq2SeqExportReport(
        model=str(ref), output=str(written.folder), family=written.family, layers=layout.layers,
        heads=layout.heads, head_dim=layout.head_dim,
        graphs={file: {"inputs": names[0], "outputs": names[1]} for file, names in written.graphs.items()},
        checked=written.checked, opset=written.opset, external_data=written.external_data, files=files,
        tokenizer=loaded.tokenizer is not None, warnings=tuple(warnings))
