"""`mlops compress half`: fp32 -> fp16/bf16, the same kind of artefact out as in, with its drift measured.

- safetensors -> safetensors, streamed tensor by tensor (stream.py);
- torch state_dict / training checkpoint -> the same structure (other keys kept), written reproducibly;
- Hugging Face / mlops weights folder -> a folder with every file copied, weights converted, config dtype set;
- ONNX -> fp16 ONNX through ONNX Runtime's float16 converter, whose clamping is counted (half_onnx.py).

Only floating-point tensors change, minus those the keep rules keep (keep.py: normalisation layers by module type
whenever the model can be built). Overflow to inf (or, for ONNX, clamping to the largest finite fp16) discards
the output and fails unless `allow_overflow`; mask fills (+-the source dtype's largest value, as in every Hugging
Face attention mask) saturate to +-the target's largest value and are only noted. An input already quantised to
int8 is refused, and the drift check's inputs are settled before anything is written. The drift check loads the
written artefact (so it also proves the file loads) and compares it with the original through the parity engine,
with the target dtype's tolerance preset unless told otherwise.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mlops_cli.core.contract import ModelRef, OutputOptions, Report
from mlops_cli.core.errors import InputError, UsageError
from mlops_cli.core.formats import HF_CONFIG, Format, detect_format, torch_load_weights
from mlops_cli.core.inputs import InputPlan, InputRequest
from mlops_cli.core.io import atomic_dir, atomic_file, check_output, save_torch
from mlops_cli.core.loading import LoadedModel, load_model, split_checkpoint
from mlops_cli.core.onnx_export import check_onnx_output
from mlops_cli.core.parity import ParityReport, Tolerances, check_parity
from mlops_cli.core.safetensors_file import torch_dtype
from mlops_cli.services.compress.cast import (
    HALF_DTYPES,
    SafetyTotals,
    SizeSummary,
    TensorSafety,
    convert_state_dict,
    safety_totals,
    sentinel_notes,
    size_summary,
)
from mlops_cli.services.compress.drift import PerLayerReport, compare_layers
from mlops_cli.services.compress.half_onnx import OVERFLOW_ACTION, UNDERFLOW_ACTION, convert_onnx, save_onnx
from mlops_cli.services.compress.keep import KeepRules
from mlops_cli.services.compress.shared import (
    KV_DECODER_NOTE,
    can_build_model,
    loader_warnings,
    output_load_options,
    perplexity_probe,
    plan_check_inputs,
    preset_label,
    refuse_quantised,
    source_path,
    weight_files,
)
from mlops_cli.services.compress.stream import stream_convert
from mlops_cli.services.perplexity import EvaluationText, PerplexityComparison, PerplexityProbe

INDEX_SUFFIX = ".index.json"
CPU_DRIFT_MODE = ("weights rounded to {dtype} and computed in float32 on CPU (CPU {dtype} compute is 10-100x "
                  "slower and not what a GPU does, so it is neither run nor timed)")
CUDA_DRIFT_MODE = "real {dtype} compute on {device} (model.to({dtype}), float inputs cast), timed against float32"
ONNX_DRIFT_MODE = "ONNX Runtime on {device}: the {dtype} graph against the original graph"
MIXED_CONFIG_NOTE = (
    "config.json dtype float32: transformers casts every tensor to the config's dtype on load (only classes that "
    "list _keep_in_fp32_modules are spared), so float32 is the one value that keeps the {kept} kept tensor(s) "
    "float32 in plain from_pretrained; the {target} tensors then load as float32 holding {target} values (what the "
    "drift check measured). dtype=torch.{target} loads everything, kept tensors included, as {target}.")


@dataclass(frozen=True, kw_only=True)
class HalfOptions(OutputOptions):
    dtype: str = "fp16"
    keep_fp32: tuple[str, ...] = ()
    default_keep: bool = True
    allow_overflow: bool = False
    keep_io_types: bool = True
    check: bool = True
    per_layer: bool = False
    device: str = "auto"
    inputs: InputRequest = field(default_factory=InputRequest)
    preset: str | None = None  # tolerance preset (core/compare.py PRESETS); None: the target dtype's (auto)
    tolerances: Tolerances | None = None  # --atol/--rtol; None: the preset's
    repeats: int = 10  # timed runs per input set on CUDA; 0 skips timing
    evaluation: EvaluationText | None = field(default_factory=EvaluationText)  # causal LMs; None: not measured
    tokenizer: Path | None = None  # for the perplexity of an ONNX decoder; default: beside the file


@dataclass(frozen=True, kw_only=True)
class HalfReport(Report):
    source: str
    output: str
    input_format: str
    output_format: str
    dtype: str
    keep_patterns: tuple[str, ...]
    default_keep: bool
    keep_rule: str  # how the kept tensors were chosen: module types, names, --keep-fp32
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
    config_dtype: str | None = None  # what an HF folder's config.json says after conversion
    drift: ParityReport | None = None
    drift_mode: str | None = None
    preset: str | None = None  # the tolerance preset of the drift check, e.g. "fp16 (auto)"
    per_layer: PerLayerReport | None = None
    notes: tuple[str, ...] = ()
    perplexity: PerplexityComparison | None = None  # causal LMs, measured with the drift check


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
    config_dtype: str | None = None
    overflow_action: str = "became inf"
    underflow_action: str = "flushed to zero"


@dataclass(frozen=True)
class _Drift:
    report: ParityReport
    mode: str
    per_layer: PerLayerReport | None
    candidate: LoadedModel
    perplexity: PerplexityComparison | None = None


class _Discard(Exception):
    """Raised inside an atomic writer to throw the output away (overflow without --allow-overflow)."""


def run(ref: ModelRef, options: HalfOptions) -> HalfReport:
    """Convert a model's floating tensors to fp16/bf16 and measure what that did."""
    import torch

    from mlops_cli.core.runtimes import use_threads

    source = source_path(ref)
    use_threads(options.threads)
    if options.dtype not in HALF_DTYPES:
        raise UsageError(f"--dtype {options.dtype!r} is not one of {', '.join(HALF_DTYPES)}")
    target = HALF_DTYPES[options.dtype]
    fmt = detect_format(source)
    _check_supported(fmt, options)
    refuse_quantised(source, fmt, "compress half")
    (check_onnx_output if fmt == Format.ONNX else check_output)(options.output, options.force, ref.sources)
    original = None
    # Built when its module types decide what to keep or the check runs it (--no-check --no-default-keep: never).
    if (options.check or options.default_keep) and can_build_model(source, fmt, options.load.arch):
        options.on_step("loading the original")
        original = load_model(ref, options.load)
    keep = KeepRules.build(options.keep_fp32, options.default_keep, original.module if original else None,
                           options.load.strip_prefix)
    probe, unmeasured = perplexity_probe(original, options.evaluation, options.tokenizer, options.check,
                                         options.on_step)
    plan = (plan_check_inputs(original, options.inputs, evaluated=probe is not None)
            if options.check and original is not None else None)

    options.on_step(f"converting to {target}")
    started = time.perf_counter()
    conversion = _convert(source, fmt, target, keep, options)
    seconds = time.perf_counter() - started
    totals = safety_totals(conversion.tensors)
    notes = list(conversion.notes) + sentinel_notes(conversion.tensors, target)
    drift = perplexity = None
    if conversion.written and original is not None and plan is not None:
        drift = _measure_drift(original, plan, options, target, probe)
        perplexity = drift.perplexity
    elif conversion.written and original is not None and probe is not None:  # a KV decoder: perplexity only
        candidate = load_model(str(options.output), output_load_options(original, options.load))
        perplexity = _perplexity(probe, candidate, options, None)
        notes.append(KV_DECODER_NOTE)
    elif conversion.written and options.check:
        notes.append("drift not measured: this file holds only weights; pass --arch (and --input) to build the model")
    preset = preset_label(options.preset, options.dtype, overridden=options.tolerances is not None)
    passed, verdict = _verdict(conversion, totals, drift.report if drift else None, options, target, preset)
    return HalfReport(
        warnings=loader_warnings(original, drift.candidate if drift else None) + ((unmeasured,) if unmeasured else ()),
        source=str(source), output=str(options.output), input_format=fmt.value,
        output_format=conversion.output_format, dtype=target, keep_patterns=keep.patterns,
        default_keep=keep.defaults_used, keep_rule=keep.describe(), written=conversion.written,
        streamed=conversion.streamed, tensors=tuple(conversion.tensors), totals=totals,
        size=size_summary(conversion.tensors, source, options.output if conversion.written else None),
        overflow_action=conversion.overflow_action, underflow_action=conversion.underflow_action,
        subnormal_below=float(torch.finfo(torch_dtype(target)).tiny), seconds=seconds, passed=passed,
        verdict=verdict, files_copied=tuple(conversion.files_copied),
        checkpoint_keys_kept=tuple(conversion.checkpoint_keys_kept), config_dtype=conversion.config_dtype,
        drift=drift.report if drift else None, drift_mode=drift.mode if drift else None,
        preset=preset if drift else None, per_layer=drift.per_layer if drift else None, notes=tuple(notes),
        perplexity=perplexity)


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


