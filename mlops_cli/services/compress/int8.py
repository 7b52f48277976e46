"""`mlops compress int8`: dynamic int8 quantisation, with size, CPU latency and drift measured.

- ONNX -> ONNX through ONNX Runtime's `quantize_dynamic` (int8 weights, activations quantised on the fly);
  which op types were quantised is read back from the written graph, not assumed.
- torch models (HF folders, weights + architecture, training checkpoints) through
  `torch.ao.quantization.quantize_dynamic`: Linear layers (and GPT-2's Conv1D, turned into the Linear
  it is), optionally embeddings (weight-only). It is deprecated since torch 2.10 but is still the only
  dynamic int8 path in core torch 2.13; its successor, torchao's `quantize_`, is not installed. The
  result is a torch file of the quantised state_dict (safetensors cannot hold quantised tensors),
  loadable with weights_only=True; `load_int8_state` rebuilds the model from it, and the drift check
  uses exactly that, so the written file is what gets measured.

An input that is already quantised (packed int8 layers, quantization.json, quantised ONNX ops) is refused,
and the drift check's inputs are settled before anything is written. The drift check uses the int8 tolerance
preset unless told otherwise; a failed check keeps the output (to inspect it) and says so.
"""

from __future__ import annotations

import copy
import functools
import re
import shutil
import warnings
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mlops_cli.core.contract import ModelRef, OutputOptions, Report
from mlops_cli.core.errors import InputError, UsageError
from mlops_cli.core.formats import HF_CONFIG, WEIGHT_SUFFIXES, Format, detect_format, torch_load_weights
from mlops_cli.core.inputs import InputPlan, InputRequest
from mlops_cli.core.int8_state import (
    INT8_WEIGHTS,
    QUANTIZATION_INFO,
    Int8Layout,
    load_int8_state,
    quantizable_kind,
    quantize_torch,
)
from mlops_cli.core.io import atomic_dir, check_output, save_torch
from mlops_cli.core.loading import LoadedModel, load_model
from mlops_cli.core.onnx_export import (
    atomic_onnx,
    check_onnx_output,
    has_external_data,
    load_onnx,
    quiet_exporters,
)
from mlops_cli.core.parity import ParityReport, Tolerances, check_parity
from mlops_cli.core.sidecar import SIDECAR, read_sidecar, write_sidecar
from mlops_cli.core.timing import Timing, measure_interleaved
from mlops_cli.services.compress.shared import (
    KV_DECODER_NOTE,
    disk_size,
    loader_warnings,
    perplexity_probe,
    plan_check_inputs,
    preset_label,
    refuse_quantised,
    source_path,
    weight_files,
)
from mlops_cli.services.perplexity import EvaluationText, PerplexityComparison, PerplexityProbe

ONNX_DEFAULT_OPS = ("MatMul", "Gemm", "Attention", "LSTM")
ONNX_EMBEDDING_OPS = ("Gather",)
TORCH_ENGINE = "torch.ao.quantization.quantize_dynamic (qint8 weights, dynamic activations; x86/fbgemm kernels)"
TORCH_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")  # training_args.bin, optimizer.pt: not weights, copied
TORCH_ENGINE_NOTE = ("torch.ao.quantization is deprecated since torch 2.10 and still the only dynamic int8 path in "
                     "core torch 2.13; its successor is torchao's quantize_ (not installed)")


@dataclass(frozen=True, kw_only=True)
class Int8Options(OutputOptions):
    quantize_embeddings: bool = False
    per_channel: bool = True
    reduce_range: bool | None = None  # None: on with per-channel weights (see _onnx_int8)
    exclude: tuple[str, ...] = ()
    op_types: tuple[str, ...] = ONNX_DEFAULT_OPS
    inputs: InputRequest = field(default_factory=InputRequest)
    preset: str | None = None  # tolerance preset (core/compare.py PRESETS); None: int8 (auto)
    tolerances: Tolerances | None = None  # --atol/--rtol; None: the preset's
    repeats: int = 20  # timed runs per model and input set; 0 skips timing
    check: bool = True
    evaluation: EvaluationText | None = field(default_factory=EvaluationText)  # causal LMs; None: not measured
    tokenizer: Path | None = None  # for the perplexity of an ONNX decoder; default: beside the file


