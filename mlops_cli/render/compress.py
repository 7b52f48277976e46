"""Tables for `mlops compress half` and `mlops compress int8`."""

from __future__ import annotations

import re
from collections.abc import Iterator

from rich.console import RenderableType
from rich.text import Text

from mlops_cli.render import fmt_bytes, fmt_float, fmt_ms, key_values, note, table, verdict
from mlops_cli.render.parity import parity_tables
from mlops_cli.render.perplexity import perplexity_summary, perplexity_tables
from mlops_cli.services.compress.cast import TensorSafety
from mlops_cli.services.compress.drift import PerLayerReport
from mlops_cli.services.compress.half import HalfReport
from mlops_cli.services.compress.int8 import Int8Report
from mlops_cli.services.onnx_lm import Int4Report

SAFETY_ROWS = 12
LAYER_ROWS = 30
SAFETY_COLUMNS = ("tensor", "from", "elements", "max |x|", "overflow", "underflow", "subnormal", "non-finite before")
LAYER_COLUMNS = ("#", "layer", "type", "rel. error", "max |diff|", "max |activation|", "")


def _ratio(after: int, before: int) -> str:
    return f"{after / before:.3f}x" if before and after else "-"


def kept_output(output: str) -> str:
    """A failed check leaves its output (to inspect it): say so, since the next run must replace it."""
    return f"The output was kept at {output} (to inspect it); a re-run needs --force to replace it."


def _output_row(output_format: str, output: str, written: bool, passed: bool) -> object:
    if not written:
        return Text(f"{output_format}: NOT written", "red")
    if not passed:
        return Text(f"{output_format}: written, and kept at {output} although the check failed (a re-run "
                    "needs --force to replace it)", "yellow")
    return output_format


def half_failure_hint(report: HalfReport) -> str:
    """What to do when `compress half` fails (exit 6): overflow refused, or drift beyond tolerance."""
    advice = _half_advice(report)
    return f"{advice} {kept_output(report.output)}" if report.written else advice


def _half_advice(report: HalfReport) -> str:
    totals = report.totals
    onnx = report.output_format == "onnx"
    bf16 = "convert to --dtype bf16 (float32's range)" if report.dtype == "float16" and not onnx else ""
    tolerances = (f"loosen --atol/--rtol (now atol {report.drift.atol:g}, rtol {report.drift.rtol:g})"
                  if report.drift else "loosen --atol/--rtol")
    if totals.overflow and not report.written:
        choices = [f"Keep the overflowing tensors in float32 ({_keep_example(totals.tensors_with_overflow)})", bf16]
        return (f"{', '.join(filter(None, choices))}, or pass --allow-overflow if {'±65504' if onnx else 'inf'} "
                "there is intended.")
    if totals.overflow:
        return (f"The {totals.overflow} overflowing value(s) you allowed are the likely cause: keep their tensors in "
                f"float32 ({_keep_example(totals.tensors_with_overflow)}){' or ' + bf16 if bf16 else ''}; "
                f"or {tolerances}.")
    layers = "" if onnx else " (--per-layer names the first one)"
    return (f"If this drift is acceptable, {tolerances}; otherwise keep the layers that drift in float32 with "
            f"--keep-fp32 REGEX{layers}{' or ' + bf16 if bf16 else ''}.")


def _keep_example(names: tuple[str, ...]) -> str:
    """A --keep-fp32 option naming exactly these tensors (a shard prefix `file:` is not part of a name)."""
    escaped = [re.escape(name.rpartition(":")[2]) for name in names[:3]]
    pattern = escaped[0] if len(escaped) == 1 else f"({'|'.join(escaped)})"
    return f"--keep-fp32 '^{pattern}$'" if escaped else "--keep-fp32 REGEX"


def int8_failure_hint(report: Int8Report) -> str:
    """What to do when `compress int8` fails (exit 6): nothing quantised, or drift beyond tolerance."""
    advice = _int8_advice(report)
    return f"{advice} {kept_output(report.output)}" if report.written else advice


def _int8_advice(report: Int8Report) -> str:
    if not any(kind.quantized for kind in report.kinds):
        return ("Check --exclude" + (" and --op-types (e.g. MatMul,Gemm)" if report.input_format == "onnx" else "")
                + "; --quantize-embeddings also quantises embedding tables.")
    tolerances = (f"loosen --atol/--rtol (now atol {report.drift.atol:g}, rtol {report.drift.rtol:g})"
                  if report.drift else "loosen --atol/--rtol")
    embeddings = ", drop --quantize-embeddings" if report.embeddings_quantized else ""
    return (f"If this drift is acceptable, {tolerances}; otherwise leave the layers that drift in float with "
            f"--exclude REGEX{embeddings}, or use compress half, which keeps more precision.")