# ---------------------------------------------------------------- conversion, per format


def _convert(source: Path, fmt: Format, target: str, keep: KeepRules, options: HalfOptions) -> _Conversion:
    if fmt == Format.ONNX:
        return _convert_onnx(source, keep, options)
    sources = [source]
    if fmt in (Format.HF_FOLDER, Format.WEIGHTS_FOLDER):
        conversion = _Conversion(fmt.value)
        try:
            with atomic_dir(options.output, options.force, sources) as folder:
                _convert_folder(source, folder, target, keep, options.load.key, conversion)
                _discard_on_overflow(conversion, options)
            conversion.written = True
        except _Discard:
            pass
        return conversion
    if fmt == Format.SAFETENSORS:
        conversion = _Conversion(fmt.value, streamed=True)
        try:
            with atomic_file(options.output, options.force, sources) as temp:
                conversion.tensors = stream_convert(source, temp, target, keep)
                _discard_on_overflow(conversion, options)
            conversion.written = True
        except _Discard:
            pass
        return conversion
    conversion = _Conversion(Format.TORCH_ZIP.value)
    content = _convert_torch_file(source, target, keep, options.load.key, conversion, prefix="")
    if fmt == Format.TORCH_LEGACY:
        conversion.notes.append("the legacy pickle format was written as a torch zip (what torch.save writes today)")
    if not _overflow_refused(conversion, options):
        save_torch(content, options.output, options.force, sources)
        conversion.written = True
    return conversion