@dataclass(frozen=True)
class QuantizedKind:
    """One op/module type: how many carry weights, how many were quantised, and why not the rest."""

    kind: str
    with_weights: int
    quantized: int
    note: str = ""


@dataclass(frozen=True)
class LatencyRow:
    """Warm latency of both models on one input set, timed A/B/A/B so machine noise hits both alike."""

    input_set: str
    before: Timing
    after: Timing
    speedup: float | None


@dataclass(frozen=True, kw_only=True)
class Int8Report(Report):
    source: str
    output: str
    input_format: str
    output_format: str
    engine: str
    weights: str
    embeddings_quantized: bool
    kinds: tuple[QuantizedKind, ...]
    skipped: tuple[tuple[str, str], ...]  # (layer, why it stayed float)
    bytes_before: int
    bytes_after: int
    size_ratio: float | None
    drift: ParityReport | None
    latency: tuple[LatencyRow, ...]
    timing_setup: str  # what ran the timed calls, with how many threads
    passed: bool
    verdict: str
    reload: str | None = None
    notes: tuple[str, ...] = ()
    written: bool = True  # the output stays even when the drift check fails (to inspect it)
    preset: str | None = None  # the tolerance preset of the drift check, e.g. "int8 (auto)"
    perplexity: PerplexityComparison | None = None  # causal LMs, measured with the drift check


def run(ref: ModelRef, options: Int8Options) -> Int8Report:
    """Quantise a model to dynamic int8 and measure size, latency and drift against the original."""
    from mlops_cli.core.runtimes import gather_on_cpu, use_threads

    source = source_path(ref)
    use_threads(options.threads)
    fmt = detect_format(source)
    for pattern in options.exclude:
        _compile(pattern)
    refuse_quantised(source, fmt, "compress int8")
    (check_onnx_output if fmt == Format.ONNX else check_output)(options.output, options.force, ref.sources)
    if fmt in (Format.TORCHSCRIPT, Format.EXPORTED_PROGRAM, Format.AOTI_PACKAGE, Format.NPZ):
        raise InputError(f"compress int8 quantises ONNX files and torch checkpoints, not {fmt.value}",
                         hint="Quantise the checkpoint the program was made from, or its ONNX export.")
    options.on_step("loading the original")
    original = load_model(ref, options.load)
    gather_on_cpu(original, "int8 quantisation")
    # Settled before quantising, so a model whose inputs are unknown writes nothing.
    probe, unmeasured = perplexity_probe(original, options.evaluation, options.tokenizer, options.check,
                                         options.on_step)
    plan = plan_check_inputs(original, options.inputs, evaluated=probe is not None) if options.check else None
    if fmt == Format.ONNX:
        report = _onnx_int8(source, original, plan, probe, options)
    else:
        report = _torch_int8(source, fmt, original, plan, probe, options)
    return replace(report, warnings=(*report.warnings, unmeasured)) if unmeasured else report


