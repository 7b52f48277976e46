"""Tables for `mlops diff`: names and shapes that differ, the layers that changed most, the verdict."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from rich.console import RenderableType
from rich.text import Text

from mlops_cli.render import fmt_count, fmt_float, fmt_pct, key_values, note, table, verdict
from mlops_cli.services.diff import DiffReport

NAMES_SHOWN = 10


def diff_tables(report: DiffReport, top: int = 15) -> Iterator[RenderableType]:
    yield key_values("Diff", [
        ("A", f"{report.a}: {report.tensors_a} tensors ({report.kind_a})"),
        ("B", f"{report.b}: {report.tensors_b} tensors ({report.kind_b})"),
        ("compared", report.compared),
        ("identical", report.identical),
        (f"changed (|Δ| > {report.atol:g})", report.changed),
        ("relative change ‖B−A‖/‖A‖", fmt_float(report.relative_change)),
    ])
    yield from _name_tables(report)
    moved = [layer for layer in report.layers if layer.changed_tensors]
    if moved:
        yield table(f"Layers by change ({min(top, len(moved))} of {len(moved)} changed)",
                    ("layer", "tensors", "changed", "elements", "‖Δ‖/‖A‖", "max |Δ|", "elements changed"),
                    ((layer.layer, layer.tensors, layer.changed_tensors, fmt_count(layer.elements),
                      fmt_float(layer.relative_change), fmt_float(layer.max_abs_diff), fmt_pct(layer.changed_share))
                     for layer in moved[:top]),
                    numeric=("tensors", "changed", "elements", "‖Δ‖/‖A‖", "max |Δ|", "elements changed"))
        changed = [t for t in report.tensors if t.max_abs_diff > report.atol]
        yield table(f"Tensors by change ({min(top, len(changed))} of {len(changed)})",
                    ("tensor", "shape", "dtype", "‖Δ‖/‖A‖", "max |Δ|", "cosine", "elements changed"),
                    ((t.name, list(t.shape), t.dtype, fmt_float(t.relative_change), fmt_float(t.max_abs_diff),
                      fmt_float(t.cosine, 6), fmt_pct(t.changed_share)) for t in changed[:top]),
                    numeric=("‖Δ‖/‖A‖", "max |Δ|", "cosine", "elements changed"))
    untouched = len(report.layers) - len(moved)
    if untouched:
        yield note(f"{untouched} layer(s) unchanged")
    if report.tied:
        yield note(f"stored once as ties (same values as a tensor both sides have): {_names(report.tied)}")
    if report.expect_same:
        yield verdict(report.passed, report.verdict)
    else:
        style = "bold white on green" if report.passed else "bold black on yellow"
        label = " SAME " if report.passed else " DIFF "
        yield Text.assemble(Text(label, style=style), " ", report.verdict)


def _name_tables(report: DiffReport) -> Iterator[RenderableType]:
    one_side = [(name, "A only") for name in report.only_in_a] + [(name, "B only") for name in report.only_in_b]
    if one_side:
        yield table(f"One side only ({len(one_side)})",
                    ("tensor", "where"), one_side[:NAMES_SHOWN], caption=_more(len(one_side)))
    changed = [(m.name, "shape", m.a, m.b) for m in report.shape_changed] + \
        [(m.name, "dtype", m.a, m.b) for m in report.dtype_changed]
    if changed:
        yield table(f"Shape/dtype changed ({len(changed)})",
                    ("tensor", "what", "A", "B"), changed[:NAMES_SHOWN], caption=_more(len(changed)))


def _more(count: int) -> str | None:
    return f"and {count - NAMES_SHOWN} more" if count > NAMES_SHOWN else None


def _names(names: Sequence[str]) -> str:
    more = f" and {len(names) - NAMES_SHOWN} more" if len(names) > NAMES_SHOWN else ""
    return ", ".join(names[:NAMES_SHOWN]) + more