def _convert_onnx(source: Path, keep: KeepRules, options: HalfOptions) -> _Conversion:
    converted = convert_onnx(source, keep, options.keep_io_types)
    conversion = _Conversion(Format.ONNX.value, converted.tensors, notes=[converted.note],
                             overflow_action=OVERFLOW_ACTION, underflow_action=UNDERFLOW_ACTION)
    if not _overflow_refused(conversion, options):
        save_onnx(converted, options.output, options.force, [source])
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
    return replace(safety, name=f"{prefix}{safety.name}") if prefix else safety


def _convert_folder(source: Path, folder: Path, target: str, keep: KeepRules, key: str | None,
                    conversion: _Conversion) -> None:
    """Every file copied; weight files converted; config dtype and shard index sizes updated."""
    weights = weight_files(source)
    if not weights:
        raise InputError(f"{source} holds no weight files (*.safetensors, pytorch_model*.bin)")
    prefix_names = len(weights) > 1
    conversion.streamed = all(detect_format(p) == Format.SAFETENSORS for p in weights)
    for path in sorted(source.iterdir()):
        destination = folder / path.name
        prefix = f"{path.name}:" if prefix_names else ""
        if path.is_dir():
            shutil.copytree(path, destination)
            conversion.files_copied.append(f"{path.name}/")
        elif path in weights and detect_format(path) == Format.SAFETENSORS:
            conversion.tensors += [_prefixed(t, prefix) for t in stream_convert(path, destination, target, keep)]
        elif path in weights:
            save_torch(_convert_torch_file(path, target, keep, key, conversion, prefix), destination)
        elif path.name != HF_CONFIG:
            shutil.copyfile(path, destination)
            conversion.files_copied.append(path.name)
    if (source / HF_CONFIG).is_file():  # after the weights: its dtype depends on what was kept
        conversion.config_dtype = _config_dtype(conversion.tensors, target)
        _write_config(source / HF_CONFIG, folder / HF_CONFIG, conversion.config_dtype)
        if conversion.config_dtype != target:
            kept = sum(t.output_dtype == conversion.config_dtype for t in conversion.tensors if not t.converted)
            conversion.notes.append(MIXED_CONFIG_NOTE.format(kept=kept, target=target))
    for index in folder.glob(f"*{INDEX_SUFFIX}"):
        _update_index(index, folder)