def _compile(pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise UsageError(f"--exclude {pattern!r} is not a valid regular expression: {exc}") from exc


def _excluded(name: str, options: Int8Options) -> str | None:
    return next((p for p in options.exclude if re.search(p, name)), None)


# ---------------------------------------------------------------- ONNX


def _onnx_int8(source: Path, original: LoadedModel, plan: InputPlan | None, probe: PerplexityProbe | None,
               options: Int8Options) -> Int8Report:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    output = options.output
    graph = onnx.load(str(source), load_external_data=False).graph
    op_types = tuple(dict.fromkeys(options.op_types + (ONNX_EMBEDDING_OPS if options.quantize_embeddings else ())))
    weighted = _weighted_nodes(graph)
    excluded = [node.name for node, weights in weighted if _excluded(node.name, options)
                or any(_excluded(name, options) for name in weights)]
    # x86 CPUs without VNNI saturate int16 sums of uint8 x int8 products; per-channel weights hit it
    # (measured: tiny GPT-2 drift 0.16 full range vs 0.011 reduced), so they use 7 bits unless told otherwise.
    reduce_range = options.per_channel if options.reduce_range is None else options.reduce_range
    options.on_step("quantising")
    # Weights in `<output>.data` when the source kept them apart (a source under the threshold in one file
    # quantises to an int8 file under it too); written beside the output under its name, then moved into place.
    with atomic_onnx(output, options.force, [source]) as written, quiet_exporters():
        # A ModelProto, not the path: its op domains declared (a fused graph may not import com.microsoft, which
        # onnx's shape inference refuses), and ONNX Runtime writes its `-inferred.onnx` in a temporary folder
        # rather than beside the source.
        quantize_dynamic(load_onnx(source), str(written), op_types_to_quantize=list(op_types),
                         per_channel=options.per_channel, reduce_range=reduce_range, weight_type=QuantType.QInt8,
                         nodes_to_exclude=excluded,
                         # DefaultTensorType: the outputs of contrib ops (fused graphs) have no inferred type
                         extra_options={"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT},
                         use_external_data_format=has_external_data(source))
    quantized = onnx.load(str(output), load_external_data=False).graph
    kinds = _onnx_kinds(weighted, quantized, op_types, options)
    skipped = tuple((name, "matches --exclude") for name in excluded)
    candidate = load_model(str(output), options.load) if plan is not None or probe is not None else None
    drift, latency = _drift(original, candidate, plan, options) if candidate and plan else (None, ())
    notes = (KV_DECODER_NOTE,) if plan is None and probe is not None else ()
    weights = (f"int8 ({'per-channel' if options.per_channel else 'per-tensor'}"
               f"{', 7-bit range (reduce_range)' if reduce_range else ''}), activations uint8 per call")
    return _report(source, Format.ONNX.value, Format.ONNX.value, "onnxruntime.quantization.quantize_dynamic",
                   weights, options, kinds, skipped, drift, latency, warnings=loader_warnings(original, candidate),
                   perplexity=_perplexity(probe, candidate, options), notes=notes)


def _weighted_nodes(graph: Any) -> list[tuple[Any, list[str]]]:
    """(node, its floating-point weights) for nodes of a type ONNX Runtime can quantise that have weights."""
    import onnx
    from onnxruntime.quantization.registry import IntegerOpsRegistry

    quantisable = set(IntegerOpsRegistry) | {"Gemm"}  # Gemm is quantised as MatMulInteger + Add
    floats = {init.name for init in graph.initializer
              if init.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)}
    nodes = [(node, [name for name in node.input if name in floats]) for node in graph.node
             if node.op_type in quantisable]
    return [(node, weights) for node, weights in nodes if weights]


def _onnx_kinds(weighted: list[tuple[Any, list[str]]], quantized: Any, op_types: tuple[str, ...], options: Int8Options
                ) -> tuple[QuantizedKind, ...]:
    """Per op type: nodes with weights, and how many the written graph shows quantised.

    A node counts as quantised when one of its weights now exists as an 8-bit initializer named after it
    (`<weight>_quantized`, ONNX Runtime's naming), read from the written graph rather than assumed.
    """
    import onnx

    eight_bit = [init.name for init in quantized.initializer
                 if init.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)]
    totals: Counter[str] = Counter()
    done: Counter[str] = Counter()
    for node, weights in weighted:
        totals[node.op_type] += 1
        if any(name.startswith(f"{weight}_") for weight in weights for name in eight_bit):
            done[node.op_type] += 1
    kinds = []
    for kind in sorted(totals, key=lambda k: (-totals[k], k)):
        note = ""
        if kind in ONNX_EMBEDDING_OPS and kind not in op_types:
            note = "embeddings kept float (--quantize-embeddings to quantise them)"
        elif kind not in op_types:
            note = "not requested (see --op-types)"
        elif done[kind] < totals[kind]:
            note = ("not all quantised: excluded, or left float by ONNX Runtime (a Gemm is quantised as a MatMul, "
                    "so it needs MatMul in --op-types)")
        kinds.append(QuantizedKind(kind, totals[kind], done[kind], note))
    return tuple(kinds)


