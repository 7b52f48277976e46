"""`mlops compress half`: fp32 -> fp16/bf16, the same kind of artefact out as in, with its drift measured.

- safetensors -> safetensors, streamed tensor by tensor (services/compress_stream.py);
- torch state_dict / training checkpoint -> the same structure (other keys kept), written reproducibly;
- Hugging Face / mlops weights folder -> a folder with every file copied, weights converted, config dtype set;
- ONNX -> fp16 ONNX through ONNX Runtime's float16 converter, whose clamping is counted and reported.

Only floating-point tensors change. Overflow to inf (or, for ONNX, clamping to the largest finite fp16)
discards the output and fails unless `allow_overflow`; mask fills (+-the source dtype's largest value, as in
every Hugging Face attention mask) saturate to +-the target's largest value and are only noted. An input
already quantised to int8 is refused, and the drift check's inputs are settled before anything is written.
The drift check loads the written artefact (so it also proves the file loads) and compares it with the
original through the parity engine.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mlops_cli.core.compare import PRESETS
from mlops_cli.core.errors import InputError, UsageError
from mlops_cli.core.formats import HF_CONFIG, Format, detect_format, torch_load_weights
from mlops_cli.core.io import atomic_dir, atomic_file, check_output, save_torch
from mlops_cli.core.loading import LoadedModel, LoadOptions, load_model, split_checkpoint
from mlops_cli.core.parity import ParityReport, Tolerances, check_parity
from mlops_cli.services.compress import (
    HALF_DTYPES,
    NORM_ONNX_OPS,
    KeepRules,
    PerLayerReport,
    SafetyTotals,
    SizeSummary,
    TensorSafety,
    can_build_model,
    compare_layers,
    convert_state_dict,
    output_load_options,
    refuse_quantised,
    reject_builtin,
    resolve_input_specs,
    safety_totals,
    sentinel_notes,
    size_summary,
    tensor_safety,
    torch_dtype,
    weight_files,
)
from mlops_cli.services.compress_stream import stream_convert

FP16_MAX = 65504.0
ORT_MIN_POSITIVE = 5.96e-08  # what ONNX Runtime's converter raises smaller non-zero magnitudes to
FP16_TINY = 6.103515625e-05
INDEX_SUFFIX = ".index.json"
CPU_DRIFT_MODE = ("weights rounded to {dtype} and computed in float32 on CPU (CPU {dtype} compute is 10-100x "
                  "slower and not what a GPU does, so it is neither run nor timed)")
CUDA_DRIFT_MODE = "real {dtype} compute on {device} (model.to({dtype}), float inputs cast), timed against float32"
ONNX_DRIFT_MODE = "ONNX Runtime on {device}: the {dtype} graph against the original graph"


@dataclass(frozen=True)
class HalfOptions:
    dtype: str = "fp16"
    keep_fp32: tuple[str, ...] = ()
    default_keep: bool = True
    allow_overflow: bool = False
    keep_io_types: bool = True
    check: bool = True
    per_layer: bool = False
    device: str = "auto"
    inputs: tuple[str, ...] = ()
    seed: int = 0
    tolerances: Tolerances | None = None
    repeats: int = 10
    force: bool = False


@dataclass(frozen=True)
class HalfReport:
    source: str
    output: str
    input_format: str
    output_format: str
    dtype: str
    keep_patterns: tuple[str, ...]
    default_keep: bool
    written: bool
    streamed: bool
    tensors: tuple[TensorSafety, ...]
    totals: SafetyTotals
    size: SizeSummary
    overflow_action: str
    underflow_action: str
    subnormal_below: float  # the target dtype's smallest normal magnitude
    seconds: float
    passed: bool
    verdict: str
    files_copied: tuple[str, ...] = ()
    checkpoint_keys_kept: tuple[str, ...] = ()
    drift: ParityReport | None = None
    drift_mode: str | None = None
    per_layer: PerLayerReport | None = None
    notes: tuple[str, ...] = ()


@dataclass
class _Conversion:
    """What a format-specific converter did (filled in as it goes)."""

    output_format: str
    tensors: list[TensorSafety] = field(default_factory=list)
    streamed: bool = False
    files_copied: list[str] = field(default_factory=list)
    checkpoint_keys_kept: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    written: bool = False
    overflow_action: str = "became inf"
    underflow_action: str = "flushed to zero"


class _Discard(Exception):
    """Raised inside an atomic writer to throw the output away (overflow without --allow-overflow)."""


def compress_half(reference: str, output: Path, load: LoadOptions, options: HalfOptions) -> HalfReport:
    """Convert a model's floating tensors to fp16/bf16 and measure what that did."""
    import torch

    reject_builtin(reference)
    if options.dtype not in HALF_DTYPES:
        raise UsageError(f"--dtype {options.dtype!r} is not one of {', '.join(HALF_DTYPES)}")
    target = HALF_DTYPES[options.dtype]
    source = Path(reference)
    fmt = detect_format(source)
    _check_supported(fmt, options)
    refuse_quantised(source, fmt, "compress half")
    check_output(output, options.force, [source])
    keep = KeepRules.build(options.keep_fp32, options.default_keep)
    original = load_model(reference, load) if options.check and can_build_model(source, fmt, load.arch) else None
    if original is not None:  # before converting: a model whose inputs are unknown must leave nothing behind
        options = replace(options, inputs=resolve_input_specs(original, options.inputs))

    started = time.perf_counter()
    conversion = _convert(source, fmt, output, target, keep, load, options)
    seconds = time.perf_counter() - started
    totals = safety_totals(conversion.tensors)
    notes = list(conversion.notes) + sentinel_notes(conversion.tensors, target)
    drift = mode = per_layer = None
    if conversion.written and original is not None:
        drift, mode, per_layer = _measure_drift(original, output, load, options, target)
    elif conversion.written and options.check:
        notes.append("drift not measured: this file holds only weights; pass --arch (and --input) to build the model")
    passed, verdict = _verdict(conversion, totals, drift, options, target)
    return HalfReport(
        source=str(source), output=str(output), input_format=fmt.value, output_format=conversion.output_format,
        dtype=target, keep_patterns=keep.patterns, default_keep=keep.defaults_used, written=conversion.written,
        streamed=conversion.streamed, tensors=tuple(conversion.tensors), totals=totals,
        size=size_summary(conversion.tensors, source, output if conversion.written else None),
        overflow_action=conversion.overflow_action, underflow_action=conversion.underflow_action,
        subnormal_below=float(torch.finfo(torch_dtype(target)).tiny), seconds=seconds, passed=passed,
        verdict=verdict, files_copied=tuple(conversion.files_copied),
        checkpoint_keys_kept=tuple(conversion.checkpoint_keys_kept), drift=drift, drift_mode=mode,
        per_layer=per_layer, notes=tuple(notes))


