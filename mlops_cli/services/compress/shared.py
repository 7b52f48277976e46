"""What `compress half` and `compress int8` share: refusals made before any work, the drift check's inputs,
the perplexity probe of a causal LM, the weight files of a folder, and sizes on disk.

Refusals come first so that a usage error never leaves an output behind: a built-in model (compression writes
the kind of file it reads), an input already quantised to int8, and a drift check whose inputs cannot be told.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from mlops_cli.core.contract import LoadOptions, ModelRef
from mlops_cli.core.errors import InputError, UsageError
from mlops_cli.core.formats import Format, detect_format, torch_load_weights
from mlops_cli.core.inputs import InputPlan, InputRequest, plan_inputs
from mlops_cli.core.int8_state import PACKED, QUANTIZATION_INFO
from mlops_cli.core.sidecar import SIDECAR, read_sidecar
from mlops_cli.services.perplexity import EvaluationText, PerplexityProbe, is_kv_decoder, probe_for

# Ops of a graph that is already quantised (ONNX Runtime's dynamic and QDQ/QOperator formats).
QUANTISED_ONNX_OPS = frozenset({
    "DynamicQuantizeLinear", "QuantizeLinear", "DequantizeLinear", "MatMulInteger", "ConvInteger", "QLinearMatMul",
    "QLinearConv", "QGemm", "QAttention", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "DynamicQuantizeLSTM"})


# ---------------------------------------------------------------- refusals


def source_path(ref: ModelRef) -> Path:
    """The file or folder to compress: compression writes the same kind of file it reads, so it needs one."""
    if ref.path is None:
        raise InputError(f"compress reads a model file or folder and writes the same kind; {ref} exists only in "
                         "memory", hint=f"Save it first: mlops zoo save {ref.builtin} {ref.builtin}/ && "
                                        f"mlops compress ... {ref.builtin}/")
    return ref.path


def refuse_quantised(source: Path, fmt: Format, command: str) -> None:
    """An int8 model cannot be converted to fp16/bf16 nor quantised again: refuse it before any work."""
    evidence = quantised_evidence(source, fmt)
    if evidence is not None:
        raise InputError(f"{source} is already quantised to int8 ({evidence}); {command} needs float weights",
                         hint="It is already quantised: compress the float checkpoint it was made from instead.")


def quantised_evidence(source: Path, fmt: Format) -> str | None:
    """What shows that a model is already quantised (written by `compress int8` or alike), or None."""
    if fmt == Format.HF_FOLDER and (source / QUANTIZATION_INFO).is_file():
        return f"{QUANTIZATION_INFO} describes its int8 weights"
    if fmt in (Format.HF_FOLDER, Format.WEIGHTS_FOLDER):
        method = read_sidecar(source).get("quantization")
        if method:
            return f"{SIDECAR} says quantization: {method}"
        for path in weight_files(source):
            layer = _packed_layer(path) if detect_format(path) in (Format.TORCH_ZIP, Format.TORCH_LEGACY) else None
            if layer:
                return f"{path.name} holds packed int8 layers such as {layer}"
        return None
    if fmt in (Format.TORCH_ZIP, Format.TORCH_LEGACY):
        layer = _packed_layer(source)
        return f"its state_dict holds packed int8 layers such as {layer}" if layer else None
    if fmt == Format.ONNX:
        import onnx

        graph = onnx.load(str(source), load_external_data=False).graph
        ops = sorted({node.op_type for node in graph.node} & QUANTISED_ONNX_OPS)
        return f"its graph has {', '.join(ops)} nodes" if ops else None
    return None


def _packed_layer(path: Path) -> str | None:
    """The first dynamically quantised layer of a torch file's state_dict (alone or inside a checkpoint)."""
    content = torch_load_weights(path)  # memory-mapped: reads the pickle, not the tensor data
    if not isinstance(content, dict):
        return None
    dicts = [content, *(value for value in content.values() if isinstance(value, dict))]
    key = next((str(k) for d in dicts for k in d if PACKED in str(k)), None)
    return key.split(PACKED)[0] if key is not None else None


# ---------------------------------------------------------------- the drift check's inputs


KV_DECODER_NOTE = ("drift not measured: generated inputs cannot drive a decoder with a KV cache (its attention mask "
                   "must cover the past and the new tokens); its perplexity on the evaluation text is the check")