# ---------------------------------------------------------------- torch


def _torch_int8(source: Path, fmt: Format, original: LoadedModel, plan: InputPlan | None,
                probe: PerplexityProbe | None, options: Int8Options) -> Int8Report:
    output = options.output
    layout = plan_torch_quantization(original.module, options)
    options.on_step("quantising")
    quantized = quantize_torch(copy.deepcopy(original.module), layout.layout)
    state = quantized.state_dict()
    notes = [TORCH_ENGINE_NOTE]
    if fmt in (Format.HF_FOLDER, Format.WEIGHTS_FOLDER):
        weights_file = output / INT8_WEIGHTS
        left_out = _write_folder(source, fmt, state, layout, options)
        output_format = f"folder with {INT8_WEIGHTS} (torch zip)"
        if left_out:
            notes.append(f"not copied (weights in other formats, which would still be float): {', '.join(left_out)}")
    else:
        weights_file = output
        _write_file(source, fmt, state, original, options)
        output_format = Format.TORCH_ZIP.value
        if fmt == Format.SAFETENSORS:
            notes.append("safetensors cannot hold quantised tensors: written as a torch file (weights_only-loadable)")
    drift: ParityReport | None = None
    latency: tuple[LatencyRow, ...] = ()
    perplexity = None
    if plan is not None:
        reloaded = load_int8_state(copy.deepcopy(original.module), _read_state(weights_file, original.state_key))
        candidate = replace(original, module=reloaded, reference=str(output), path=output, warnings=[])
        drift, latency = _drift(original, candidate, plan, options)
        perplexity = _perplexity(probe, candidate, options)
    reload = (f"build the model, then mlops_cli.core.int8_state.load_int8_state(model, state_dict of "
              f"{weights_file.name}); or by hand: quantize_dynamic with the same layers, then load_state_dict")
    weights = (f"int8 ({'per-channel' if options.per_channel else 'per-tensor'}), activations quantised per call"
               + ("; embeddings: uint8 per row, weight-only" if options.quantize_embeddings else ""))
    return _report(source, fmt.value, output_format, TORCH_ENGINE, weights, options, layout.kinds, layout.skipped,
                   drift, latency, reload=reload, notes=tuple(notes), warnings=loader_warnings(original),
                   perplexity=perplexity)


@dataclass(frozen=True)
class TorchPlan:
    """The layout to quantise to, plus what the report says about every candidate layer."""

    layout: Int8Layout
    kinds: tuple[QuantizedKind, ...]
    skipped: tuple[tuple[str, str], ...]