def _check_supported(fmt: Format, options: HalfOptions) -> None:
    if fmt in (Format.TORCHSCRIPT, Format.EXPORTED_PROGRAM, Format.AOTI_PACKAGE, Format.NPZ):
        raise InputError(f"compress half converts weights files, model folders and ONNX files, not {fmt.value}",
                         hint="Compress the checkpoint the program was made from, then export it again.")
    if fmt == Format.ONNX and options.dtype != "fp16":
        raise UsageError("--dtype bf16 is not available for ONNX: ONNX Runtime's converter writes float16",
                         hint="Use --dtype fp16 for ONNX, or compress the torch checkpoint to bf16.")
    if fmt == Format.ONNX and options.per_layer:
        raise UsageError("--per-layer needs a torch model (it hooks modules); an ONNX graph has none",
                         hint="Run --per-layer on the checkpoint the ONNX file was exported from.")


def _convert(source: Path, fmt: Format, output: Path, target: str, keep: KeepRules, load: LoadOptions,
             options: HalfOptions) -> _Conversion:
    if fmt == Format.ONNX:
        return _convert_onnx(source, output, keep, options)
    if fmt in (Format.HF_FOLDER, Format.WEIGHTS_FOLDER):
        conversion = _Conversion(fmt.value)
        try:
            with atomic_dir(output, options.force, [source]) as folder:
                _convert_folder(source, folder, target, keep, load, conversion)
                _discard_on_overflow(conversion, options)
            conversion.written = True
        except _Discard:
            pass
        return conversion
    if fmt == Format.SAFETENSORS:
        conversion = _Conversion(fmt.value, streamed=True)
        try:
            with atomic_file(output, options.force, [source]) as temp:
                conversion.tensors = stream_convert(source, temp, target, keep)
                _discard_on_overflow(conversion, options)
            conversion.written = True
        except _Discard:
            pass
        return conversion
    conversion = _Conversion(Format.TORCH_ZIP.value)
    content = _convert_torch_file(source, target, keep, load.key, conversion, prefix="")
    if fmt == Format.TORCH_LEGACY:
        conversion.notes.append("the legacy pickle format was written as a torch zip (what torch.save writes today)")
    if not _overflow_refused(conversion, options):
        save_torch(content, output, options.force, [source])
        conversion.written = True
    return conversion