def half_tables(report: HalfReport) -> Iterator[RenderableType]:
    totals = report.totals
    yield key_values(f"Compress {report.source} -> {report.output}", [
        ("input", report.input_format),
        ("output", _output_row(report.output_format, report.output, report.written, report.passed)),
        ("dtype", report.dtype),
        ("converted", f"{totals.converted_tensors} floating tensor(s)"),
        ("kept as they were", _kept_text(report)),
        ("kept by", report.keep_rule + ("; --no-default-keep converts the norms" if report.default_keep else "")),
        ("left alone", f"{totals.other_tensors} integer/bool tensor(s) or already {report.dtype}"),
        *([("config.json dtype", report.config_dtype)] if report.config_dtype else []),
        ("streamed", "yes: tensor by tensor through a memory map" if report.streamed else "no: loaded, then written"),
        ("conversion time", f"{report.seconds:.2f} s"),
        *([("checkpoint entries kept", ", ".join(report.checkpoint_keys_kept))] if report.checkpoint_keys_kept else []),
        *([("files copied", ", ".join(report.files_copied))] if report.files_copied else []),
        ("drift measured as", report.drift_mode or ("not measured" if report.written else "not measured: not written")),
        *([("tolerances", f"preset {report.preset}")] if report.preset else []),
    ])
    size = report.size
    yield table("Size", ("part", "before", "after", "ratio"), [
        ("converted floating tensors", fmt_bytes(size.converted_before), fmt_bytes(size.converted_after),
         _ratio(size.converted_after, size.converted_before)),
        ("all tensors", fmt_bytes(size.tensors_before), fmt_bytes(size.tensors_after),
         _ratio(size.tensors_after, size.tensors_before)),
        ("on disk", fmt_bytes(size.files_before), fmt_bytes(size.files_after) if report.written else "-",
         _ratio(size.files_after, size.files_before)),
    ], numeric=("before", "after", "ratio"))
    yield _safety_table(report)
    if report.drift is not None:
        yield from parity_tables(report.drift, title=f"Drift: {report.output} vs {report.source}")
    if report.per_layer is not None:
        yield from per_layer_tables(report.per_layer)
    yield from perplexity_tables(report.perplexity, after=report.dtype)
    for line in report.notes:
        yield note(line)
    yield verdict(report.passed, report.verdict)


def _kept_text(report: HalfReport) -> str:
    """`12 tensor(s): 10 by module type, 2 by name`."""
    totals = report.totals
    ways = [f"{count} by {way}" for count, way in ((totals.kept_by_module_type, "module type"),
                                                  (totals.kept_by_name, "name")) if count]
    others = totals.kept_tensors - totals.kept_by_module_type - totals.kept_by_name
    ways += [f"{others} by op type"] if others else []
    return f"{totals.kept_tensors} tensor(s)" + (f": {', '.join(ways)}" if ways else "")


def _safety_table(report: HalfReport) -> RenderableType:
    findings = sorted((t for t in report.tensors if t.converted and t.has_issue),
                      key=lambda t: (-t.overflow, -t.nonfinite_source, -t.underflow, -t.subnormal, t.name))
    totals = report.totals
    rows: list[tuple[object, ...]] = [_safety_row(t) for t in findings[:SAFETY_ROWS]]
    rows.append((Text(f"total ({totals.converted_tensors} converted)", style="bold"), "",
                 sum(t.elements for t in report.tensors if t.converted), "-",
                 _count(totals.overflow, bad=True), _count(totals.underflow), _count(totals.subnormal),
                 _count(totals.nonfinite_source, bad=True)))
    hidden = len(findings) - SAFETY_ROWS
    caption = (f"overflow: {report.overflow_action}; underflow: {report.underflow_action}; subnormal: non-zero "
               f"below {report.subnormal_below:.3g}, few significant bits left"
               + (f"; {hidden} more tensor(s) with findings in --json" if hidden > 0 else "")
               + ("" if findings else "; no converted tensor has any finding"))
    return table(f"Cast safety ({report.dtype}), per tensor", SAFETY_COLUMNS, rows, numeric=SAFETY_COLUMNS[2:],
                 caption=caption)


def _safety_row(tensor: TensorSafety) -> tuple[object, ...]:
    return (tensor.name, tensor.source_dtype, tensor.elements,
            fmt_float(tensor.max_abs), _count(tensor.overflow, bad=True), _count(tensor.underflow),
            _count(tensor.subnormal), _count(tensor.nonfinite_source, bad=True))


def _count(value: int, bad: bool = False) -> Text:
    if not value:
        return Text("0", style="dim")
    return Text(str(value), style="bold red" if bad else "yellow")