def plan_torch_quantization(module: Any, options: Int8Options) -> TorchPlan:

    owners: dict[int, list[str]] = {}
    for name, sub in module.named_modules():
        for parameter in sub._parameters.values():
            if parameter is not None:
                owners.setdefault(id(parameter), []).append(name)
    chosen: dict[str, str] = {}
    conv1d: list[str] = []
    skipped: list[tuple[str, str]] = []
    totals: Counter[str] = Counter()
    done: Counter[str] = Counter()
    for name, sub in module.named_modules():
        kind = quantizable_kind(sub)
        if kind is None:
            continue
        label = type(sub).__name__
        totals[label] += 1
        reason = _skip_reason(name, sub, kind, owners, options)
        if reason:
            skipped.append((name, reason))
            continue
        chosen[name] = kind
        done[label] += 1
        if label == "Conv1D":
            conv1d.append(name)
    kinds = tuple(QuantizedKind(label, totals[label], done[label],
                                "embeddings kept float (--quantize-embeddings to quantise them)"
                                if label in ("Embedding",) and not options.quantize_embeddings else
                                "as Linear (GPT-2's transposed Linear)" if label == "Conv1D" else "")
                  for label in sorted(totals, key=lambda k: (-totals[k], k)))
    return TorchPlan(Int8Layout(chosen, tuple(conv1d), options.per_channel), kinds, tuple(skipped))


def _skip_reason(name: str, sub: Any, kind: str, owners: dict[int, list[str]], options: Int8Options) -> str | None:
    pattern = _excluded(name, options)
    if pattern:
        return f"matches --exclude {pattern}"
    if kind == "embedding" and not options.quantize_embeddings:
        return "embedding (--quantize-embeddings off)"
    shared = [other for other in owners.get(id(sub.weight), []) if other != name]
    if shared:
        return f"weight tied to {shared[0]} (a quantised copy would store it twice)"
    return None


def _read_state(path: Path, state_key: str | None) -> dict[str, Any]:
    """The quantised state_dict from a written file (under the checkpoint's key when it has one)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="TypedStorage is deprecated")  # torch's own quantised storages
        content = torch_load_weights(path)
    if state_key is not None and isinstance(content, dict) and isinstance(content.get(state_key), dict):
        return content[state_key]
    return content


def _write_file(source: Path, fmt: Format, state: dict[str, Any], original: LoadedModel, options: Int8Options
                ) -> None:
    """One torch file: the quantised state_dict, inside the training checkpoint's structure when it had one."""
    content: Any = state
    if fmt in (Format.TORCH_ZIP, Format.TORCH_LEGACY) and original.state_key is not None:
        stored = torch_load_weights(source)
        content = {k: (state if k == original.state_key else v) for k, v in stored.items()}
    save_torch(content, options.output, options.force, [source])


def _write_folder(source: Path, fmt: Format, state: dict[str, Any], plan: TorchPlan, options: Int8Options
                  ) -> list[str]:
    """The folder again, with its weight files replaced by model.int8.pt and the method written down.

    Returns the files left out because they hold the float weights in another format (tf_model.h5, model.onnx...):
    copied, they would carry the float model along. Torch pickles that are not weights (training_args.bin) stay.
    """
    info = {"method": "dynamic-int8", "engine": TORCH_ENGINE, "weights": INT8_WEIGHTS,
            "per_channel": plan.layout.per_channel, "layers": plan.layout.modules,
            "conv1d_as_linear": list(plan.layout.conv1d),
            "reload": "build the float model, then mlops_cli.core.int8_state.load_int8_state(model, state)"}
    weights = weight_files(source)
    left_out = []
    with atomic_dir(options.output, options.force, [source]) as folder:
        for path in sorted(source.iterdir()):
            if path.is_dir():
                shutil.copytree(path, folder / path.name)
            elif path in weights or path.name.endswith(".index.json"):
                continue  # the float weights: replaced by the int8 file
            elif path.name.endswith(WEIGHT_SUFFIXES) and path.suffix not in TORCH_PICKLE_SUFFIXES:
                left_out.append(path.name)
            elif path.name == SIDECAR and fmt == Format.WEIGHTS_FOLDER:
                write_sidecar(folder, {**read_sidecar(source), "weights": INT8_WEIGHTS, "quantization": "dynamic-int8"})
            else:
                shutil.copyfile(path, folder / path.name)
        save_torch(state, folder / INT8_WEIGHTS)
        if fmt == Format.HF_FOLDER and (source / HF_CONFIG).is_file():
            write_sidecar(folder, info, QUANTIZATION_INFO)
    return left_out