def _overflow_refused(conversion: _Conversion, options: HalfOptions) -> bool:
    return not options.allow_overflow and any(t.overflow for t in conversion.tensors)


def _discard_on_overflow(conversion: _Conversion, options: HalfOptions) -> None:
    if _overflow_refused(conversion, options):
        raise _Discard


def _convert_torch_file(source: Path, target: str, keep: KeepRules, key: str | None, conversion: _Conversion,
                        prefix: str) -> Any:
    """Convert the state_dict inside a torch file; a training checkpoint keeps its other entries untouched."""
    content = torch_load_weights(source)
    state_dict, state_key, extras = split_checkpoint(content, key, source)
    converted, safety = convert_state_dict(state_dict, target, keep)
    conversion.tensors += [_prefixed(t, prefix) for t in safety]
    if state_key is None:
        return converted
    conversion.checkpoint_keys_kept += [f"{prefix}{k}" for k in extras]
    return {k: (converted if k == state_key else v) for k, v in content.items()}


def _prefixed(safety: TensorSafety, prefix: str) -> TensorSafety:
    if not prefix:
        return safety
    from dataclasses import replace

    return replace(safety, name=f"{prefix}{safety.name}")


def _convert_folder(source: Path, folder: Path, target: str, keep: KeepRules, load: LoadOptions,
                    conversion: _Conversion) -> None:
    """Every file copied; weight files converted; config dtype and shard index sizes updated."""
    weights = weight_files(source)
    if not weights:
        raise InputError(f"{source} holds no weight files (*.safetensors, pytorch_model*.bin)")
    prefix_names = len(weights) > 1
    conversion.streamed = bool(weights) and all(detect_format(p) == Format.SAFETENSORS for p in weights)
    for path in sorted(source.iterdir()):
        destination = folder / path.name
        prefix = f"{path.name}:" if prefix_names else ""
        if path.is_dir():
            shutil.copytree(path, destination)
            conversion.files_copied.append(f"{path.name}/")
        elif path in weights and detect_format(path) == Format.SAFETENSORS:
            conversion.tensors += [_prefixed(t, prefix) for t in stream_convert(path, destination, target, keep)]
        elif path in weights:
            content = _convert_torch_file(path, target, keep, load.key, conversion, prefix)
            save_torch(content, destination)
        elif path.name == HF_CONFIG:
            _write_config(path, destination, target)
        else:
            shutil.copyfile(path, destination)
            conversion.files_copied.append(path.name)
    for index in folder.glob(f"*{INDEX_SUFFIX}"):
        _update_index(index, folder)


def _write_config(source: Path, destination: Path, target: str) -> None:
    try:
        config = json.loads(source.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"{source} could not be read: {exc}") from exc
    config["dtype"] = target
    if "torch_dtype" in config:  # transformers < 5 wrote this name
        config["torch_dtype"] = target
    destination.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _update_index(index: Path, folder: Path) -> None:
    """A sharded checkpoint's index records the total size of the weights: recompute it (safetensors shards)."""
    from mlops_cli.core.formats import read_safetensors_header

    data = json.loads(index.read_text(encoding="utf-8"))
    shards = [folder / name for name in sorted(set((data.get("weight_map") or {}).values()))]
    if not shards or not all(shard.suffix == ".safetensors" and shard.is_file() for shard in shards):
        return
    total = sum(info["nbytes"] for shard in shards for info in read_safetensors_header(shard)[0].values())
    data.setdefault("metadata", {})["total_size"] = total
    index.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