def _config_dtype(tensors: list[TensorSafety], target: str) -> str:
    """The config dtype under which transformers reloads what the files hold: `target` when every floating
    tensor is `target`; float32 when some were kept float32 (transformers casts all tensors to this one dtype,
    and only float32 keeps the kept ones as they are)."""
    floating = {t.output_dtype for t in tensors if t.converted or t.kept_by is not None}
    return "float32" if "float32" in floating else target


def _write_config(source: Path, destination: Path, dtype: str) -> None:
    try:
        config = json.loads(source.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"{source} could not be read: {exc}") from exc
    config["dtype"] = dtype
    if "torch_dtype" in config:  # transformers < 5 wrote this name
        config["torch_dtype"] = dtype
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


# ---------------------------------------------------------------- drift


def _measure_drift(original: LoadedModel, plan: InputPlan, options: HalfOptions, target: str,
                   probe: PerplexityProbe | None) -> _Drift:
    """The written artefact against the original, through the parity engine (and hooks for --per-layer), and
    for a causal LM its perplexity, run the way the drift check runs it."""
    from mlops_cli.core.runtimes import resolve_device, runner_for

    options.on_step("measuring drift")
    device = resolve_device(options.device)
    input_sets = list(plan.sets)
    candidate = load_model(str(options.output), output_load_options(original, options.load))
    tolerances = options.tolerances or Tolerances.for_preset(options.preset or options.dtype)
    if original.module is None:  # ONNX
        report = check_parity(runner_for(original, device), runner_for(candidate, device), input_sets, tolerances,
                              time_runs=False)
        mode = ONNX_DRIFT_MODE.format(device=device, dtype=target)
        return _Drift(report, mode, None, candidate, _perplexity(probe, candidate, options, None))
    if device == "cpu":
        candidate.module.float()  # the rounded weights (kept tensors as they are), computed in float32
        mode = CPU_DRIFT_MODE.format(dtype=target)
    else:
        _run_in_dtype(candidate.module, target)
        mode = CUDA_DRIFT_MODE.format(dtype=target, device=device)
    reference_runner, candidate_runner = runner_for(original, device), runner_for(candidate, device)
    report = check_parity(reference_runner, candidate_runner, input_sets, tolerances,
                          time_runs=device != "cpu" and options.repeats > 0, repeats=options.repeats)
    per_layer = None
    if options.per_layer:
        options.on_step("comparing layer by layer")
        first = plan.example
        per_layer = compare_layers(original.module, candidate.module, lambda: reference_runner(first.tensors),
                                   lambda: candidate_runner(first.tensors), first.label, target)
    return _Drift(report, mode, per_layer, candidate, _perplexity(probe, candidate, options, mode))


def _perplexity(probe: PerplexityProbe | None, candidate: LoadedModel, options: HalfOptions, mode: str | None
                ) -> PerplexityComparison | None:
    if probe is None:
        return None
    options.on_step("measuring perplexity")
    return probe.compare(candidate, compute=mode)


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
             target: str, preset: str) -> tuple[bool, str]:
    if totals.overflow:
        where = ", ".join(totals.tensors_with_overflow[:3]) + (" ..." if len(totals.tensors_with_overflow) > 3 else "")
        if not options.allow_overflow:
            return False, (f"{totals.overflow} value(s) overflow {target} ({conversion.overflow_action}) in {where}; "
                           "output not written (--allow-overflow writes it anyway)")
        overflow_note = f"; {totals.overflow} overflowing value(s) allowed ({conversion.overflow_action})"
    else:
        overflow_note = ""
    if drift is not None and not drift.passed:
        return False, f"drift beyond tolerance (preset {preset}): {drift.verdict}{overflow_note}"
    drift_note = (f"; drift within tolerance (preset {preset}: atol {drift.atol:g}, rtol {drift.rtol:g})" if drift
                  else "; drift not measured")
    return True, f"{totals.converted_tensors} tensor(s) converted to {target}{drift_note}{overflow_note}"