# ---------------------------------------------------------------- drift, latency and the report


def _drift(original: LoadedModel, candidate: LoadedModel, plan: InputPlan, options: Int8Options
           ) -> tuple[ParityReport, tuple[LatencyRow, ...]]:
    """Both models on this CPU: outputs compared through the parity engine, then latencies measured."""
    from mlops_cli.core.runtimes import runner_for

    options.on_step("measuring drift")
    tolerances = options.tolerances or Tolerances.for_preset(options.preset or "int8")
    before, after = runner_for(original, "cpu"), runner_for(candidate, "cpu")
    report = check_parity(before, after, list(plan.sets), tolerances, time_runs=False)
    if options.repeats == 0:
        return report, ()
    options.on_step("timing before/after")
    rows = []
    for input_set in plan.sets:
        feed_before, feed_after = before.feed(input_set.tensors), after.feed(input_set.tensors)
        timings = measure_interleaved({"before": functools.partial(before, feed_before),
                                       "after": functools.partial(after, feed_after)},
                                      warmup=2, repeats=options.repeats)
        speedup = timings["before"].median_ms / timings["after"].median_ms if timings["after"].median_ms else None
        rows.append(LatencyRow(input_set.label, timings["before"], timings["after"], speedup))
    return report, tuple(rows)


def _report(source: Path, input_format: str, output_format: str, engine: str, weights: str, options: Int8Options,
            kinds: tuple[QuantizedKind, ...], skipped: tuple[tuple[str, str], ...], drift: ParityReport | None,
            latency: tuple[LatencyRow, ...], *, warnings: tuple[str, ...], reload: str | None = None,
            notes: tuple[str, ...] = (), perplexity: PerplexityComparison | None = None) -> Int8Report:
    before, after = disk_size(source), disk_size(options.output)
    quantized = sum(kind.quantized for kind in kinds)
    preset = preset_label(options.preset, "int8", overridden=options.tolerances is not None)
    if quantized == 0:
        passed, verdict = False, "nothing was quantised: no layer of a quantisable type (see the table)"
    elif drift is not None and not drift.passed:
        passed, verdict = False, f"drift beyond tolerance (preset {preset}): {drift.verdict}"
    else:
        passed = True
        drift_note = (f"drift within tolerance (preset {preset}: atol {drift.atol:g}, rtol {drift.rtol:g})" if drift
                      else "drift not measured")
        verdict = f"{quantized} layer(s) quantised to int8, {after / before:.2f}x the size; {drift_note}"
    return Int8Report(
        warnings=warnings, source=str(source), output=str(options.output), input_format=input_format,
        output_format=output_format, engine=engine, weights=weights, embeddings_quantized=options.quantize_embeddings,
        kinds=kinds, skipped=skipped, bytes_before=before, bytes_after=after,
        size_ratio=after / before if before else None, drift=drift, latency=latency,
        timing_setup=_timing_setup(input_format), passed=passed, verdict=verdict, reload=reload, notes=notes,
        preset=preset if drift else None, perplexity=perplexity)


def _perplexity(probe: PerplexityProbe | None, candidate: LoadedModel | None, options: Int8Options
                ) -> PerplexityComparison | None:
    """The quantised causal LM scored like the original (on this CPU, as the drift check runs it)."""
    if probe is None or candidate is None:
        return None
    options.on_step("measuring perplexity")
    return probe.compare(candidate)


def _timing_setup(input_format: str) -> str:
    """What ran the timed calls: the thread count is the one `use_threads` set for torch and ONNX Runtime alike."""
    import torch

    threads = torch.get_num_threads()
    if input_format == Format.ONNX.value:
        return f"ONNX Runtime CPU, {threads} intra-op thread(s)"
    return f"torch eager CPU, {threads} thread(s), quantized engine {torch.backends.quantized.engine}"