def per_layer_tables(report: PerLayerReport) -> Iterator[RenderableType]:
    layers = report.layers
    shown = set(range(len(layers)))
    if len(layers) > LAYER_ROWS:
        jump = next((layer.index for layer in layers if layer.name == report.first_jump), None)
        worst = sorted(layers, key=lambda layer: -(layer.relative_error or float("inf")))[:10]
        shown = {layer.index for layer in worst}
        if jump is not None:
            shown |= set(range(max(0, jump - 12), min(len(layers), jump + 5)))
    rows = []
    for layer in layers:
        if layer.index not in shown:
            continue
        flag = Text("FIRST JUMP", style="bold red") if layer.name == report.first_jump else (
            Text("not finite", style="red") if layer.nonfinite else
            Text("beyond range", style="red") if layer.beyond_range else "")
        rows.append((layer.index, layer.name, layer.type, fmt_float(layer.relative_error), fmt_float(layer.max_abs),
                     fmt_float(layer.reference_max_abs), flag))
    caption = (f"input set {report.input_set}; {len(rows)} of {len(layers)} layers shown (all in --json); "
               f"jump rule: {report.jump_rule}")
    yield table("Per-layer drift (module outputs in execution order)", LAYER_COLUMNS, rows,
                numeric=("#", "rel. error", "max |diff|", "max |activation|"), caption=caption)
    if report.first_jump:
        yield Text.assemble(Text("first jump: ", style="bold"), report.first_jump, f" — {report.jump_reason}")
    else:
        yield note(f"no layer's error jumps; the largest relative error is at {report.worst}")


def int8_tables(report: Int8Report) -> Iterator[RenderableType]:
    yield key_values(f"Compress int8 {report.source} -> {report.output}", [
        ("input", report.input_format),
        ("output", _output_row(report.output_format, report.output, report.written, report.passed)),
        ("engine", report.engine),
        ("weights", report.weights),
        ("embeddings quantised", "yes" if report.embeddings_quantized else "no (--quantize-embeddings)"),
        *([("reload", report.reload)] if report.reload else []),
        *([("tolerances", f"preset {report.preset}")] if report.preset else []),
    ])
    yield table("Quantised layers by type", ("type", "with weights", "quantised", "note"),
                ((k.kind, k.with_weights, k.quantized, k.note) for k in report.kinds),
                numeric=("with weights", "quantised"))
    if report.skipped:
        shown = report.skipped[:10]
        yield table("Left in float", ("layer", "why"), shown,
                    caption=f"{len(report.skipped) - len(shown)} more in --json" if len(report.skipped) > 10 else None)
    yield table("Size on disk", ("before", "after", "ratio"),
                [(fmt_bytes(report.bytes_before), fmt_bytes(report.bytes_after),
                  _ratio(report.bytes_after, report.bytes_before))], numeric=("before", "after", "ratio"))
    if report.latency:
        repeats = report.latency[0].before.repeats
        yield table("Latency on this CPU (warm, before/after interleaved)",
                    ("input set", "before p50", "before p90", "after p50", "after p90", "speed-up"),
                    ((row.input_set, fmt_ms(row.before.median_ms), fmt_ms(row.before.p90_ms),
                      fmt_ms(row.after.median_ms), fmt_ms(row.after.p90_ms),
                      f"{row.speedup:.2f}x" if row.speedup else "-") for row in report.latency),
                    numeric=("before p50", "before p90", "after p50", "after p90", "speed-up"),
                    caption=f"{repeats} repeats after 2 warm-up calls each; {report.timing_setup}")
    if report.drift is not None:
        yield from parity_tables(report.drift, title=f"Drift: {report.output} vs {report.source}")
    yield from perplexity_tables(report.perplexity, after="int8")
    for line in report.notes:
        yield note(line)
    yield verdict(report.passed, report.verdict)


def int4_tables(report: Int4Report) -> Iterator[RenderableType]:
    """`compress int4` (and `int8 --weight-only`): what was written, the size, and the quality it cost."""
    ratio = f"{report.size_after / report.size_before:.2f}x" if report.size_before else "-"
    yield key_values(f"int{report.bits} weight-only (MatMulNBits): {report.model}", [
        ("output", report.output),
        ("MatMuls quantised", report.quantized_matmuls),
        ("block size", report.block_size),
        ("scheme", "symmetric" if report.symmetric else "asymmetric (zero point per block)"),
        ("accuracy level", "ONNX Runtime's default (float compute)" if report.accuracy_level is None
         else f"{report.accuracy_level}" + (" (int8 compute on CPU)" if report.accuracy_level == 4 else "")),
        ("size", f"{fmt_bytes(report.size_before)} -> {fmt_bytes(report.size_after)} ({ratio})"),
    ])
    yield from perplexity_tables(report.perplexity, after=f"int{report.bits}")
    if report.perplexity is None and not report.warnings:
        yield note("perplexity not measured (--no-eval)")
    size = f"{ratio} the size" if report.size_before else "written"
    yield verdict(True, f"{report.quantized_matmuls} MatMul(s) to int{report.bits}, {size}"
                        f"{perplexity_summary(report.perplexity)}")
