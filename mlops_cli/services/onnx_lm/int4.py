"""Weight-only int4 (or int8) for an exported decoder: ONNX Runtime's MatMulNBits quantizer.

Each MatMul with a constant weight becomes a `MatMulNBits` node holding 4-bit (or, `bits=8`, 8-bit) weights in
blocks of `block_size` along the input dim, one scale (and, asymmetric, one zero point) per block; activations
stay in float. `accuracy_level` picks the CPU kernel's compute type: 4 (int8 activations inside the kernel) is
the default, measured 2.99x (3.06x on an earlier run) PyTorch fp32 decode against 2.19x (2.04x) for ONNX Runtime's
own default (float compute) on a SmolLM-135M-shaped model, for a perplexity change of +1.18% against +1.13%
(benchmarks/bench_onnx_lm.py --accuracy-levels 0,4); 0 asks for ONNX Runtime's default. Other execution providers
ignore it. The report gives the file sizes before and after and, when a tokenizer is found, the
perplexity of both graphs on a text and the share of positions where their greedy predictions agree
(services/perplexity.py, the figure every compressing command reports).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlops_cli.core.contract import ModelRef, OutputOptions, Report
from mlops_cli.core.errors import InputError, UsageError
from mlops_cli.core.onnx_export import quiet_exporters
from mlops_cli.services.onnx_lm.generate_onnx import OnnxDecoder, load_text_side
from mlops_cli.services.perplexity import (
    EvaluationText,
    PerplexityComparison,
    PerplexityProbe,
    explicit_tokenizer,
    onnx_logits_fn,
)

BITS = (4, 8)
CPU_ACCURACY_LEVEL = 4  # int8 compute in the CPU kernel: the fastest, see the module docstring


@dataclass(frozen=True, kw_only=True)
class Int4Options(OutputOptions):
    bits: int = 4  # 8: weight-only int8 (`compress int8 --weight-only`)
    block_size: int = 32
    symmetric: bool = True
    accuracy_level: int | None = CPU_ACCURACY_LEVEL  # 0 or None: ONNX Runtime's default (fp32 compute)
    tokenizer: Path | None = None  # for the perplexity comparison; default: the ONNX file's folder
    evaluation: EvaluationText | None = field(default_factory=EvaluationText)  # None: perplexity not measured


@dataclass(frozen=True, kw_only=True)
class Int4Report(Report):
    model: str
    output: str
    bits: int
    block_size: int
    symmetric: bool
    accuracy_level: int | None  # None: ONNX Runtime's default
    quantized_matmuls: int
    size_before: int  # bytes, .onnx plus .data
    size_after: int
    perplexity: PerplexityComparison | None  # None: no tokenizer found, or --no-eval


def run(ref: ModelRef, options: Int4Options) -> Int4Report:
    """Quantise the MatMul weights of an ONNX decoder to 4 (or 8) bits, then measure what it cost."""
    from mlops_cli.core.onnx_export import (
        atomic_onnx,
        check_onnx_output,
        files_on_disk,
        has_external_data,
        load_onnx,
        needs_external_data,
        save_model_proto,
    )

    if options.bits not in BITS:
        raise UsageError(f"{options.bits} bits: MatMulNBits quantises weights to {' or '.join(map(str, BITS))} bits")
    if options.block_size < 16 or options.block_size & (options.block_size - 1):
        raise UsageError(f"--block-size {options.block_size}: MatMulNBits needs a power of two >= 16")
    source = ref.path
    if source is None or source.suffix != ".onnx" or not source.is_file():
        raise InputError(f"{ref} is not an ONNX file",
                         hint="Export the model first: `mlops export onnx MODEL -o lm.onnx`.")
    target = check_onnx_output(options.output, options.force, [source])
    probe, unmeasured = _probe(source, options)  # a bad --eval-text fails before writing
    options.on_step("quantizing")
    quantized = _quantize(load_onnx(source), options)  # .data locations checked to stay beside it
    count = sum(1 for node in quantized.graph.node if node.op_type == "MatMulNBits")
    if count == 0:
        raise InputError(f"{ref} has no MatMul with a constant weight: nothing to quantise to int{options.bits}")
    with atomic_onnx(target, options.force, [source]) as written:
        save_model_proto(quantized, written, needs_external_data(quantized, has_external_data(source)))
    comparison = None
    if probe is not None:
        options.on_step("measuring perplexity")
        comparison = probe.compare(onnx_logits_fn(OnnxDecoder(target)))
    return Int4Report(
        model=str(ref), output=str(target), bits=options.bits, block_size=options.block_size,
        symmetric=options.symmetric, accuracy_level=options.accuracy_level or None, quantized_matmuls=count,
        size_before=sum(files_on_disk(source).values()), size_after=sum(files_on_disk(target).values()),
        perplexity=comparison, warnings=(unmeasured,) if unmeasured else ())


def _quantize(model: Any, options: Int4Options) -> Any:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(model, bits=options.bits, block_size=options.block_size,
                                     is_symmetric=options.symmetric, accuracy_level=options.accuracy_level or None)
    with quiet_exporters():
        quantizer.process()
    return quantizer.model.model


def _probe(source: Path, options: Int4Options) -> tuple[PerplexityProbe | None, str | None]:
    """The float graph scored on the evaluation text before anything is written (None and why, without a
    tokenizer or when our generation loop cannot run the graph; None when measuring is off). Quantising itself
    needs no KV cache: a plain graph, or a genai folder's model.onnx, is quantised all the same."""
    if options.evaluation is None:
        return None, None
    options.evaluation.read()  # an unreadable text is refused even when no tokenizer is found
    try:
        tokenizer = (explicit_tokenizer(options.tokenizer) if options.tokenizer
                     else load_text_side(source.parent).tokenizer)
    except InputError as exc:
        if options.tokenizer:
            raise  # the user's --tokenizer: exit 3 naming it, not a warning
        return None, f"perplexity not measured: {exc.message}; pass the HF folder as the tokenizer"
    try:
        decoder = OnnxDecoder(source)
    except InputError as exc:
        return None, f"perplexity not measured: {exc.message}. {exc.hint or ''}".strip()
    options.on_step("measuring perplexity")
    return PerplexityProbe.of(options.evaluation, onnx_logits_fn(decoder), tokenizer), None
