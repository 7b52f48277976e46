"""Tables for `mlops export onnx --task seq2seq-lm`: the folder written, its three graphs' inputs and outputs, and
the sizes each graph was checked at against the model."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from rich.console import RenderableType

from mlops_cli.render import fmt_bytes, key_values, table, verdict

if TYPE_CHECKING:
    from mlops_cli.services.onnx_lm.seq2seq_export import Seq2SeqExportReport


def seq2seq_export_tables(report: Seq2SeqExportReport) -> Iterator[RenderableType]:
    yield key_values(f"ONNX export of an encoder-decoder with KV cache: {report.model}", [
        ("output", report.output),
        *((f"file {name}", fmt_bytes(size)) for name, size in report.files.items()),
        ("family", report.family),
        ("decoder cache", f"{report.layers} layer(s) x {report.heads} head(s) x head dim {report.head_dim}, "
                          "self- and cross-attention"),
        ("opset", report.opset),
        ("external data", "yes" if report.external_data else "no (one file per graph)"),
        ("tokenizer", "saved beside the graphs" if report.tokenizer else "none (copy one into the folder)"),
    ])
    yield table("Graphs", ("file", "inputs", "outputs", "checked at"), [
        (file, _names(names["inputs"]), _names(names["outputs"]), "; ".join(map(str, report.checked[file])))
        for file, names in report.graphs.items()])
    count = sum(len(sizes) for sizes in report.checked.values())
    yield verdict(True, f"written and every graph checked against the model ({count} size sets)")


def _names(names: tuple[str, ...]) -> str:
    """Plain names in full, cache tensors summarised (first ... last, count)."""
    plain = [n for n in names if not n.startswith(("past_key_values.", "present."))]
    cache = [n for n in names if n not in plain]
    return ", ".join([*plain, *([f"{cache[0]} ... {cache[-1]} ({len(cache)})"] if cache else [])])
