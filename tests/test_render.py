"""Tables never break numbers, names shorten in the middle, wide tables fold, piped output is wide (issue #13.7)."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from mlops_cli import render
from mlops_cli.render import middle_ellipsis, table

ROOT = Path(__file__).resolve().parents[1]
PARITY_COLUMNS = ("input set", "output", "max |diff|", "max rel", "mean |diff|", "p99 |diff|", "cosine", "top-1",
                  "min atol", "result")
NUMBERS = ("2.38e-06", "1.19e-05", "3.12e-07", "1.91e-06", "0.999999", "100.0%", "4.77e-06")
LONG_NAME = "encoder.layer.0.attention.output.dense.weight"


def _render(renderable: object, width: int) -> str:
    console = Console(file=io.StringIO(), width=width, color_system=None)
    console.print(renderable)
    return console.file.getvalue()  # type: ignore[attr-defined]


def _parity_table():
    rows = [(f"batch={b},sequence={s}", "logits", *NUMBERS, "PASS") for b, s in ((2, 16), (1, 8), (3, 32))]
    return table("Parity: model.onnx (onnxruntime) vs builtin:tiny-bert (torch)", PARITY_COLUMNS, rows,
                 numeric=PARITY_COLUMNS[2:9], caption="pass: |cand - ref| <= atol 1e-05 + rtol 0.001 * |ref|")


@pytest.mark.parametrize("width", [160, 100, 80, 60])
def test_numbers_are_never_split_across_lines(width) -> None:
    """At 100 columns a parity table used to print `2.38e-0` on one line and `6` on the next."""
    output = _render(_parity_table(), width)
    cells = [cell.strip() for line in output.splitlines() if line.startswith("│") for cell in line.split("│")[1:-1]]
    numeric_cells = [cell for cell in cells if re.search(r"\d", cell) and "=" not in cell]
    assert numeric_cells and set(numeric_cells) <= set(NUMBERS), f"broken numbers in:\n{output}"
    assert all(number in output for number in NUMBERS)
    assert all(len(line) <= width for line in output.splitlines())


def test_a_table_too_wide_folds_and_keeps_its_names() -> None:
    output = _render(_parity_table(), 60)
    assert "(1/" in output and all(header in output for header in PARITY_COLUMNS)
    assert output.count("batch=2,sequence=16") > 1  # the name column is repeated in each part
    assert "(1/" not in _render(_parity_table(), 160)  # a table that fits is one table


def test_long_names_are_shortened_in_the_middle() -> None:
    short = middle_ellipsis(LONG_NAME, 30)
    assert len(short) == 30 and short.plain.startswith("encoder.layer.") and short.plain.endswith("dense.weight")
    assert "…" in short.plain and middle_ellipsis("fc.weight", 30).plain == "fc.weight"
    output = _render(table("Sparsity", ("layer", "params", "sparsity"), [(LONG_NAME, "2.36 M", "50.0%")],
                           numeric=("params", "sparsity")), 50)
    row = next(line for line in output.splitlines() if "50.0%" in line)
    assert "…" in row and "encoder" in row and "weight" in row and "2.36 M" in row


def test_names_can_be_named_and_numeric_first_columns_are_not_names() -> None:
    named = table("t", ("threads", "implementation", "µs/call"), [("4", LONG_NAME, "12.5")],
                  numeric=("threads", "µs/call"), names=("implementation",))
    assert "…" in _render(named, 30)
    unnamed = table("t", ("threads", "µs/call"), [("4", "12.5")], numeric=("threads", "µs/call"))
    assert unnamed.name_columns == ()  # type: ignore[attr-defined]


def test_a_hundred_layer_table_stays_one_line_per_layer() -> None:
    """Sparsity tables of a 100-layer CNN became hundreds of wrapped rows at 80 columns."""
    rows = [(f"features.{i}.block.{i % 3}.conv_depthwise.weight", "Conv2d", f"{i * 1152}", f"{i * 576}", "50.0%",
             "2.38e-06") for i in range(100)]
    output = _render(table("Sparsity per layer", ("layer", "type", "params", "zeros", "sparsity", "max |diff|"), rows,
                           numeric=("params", "zeros", "sparsity", "max |diff|")), 80)
    assert sum("50.0%" in line for line in output.splitlines()) == 100
    assert len(output.splitlines()) == 100 + 5  # title, three header lines, bottom border


def test_piped_output_gets_a_wide_default(monkeypatch) -> None:
    def no_terminal(descriptor: int = 1) -> os.terminal_size:
        raise OSError("not a terminal")

    monkeypatch.setattr(os, "get_terminal_size", no_terminal)
    monkeypatch.delenv("COLUMNS", raising=False)
    assert render.default_width() == render.WIDE_DEFAULT
    monkeypatch.setenv("COLUMNS", "100")
    assert render.default_width() is None  # Rich reads COLUMNS itself


@pytest.mark.parametrize(("command", "options"), [
    (("compress", "half"), ("--no-default-keep", "--no-keep-io-types")),
    (("export", "onnx"), ("--include-padding", "--keep-metadata")),
])
def test_piped_help_shows_whole_option_names(command, options) -> None:
    """At Rich's 80 columns (piped, COLUMNS unset) `--help` cut option names: `--no-default-k…`."""
    env = {key: value for key, value in os.environ.items() if key not in ("COLUMNS", "LINES", "TERMINAL_WIDTH")}
    env["PYTHONPATH"] = str(ROOT)
    result = subprocess.run([sys.executable, "-m", "mlops_cli", *command, "--help"], capture_output=True, text=True,
                            env=env, stdin=subprocess.DEVNULL, cwd=ROOT, check=True)
    shown = set(re.findall(r"--[a-z0-9][a-z0-9-]*", result.stdout))
    assert set(options) <= shown, result.stdout
