"""Tables for `mlops estimate`."""

from __future__ import annotations

from collections.abc import Iterator

from rich.console import RenderableType

from mlops_cli.render import fmt_bytes, fmt_count, key_values, note, table
from mlops_cli.services.estimate import GPU_RESERVE_BYTES, EstimateReport


def _shape(report: EstimateReport) -> str:
    """`context N, batch B`, or `batch B` for a model whose inputs have no sequence (images)."""
    sequence = report.compute is None or report.compute.context is not None
    return f"context {report.context}, batch {report.batch}" if sequence else f"batch {report.batch}"


def estimate_tables(report: EstimateReport) -> Iterator[RenderableType]:
    yield key_values(f"Model: {report.reference} (built on the meta device, no weight read)", [
        ("class", report.model_class), ("read", report.source),
        ("kind", "decoder LM (per token, KV cache)" if report.decoder_lm else "per example"),
        ("estimated at", _shape(report))])
    yield _parameters(report)
    if report.compute is not None:
        yield _compute(report)
    yield _inference(report)
    yield _training(report)
    yield _gpus(report)
    yield note(f"activations: {report.activations.formula}")
    for line in report.notes:
        yield note(line)


def _parameters(report: EstimateReport) -> RenderableType:
    params = report.parameters
    rows: list[tuple[str, object]] = [
        ("unique (tied counted once)", fmt_count(params.unique)),
        ("embeddings (nn.Embedding tables)", fmt_count(params.embedding)),
        ("non-embedding", fmt_count(params.non_embedding)),
        ("total (tied counted per name)", fmt_count(params.total)),
    ]
    if params.buffers:
        rows.append(("buffers (elements, not in the weight memory)", fmt_count(params.buffers)))
    rows += [("tied", " = ".join(group)) for group in params.tied]
    return key_values("Parameters", rows)


def _compute(report: EstimateReport) -> RenderableType:
    compute = report.compute
    assert compute is not None
    at = f"context {compute.context}" if compute.context is not None else "its input shape"
    weights = "Linear layers" if compute.method == "analytic" else "matrix products, convolutions"
    return key_values(f"Compute per {compute.unit} ({at}; {compute.method})", [
        (f"MACs per {compute.unit}", fmt_count(compute.macs)),
        (f"  weights ({weights})", fmt_count(compute.linear_macs)),
        ("  attention (q·kᵀ, attention·v)", fmt_count(compute.attention_macs)),
        (f"FLOPs per {compute.unit} (2 per MAC)", fmt_count(compute.flops)),
    ])


def _inference(report: EstimateReport) -> RenderableType:
    kv = report.kv_cache
    kv_bytes = kv.total_bytes if kv else 0
    activations = report.activations.inference_bytes
    rows = [(dtype, fmt_bytes(size), fmt_bytes(kv_bytes) if kv else "-", fmt_bytes(activations),
             fmt_bytes(report.inference_bytes[dtype])) for dtype, size in report.weight_bytes.items()]
    caption = None
    if kv is not None:
        caption = (f"KV cache: 2 x {kv.layers} layers x {kv.kv_heads} KV heads x {kv.head_dim} dims x "
                   f"{kv.bytes_per_element} bytes = {fmt_bytes(kv.bytes_per_token)} per token, 16-bit at every weight "
                   "precision. int8/int4: weights only, quantisation scales not counted.")
    return table(f"Inference memory ({_shape(report)})",
                 ("weights", "weight memory", "KV cache", "activations", "total"), rows,
                 numeric=("weight memory", "KV cache", "activations", "total"), caption=caption)


def _training(report: EstimateReport) -> RenderableType:
    training = report.training
    rows: list[tuple[str, object]] = [(what, fmt_bytes(size)) for what, size in training.states.items()]
    rows += [
        (f"states ({training.bytes_per_parameter} bytes per parameter)", fmt_bytes(training.states_bytes)),
        ("activations", fmt_bytes(report.activations.training_bytes)),
        ("total", fmt_bytes(training.total_bytes)),
        ("total with activation checkpointing", fmt_bytes(training.total_checkpointed_bytes)),
    ]
    return key_values(f"Training with AdamW, {training.precision}", rows)


def _yes_no(value: bool | None) -> str:
    return "-" if value is None else ("yes" if value else "no")


def _gpus(report: EstimateReport) -> RenderableType:
    dtypes = [dtype for dtype in report.inference_bytes if dtype != "fp16"]  # fp16 weighs what bf16 does
    labels = (f"inference {'fp16/bf16' if dtype == 'bf16' else dtype}" for dtype in dtypes)
    return table("Fits on one GPU (estimate under the card's memory less "
                 f"{fmt_bytes(GPU_RESERVE_BYTES)} for the CUDA context)",
                 ("GPU", *labels, "training", "training, checkpointed"),
                 ((fit.gpu, *(_yes_no(fit.inference[d]) for d in dtypes), _yes_no(fit.training),
                   _yes_no(fit.training_checkpointed)) for fit in report.gpus))