# ---------------------------------------------------------------- ONNX


def _convert_onnx(source: Path, output: Path, keep: KeepRules, options: HalfOptions) -> _Conversion:
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    model = onnx.load(str(source))
    before = _onnx_tensors(model)
    initializers = {init.name for init in model.graph.initializer}
    blocked_nodes = [node.name for node in model.graph.node if node.name and (
        keep.match(node.name) or any(keep.match(name) for name in node.input if name in initializers))]
    blocked_ops = list(DEFAULT_OP_BLOCK_LIST) + (list(NORM_ONNX_OPS) if keep.defaults_used else [])
    converted = convert_float_to_float16(model, keep_io_types=options.keep_io_types, op_block_list=blocked_ops,
                                         node_block_list=blocked_nodes, max_finite_val=FP16_MAX,
                                         min_positive_val=ORT_MIN_POSITIVE)
    after = _onnx_tensors(converted)
    conversion = _Conversion(Format.ONNX.value, overflow_action="clamped to +-65504 by ONNX Runtime's converter",
                             underflow_action="raised to +-5.96e-08 by ONNX Runtime's converter")
    conversion.tensors = [_onnx_safety(name, array, after.get(name), keep) for name, array in before.items()]
    conversion.notes.append(f"nodes kept in float32: {len(blocked_nodes)} by name/initializer pattern, plus op types "
                            f"{', '.join(sorted(set(blocked_ops)))}; inputs/outputs "
                            f"{'kept float32 (--keep-io-types)' if options.keep_io_types else 'converted to float16'}")
    if _overflow_refused(conversion, options):
        return conversion
    if converted.ByteSize() > 2**31 - 1:
        raise UsageError("the float16 ONNX model is over 2 GiB, which one protobuf file cannot hold",
                         hint="Compress the torch checkpoint instead and export it again.")
    with atomic_file(output, options.force, [source]) as temp:
        onnx.save_model(converted, str(temp))
    conversion.written = True
    return conversion


def _onnx_tensors(model: Any) -> dict[str, Any]:
    """Initializers and Constant-node values of the main graph, as numpy arrays by name."""
    from onnx import numpy_helper

    tensors = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value" and attribute.HasField("t"):
                    tensors[f"Constant:{node.output[0]}"] = numpy_helper.to_array(attribute.t)
    return tensors


def _onnx_safety(name: str, array: Any, result: Any, keep: KeepRules) -> TensorSafety:
    """What ONNX Runtime's converter did to one tensor, with its clamping counted instead of hidden."""
    import numpy as np

    from mlops_cli.services.compress import CastCounts

    source_dtype = str(array.dtype)
    output_dtype = str(result.dtype) if result is not None else source_dtype
    shape = tuple(array.shape)
    sizes = (array.dtype.itemsize, result.dtype.itemsize if result is not None else array.dtype.itemsize)
    converted = source_dtype == "float32" and output_dtype == "float16"
    if not converted:
        pattern = keep.match(name)
        reason = ("not floating-point" if not np.issubdtype(array.dtype, np.floating) else
                  f"kept: matches {pattern}" if pattern else
                  f"kept {source_dtype}: used only by nodes that stay float32" if source_dtype == "float32" else
                  f"left {source_dtype} by the converter")
        return tensor_safety(name, shape, source_dtype, output_dtype, False, reason, sizes)
    values = array.astype(np.float64).ravel()
    finite = np.isfinite(values)
    magnitude = np.abs(np.where(finite, values, 0.0))
    out = np.abs(result.astype(np.float64).ravel())
    sentinel = int((magnitude == np.finfo(array.dtype).max).sum())  # mask fills: the converter clamps them too
    counts = CastCounts(
        overflow=int((magnitude > FP16_MAX).sum()) - sentinel,
        underflow=int(((magnitude > 0) & (magnitude < ORT_MIN_POSITIVE)).sum()),
        subnormal=int(((out > 0) & (out < FP16_TINY)).sum()),
        nonfinite_source=int((~finite).sum()),
        max_abs=float(magnitude.max()) if magnitude.size else 0.0, sentinel=sentinel)
    return tensor_safety(name, shape, source_dtype, output_dtype, True, "converted", sizes, counts)


