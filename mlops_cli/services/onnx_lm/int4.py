"""Weight-only int4 for an exported decoder: ONNX Runtime's MatMulNBits quantizer.

Each MatMul with a constant weight becomes a `MatMulNBits` node holding 4-bit weights in blocks of
`block_size` along the input dim, one scale (and, asymmetric, one zero point) per block; activations stay in
float. `accuracy_level` picks the CPU kernel's compute type (None/0: as the inputs, 4: int8, faster). The
report gives the file sizes before and after and, when a tokenizer is found, the perplexity of both graphs on
a text and the share of positions where their greedy predictions agree.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mlops_cli.core.contract import ModelRef, OutputOptions, Report
from mlops_cli.core.errors import InputError, UsageError
from mlops_cli.core.onnx_export import quiet_exporters
from mlops_cli.services.onnx_lm.export_with_past import EXTERNAL_DATA_THRESHOLD
from mlops_cli.services.onnx_lm.generate_onnx import OnnxDecoder, load_text_side
from mlops_cli.services.onnx_lm.quality import EvaluationText, onnx_logits_fn, score, text_tokens


@dataclass(frozen=True, kw_only=True)
class Int4Options(OutputOptions, EvaluationText):
    block_size: int = 32
    symmetric: bool = True
    accuracy_level: int | None = None
    tokenizer: Path | None = None  # for the perplexity comparison; default: the ONNX file's folder


@dataclass(frozen=True, kw_only=True)
class Int4Report(Report):
    model: str
    output: str
    block_size: int
    symmetric: bool
    accuracy_level: int | None
    quantized_matmuls: int
    size_before: int  # bytes, .onnx plus .data
    size_after: int
    perplexity_before: float | None
    perplexity_after: float | None
    relative_change: float | None  # after / before - 1
    greedy_agreement: float | None


def run(ref: ModelRef, options: Int4Options) -> Int4Report:
    """Quantise the MatMul weights of an ONNX decoder to 4 bits, then measure what it cost."""
    import onnx

    from mlops_cli.core.io import scratch_dir_beside
    from mlops_cli.core.onnx_export import check_onnx_output, files_on_disk, load_onnx, move_into_place

    if options.block_size < 16 or options.block_size & (options.block_size - 1):
        raise UsageError(f"--block-size {options.block_size}: MatMulNBits needs a power of two >= 16")
    source = ref.path
    if source is None or source.suffix != ".onnx" or not source.is_file():
        raise InputError(f"{ref} is not an ONNX file", hint="Export the model first: `export onnx --task causal-lm`.")
    target = check_onnx_output(options.output, options.force, [source])
    tokens, unmeasured = _evaluation_tokens(source, options)  # a bad --eval-text fails before writing
    OnnxDecoder(source)  # refuses a graph without the KV cache, like generation would
    options.on_step("quantizing")
    scratch = scratch_dir_beside(target)
    try:
        written = scratch / target.name
        quantized = _quantize(load_onnx(source), options)  # .data locations checked to stay beside it
        count = sum(1 for node in quantized.graph.node if node.op_type == "MatMulNBits")
        if count == 0:
            raise InputError(f"{ref} has no MatMul with a constant weight: nothing to quantise to int4")
        external = quantized.ByteSize() > EXTERNAL_DATA_THRESHOLD
        onnx.save_model(quantized, str(written), save_as_external_data=external, all_tensors_to_one_file=True,
                        location=f"{written.name}.data", size_threshold=1024)
        move_into_place(written, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    before = after = agreement = None
    if tokens is not None:
        options.on_step("measuring perplexity")
        before, after, agreement = _perplexities(source, target, options, tokens)
    warnings = [unmeasured] if unmeasured else []
    return Int4Report(
        model=str(ref), output=str(target), block_size=options.block_size, symmetric=options.symmetric,
        accuracy_level=options.accuracy_level, quantized_matmuls=count, size_before=sum(files_on_disk(source).values()),
        size_after=sum(files_on_disk(target).values()), perplexity_before=before, perplexity_after=after,
        relative_change=None if before is None or after is None else after / before - 1,
        greedy_agreement=agreement, warnings=tuple(warnings))


def _quantize(model: Any, options: Int4Options) -> Any:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(model, block_size=options.block_size, is_symmetric=options.symmetric,
                                     accuracy_level=options.accuracy_level)
    with quiet_exporters():
        quantizer.process()
    return quantizer.model.model


def _evaluation_tokens(source: Path, options: Int4Options) -> tuple[np.ndarray | None, str | None]:
    """The evaluation text's tokens, read before anything is written (None and why, without a tokenizer)."""
    try:
        tokenizer = load_text_side(options.tokenizer or source.parent).tokenizer
    except InputError as exc:
        return None, f"perplexity not measured: {exc.message}; pass the HF folder as the tokenizer"
    return text_tokens(options.text_file, tokenizer, options.max_tokens), None


def _perplexities(source: Path, target: Path, options: Int4Options, tokens: np.ndarray
                  ) -> tuple[float, float, float]:
    """Perplexity of the float and the int4 graph on the text, and how often their greedy predictions agree."""
    stride = min(options.stride, options.window)
    before, predictions = score(onnx_logits_fn(OnnxDecoder(source)), tokens, options.window, stride)
    after, quantized_predictions = score(onnx_logits_fn(OnnxDecoder(target)), tokens, options.window, stride)
    return math.exp(before), math.exp(after), float((predictions == quantized_predictions).mean())