def plan_check_inputs(loaded: Any, request: InputRequest, evaluated: bool = False) -> InputPlan | None:
    """The drift check's inputs, resolved once, before anything is converted or written.

    `--input` first, then what the model knows (mlops.json, HF config, ONNX graph); a plain state_dict
    loaded with `--arch` naming a built-in architecture (mlops_cli.core.zoo:ConvNet) gets that zoo entry's inputs.
    A model whose inputs cannot be told fails here (exit 2), so the usage error leaves no output behind. A decoder
    with a KV cache has no drift check: None when its perplexity is `evaluated` instead (a probe is ready), else
    refused.
    """
    if request.specs or request.texts or request.file:
        return plan_inputs(loaded, request)  # a malformed --input fails with its own message
    if is_kv_decoder(loaded):
        if evaluated:
            return None
        raise UsageError(f"{loaded.reference} is a decoder with a KV cache: the drift check's generated inputs "
                         "cannot drive it (its attention mask must cover the past and the new tokens)",
                         hint="Let its perplexity be the check: name the tokenizer's folder with --tokenizer (and "
                              "drop --no-eval); or pass --no-check and compare generation afterwards with "
                              "`mlops verify-parity MODEL OUT.onnx --generate`.")
    if not loaded.input_specs and zoo_inputs(loaded.arch):
        request = replace(request, specs=zoo_inputs(loaded.arch))
    try:
        return plan_inputs(loaded, request)
    except UsageError as exc:
        hint = f"{exc.hint or ''} Or pass --no-check to convert without measuring drift.".lstrip()
        raise UsageError(exc.message, hint=hint) from exc


def preset_label(chosen: str | None, auto: str, overridden: bool) -> str:
    """How the drift check's tolerances were chosen, for the report: `fp16 (auto)`, `fp32 (--preset)`, plus
    `, --atol/--rtol over it` when the user's values replace the preset's."""
    label = f"{chosen} (--preset)" if chosen else f"{auto} (auto)"
    return f"{label}, --atol/--rtol over it" if overridden else label


def zoo_inputs(arch: str | None) -> tuple[str, ...]:
    """The input specs of the built-in model whose architecture `arch` names (mlops_cli.core.zoo:ConvNet), or ()."""
    from mlops_cli.core import zoo

    name = next((name for name, path in zoo.ARCH_PATHS.items() if path == arch), None)
    return zoo.ENTRIES[name].inputs if name else ()


# ---------------------------------------------------------------- models and their files


def weight_files(folder: Path) -> list[Path]:
    """The weight files of a model folder: every *.safetensors, `pytorch_model*.bin` / `model*.bin`, and the
    file mlops.json names. Other pickles (training_args.bin, optimizer.pt, rng_state.pth) are not weights."""
    named = str(read_sidecar(folder).get("weights", ""))
    return [path for path in sorted(folder.iterdir()) if path.is_file() and (
        path.suffix == ".safetensors" or path.name == named
        or (path.suffix == ".bin" and path.name.startswith(("pytorch_model", "model"))))]


def can_build_model(path: Path, fmt: Format, arch: str | None) -> bool:
    """Can mlops build a runnable model from this input? A bare state_dict (no --arch, no mlops.json) cannot."""
    if fmt in (Format.SAFETENSORS, Format.TORCH_ZIP, Format.TORCH_LEGACY):
        return bool(arch or read_sidecar(path.parent).get("arch"))
    return fmt in (Format.HF_FOLDER, Format.WEIGHTS_FOLDER, Format.ONNX)


def output_load_options(reference_loaded: Any, options: LoadOptions) -> LoadOptions:
    """Options that load the compressed artefact as the original was loaded (same architecture)."""
    if reference_loaded.arch:
        return replace(options, arch=reference_loaded.arch, arch_kwargs=dict(reference_loaded.arch_kwargs))
    return options


def perplexity_probe(original: Any, evaluation: EvaluationText | None, tokenizer: Path | None, check: bool,
                     on_step: Any) -> tuple[PerplexityProbe | None, str | None]:
    """A causal LM's original scored on the evaluation text, before anything is written (the text is read even
    when there is nothing to score, so a bad --eval-text fails first); None without the check or an LM."""
    if evaluation is None:
        return None, None
    evaluation.read()
    if not check or original is None:
        return None, None
    return probe_for(evaluation, original, folder=tokenizer, on_step=on_step)


def loader_warnings(*loaded: Any) -> tuple[str, ...]:
    """The loaders' warnings of every model a run loaded, each once (they go into report.warnings)."""
    return tuple(dict.fromkeys(message for model in loaded if model is not None for message in model.warnings))


# ---------------------------------------------------------------- sizes on disk


def disk_size(path: Path) -> int:
    """Bytes on disk of a file or folder; an ONNX file's external-data files count too."""
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    if not path.exists():
        return 0
    return path.stat().st_size + sum(p.stat().st_size for p in onnx_external_files(path))


def onnx_external_files(path: Path) -> list[Path]:
    """The external-data files an ONNX model refers to (none for other files)."""
    if path.is_dir() or detect_format(path) != Format.ONNX:
        return []
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    locations = {entry.value for init in model.graph.initializer if init.data_location == onnx.TensorProto.EXTERNAL
                 for entry in init.external_data if entry.key == "location"}
    return [path.parent / location for location in sorted(locations) if (path.parent / location).is_file()]