# ---------------------------------------------------------------- drift


def _measure_drift(original: LoadedModel, output: Path, load: LoadOptions, options: HalfOptions, target: str
                   ) -> tuple[ParityReport, str, PerLayerReport | None]:
    """The written artefact against the original, through the parity engine (and hooks for --per-layer)."""
    from mlops_cli.core.inputs import model_shape_sets
    from mlops_cli.core.runtimes import resolve_device, runner_for

    device = resolve_device(options.device)
    input_sets = model_shape_sets(original, list(options.inputs) or None, options.seed)
    candidate = load_model(str(output), output_load_options(original, load))
    tolerances = options.tolerances or Tolerances(*PRESETS["fp16" if target == "float16" else "bf16"])
    if original.module is None:  # ONNX
        mode = ONNX_DRIFT_MODE.format(device=device, dtype=target)
        report = check_parity(runner_for(original, device), runner_for(candidate, device), input_sets, tolerances,
                              time_runs=False)
        return report, mode, None
    if device == "cpu":
        candidate.module.float()  # the rounded weights, computed in float32
        if candidate.format == Format.HF_FOLDER:
            _restore_file_weights(candidate.module, output)
        mode = CPU_DRIFT_MODE.format(dtype=target)
    else:
        _run_in_dtype(candidate.module, target)
        mode = CUDA_DRIFT_MODE.format(dtype=target, device=device)
    reference_runner, candidate_runner = runner_for(original, device), runner_for(candidate, device)
    report = check_parity(reference_runner, candidate_runner, input_sets, tolerances, time_runs=device != "cpu",
                          repeats=options.repeats)
    per_layer = None
    if options.per_layer:
        first = input_sets[0]
        per_layer = compare_layers(original.module, candidate.module, lambda: reference_runner(first.tensors),
                                   lambda: candidate_runner(first.tensors), first.label, target)
    return report, mode, per_layer


def _restore_file_weights(module: Any, folder: Path) -> None:
    """transformers casts every tensor to the config's dtype on load; put back exactly what the files hold,
    so tensors kept in float32 are measured as kept."""
    import torch
    from safetensors.torch import load_file

    expected = module.state_dict()
    with torch.no_grad():
        for path in weight_files(folder):
            stored = load_file(str(path)) if path.suffix == ".safetensors" else split_checkpoint(
                torch_load_weights(path), None, path)[0]
            for name, tensor in stored.items():
                if name in expected and expected[name].shape == tensor.shape and tensor.is_floating_point():
                    expected[name].copy_(tensor)


def _run_in_dtype(module: Any, target: str) -> None:
    """Real half-precision compute (CUDA): the module in `target`, its floating inputs cast on the way in."""
    import torch

    dtype = torch_dtype(target)
    module.to(dtype)

    def cast_inputs(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any]:
        def cast(value: Any) -> Any:
            return value.to(dtype) if isinstance(value, torch.Tensor) and value.is_floating_point() else value
        return tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}

    module.register_forward_pre_hook(cast_inputs, with_kwargs=True)


# ---------------------------------------------------------------- verdict


def _verdict(conversion: _Conversion, totals: SafetyTotals, drift: ParityReport | None, options: HalfOptions,
             target: str) -> tuple[bool, str]:
    if totals.overflow:
        where = ", ".join(totals.tensors_with_overflow[:3]) + (" ..." if len(totals.tensors_with_overflow) > 3 else "")
        if not options.allow_overflow:
            return False, (f"{totals.overflow} value(s) overflow {target} ({conversion.overflow_action}) in {where}; "
                           "output not written (--allow-overflow writes it anyway)")
        overflow_note = f"; {totals.overflow} overflowing value(s) allowed ({conversion.overflow_action})"
    else:
        overflow_note = ""
    if drift is not None and not drift.passed:
        return False, f"drift beyond tolerance: {drift.verdict}{overflow_note}"
    drift_note = (f"; drift within tolerance (atol {drift.atol:g}, rtol {drift.rtol:g})" if drift
                  else "; drift not measured")
    return True, f"{totals.converted_tensors} tensor(s) converted to {target}{drift_note}{overflow_note}"
