"""The render layer: the only place that prints.

Reports are frozen dataclasses returned by services. A command hands its report to `emit()` together
with a function that turns it into Rich renderables (tables, verdict lines); with `--json` the same
report becomes one JSON object on stdout instead. Per-command table builders live in the modules of
this package (`render/inspect.py`, ...) and share the helpers below, so every table looks alike.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console, ConsoleOptions, RenderableType, RenderResult
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

_stdout: Console | None = None
_stderr: Console | None = None
WIDE_DEFAULT = 160  # columns when neither COLUMNS nor a terminal gives a width (output to a file, CI logs)


def default_width() -> int | None:
    """The width for our consoles (and --help): None lets Rich use COLUMNS or the terminal's width (of stdin,
    stdout or stderr, so `mlops ... | less` still fits the screen); with neither, a wide default rather than
    Rich's 80 columns, which squeezed tables and truncated option names in --help."""
    if os.environ.get("COLUMNS", "").strip().isdigit():
        return None
    for descriptor in (0, 1, 2):
        try:
            os.get_terminal_size(descriptor)
        except (OSError, ValueError):
            continue
        return None
    return WIDE_DEFAULT


def stdout() -> Console:
    """Console on stdout (created lazily, so CliRunner's captured streams are honoured)."""
    global _stdout
    if _stdout is None or _stdout.file is not sys.stdout:
        _stdout = Console(file=sys.stdout, highlight=False, soft_wrap=False, width=default_width())
    return _stdout


def stderr() -> Console:
    global _stderr
    if _stderr is None or _stderr.file is not sys.stderr:
        _stderr = Console(file=sys.stderr, highlight=False, width=default_width())
    return _stderr


# ---------------------------------------------------------------- JSON


def to_jsonable(value: Any) -> Any:
    """Dataclasses, paths, enums, tuples and numpy scalars -> plain JSON types (non-finite -> None)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {field.name: to_jsonable(getattr(value, field.name)) for field in dataclasses.fields(value)
                if field.metadata.get("json", True)}  # raw timing samples stay out of the JSON
    if isinstance(value, dict):
        return {str(key): to_jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [to_jsonable(item) for item in value]
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return to_jsonable(value.item())
    return str(value)


def emit(report: Any, as_json: bool, human: Callable[[Any], Iterable[RenderableType]], quiet: bool = False) -> None:
    """Print a report: one JSON object on stdout with --json, otherwise its Rich renderables.

    A report's `warnings` (core/contract.py `Report`) are shown here, the one way for every command: inside the
    JSON object with --json, else as `warning:` lines on stderr (never mixed into stdout tables).
    """
    if as_json:
        sys.stdout.write(json.dumps(to_jsonable(report), indent=2) + "\n")
        sys.stdout.flush()
        return
    if not quiet:
        for message in getattr(report, "warnings", ()):
            hint(f"warning: {message}")
    console = stdout()
    for renderable in human(report):
        console.print(renderable)


# ---------------------------------------------------------------- tables and lines


NAME_MIN = 24  # a name column is not squeezed below this: a table that would need it folds instead


def middle_ellipsis(text: str | Text, width: int) -> Text:
    """`text` cut to `width` cells in the middle, keeping both ends: for names whose start says where and
    whose end says what (`encoder.layer.0.attention.output.dense.weight` -> `encoder.layer…put.dense.weight`)."""
    text = Text(text) if isinstance(text, str) else text
    if len(text) <= width:
        return text
    if width <= 1:
        return Text("…"[:width])
    head = (width - 1) // 2
    tail = width - 1 - head
    return Text.assemble(text[:head], "…", text[len(text) - tail:])


class MiddleEllipsis:
    """A table cell holding a name, shortened in the middle to whatever width its column gets."""

    def __init__(self, text: str | Text) -> None:
        self.text = Text(text) if isinstance(text, str) else text

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        width = self.text.cell_len
        return Measurement(min(width, NAME_MIN), width)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield middle_ellipsis(self.text, options.max_width)


class FoldingTable(Table):
    """A table that folds when it is too wide for the console: its columns are split into several tables, one
    under the other, each repeating the name columns, so numbers keep their width (never wrapped or cut)."""

    name_columns: tuple[int, ...] = (0,)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        groups = self._fold(console, options)
        if len(groups) <= 1:
            yield from super().__rich_console__(console, options)
            return
        for number, group in enumerate(groups, 1):
            yield self._part(group, number, len(groups))

    def _needed(self, console: Console, options: ConsoleOptions, index: int) -> int:
        """The width column `index` needs: numbers whole; names and text (which wrap) up to NAME_MIN."""
        column = self.columns[index]
        widest = max(Measurement.get(console, options, cell).maximum for cell in (column.header, *column.cells))
        width = widest if column.no_wrap else min(widest, NAME_MIN)
        return width + self._get_padding_width(index) + (1 if self.box else 0)

    def _fold(self, console: Console, options: ConsoleOptions) -> list[list[int]]:
        """Column groups, each fitting `options.max_width` with the name columns (one group: no need to fold).

        A column too wide even beside the names alone gets a group of its own, where Rich squeezes it.
        """
        needed = [self._needed(console, options, index) for index in range(len(self.columns))]
        keys = [index for index in self.name_columns if index < len(self.columns)]
        available = options.max_width - (1 if self.box and self.show_edge else 0) - sum(needed[i] for i in keys)
        groups: list[list[int]] = []
        used = available
        for index in (i for i in range(len(self.columns)) if i not in keys):
            if used + needed[index] > available:
                groups.append([])
                used = 0
            groups[-1].append(index)
            used += needed[index]
        return [sorted(keys + group) for group in groups] or [keys]

    def _part(self, group: list[int], number: int, total: int) -> Table:
        title = Text.assemble(self.title or "", f" ({number}/{total})") if self.title else None
        part = Table(title=title, title_justify=self.title_justify, caption=self.caption if number == total else None,
                     caption_justify=self.caption_justify, header_style=self.header_style, show_lines=self.show_lines)
        part.columns = [dataclasses.replace(self.columns[index], _index=position)
                        for position, index in enumerate(group)]
        part.rows = list(self.rows)
        return part


def table(title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]],
          numeric: Sequence[str] = (), caption: str | None = None, names: Sequence[str] | None = None) -> Table:
    """A table in the house style.

    Columns named in `numeric` are right-aligned and never wrapped (a number split over two lines reads as two
    numbers). Columns named in `names` (by default the first column, unless it is numeric) hold names that are
    shortened in the middle when space runs out. A table too wide even so folds into several (FoldingTable).
    Titles, captions and cells are plain text: a path like `run[1]/model.pt` must not be read as markup.
    """
    names = tuple(names) if names is not None else tuple(columns[:1]) if columns[:1] and columns[0] not in numeric \
        else ()
    result = FoldingTable(title=Text(title, style="bold"), title_justify="left",
                          caption=Text(caption) if caption is not None else None,
                          caption_justify="left", header_style="bold cyan", show_lines=False)
    for column in columns:
        if column in numeric:
            result.add_column(column, justify="right", no_wrap=True, overflow="ellipsis")
        else:
            result.add_column(column, justify="left", overflow="fold")
    result.name_columns = tuple(index for index, column in enumerate(columns) if column in names)
    for row in rows:
        result.add_row(*(_cell(cell, columns[index] in names) for index, cell in enumerate(row)))
    return result


def _cell(value: Any, is_name: bool) -> RenderableType:
    text = value if isinstance(value, Text) else Text(str(value))
    return MiddleEllipsis(text) if is_name else text


def key_values(title: str, pairs: Iterable[tuple[str, Any]]) -> Table:
    """A two-column property table (what a report knows about one thing)."""
    return table(title, ("property", "value"), ((key, value) for key, value in pairs))


def verdict(passed: bool, message: str) -> Text:
    """The one-line PASS/FAIL verdict that ends a checking command's output."""
    label = Text(" PASS ", style="bold white on green") if passed else Text(" FAIL ", style="bold white on red")
    return Text.assemble(label, " ", message)


def note(message: str) -> Text:
    return Text(message, style="dim")


def hint(message: str) -> None:
    """A hint for humans, on stderr (never pollutes --json stdout)."""
    stderr().print(Text(message, style="yellow"))


def error(message: str, hint_text: str | None = None) -> None:
    console = stderr()
    console.print(Text.assemble(Text("error: ", style="bold red"), message))
    if hint_text:
        console.print(Text.assemble(Text("hint: ", style="bold yellow"), hint_text))


@contextmanager
def progress(description: str, total: float | None = None, quiet: bool = False) -> Iterator[Callable[..., None]]:
    """A progress bar on stderr when it is a terminal; yields `advance(n=1, description=None)`."""
    if quiet or not sys.stderr.isatty() or os.environ.get("CI"):
        yield lambda *args, **kwargs: None
        return
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn  # only when shown

    columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn()]
    with Progress(*columns, console=stderr(), transient=True) as bar:
        task = bar.add_task(description, total=total)

        def advance(amount: float = 1, description: str | None = None) -> None:
            bar.update(task, advance=amount, description=description or bar.tasks[0].description)

        yield advance


# ---------------------------------------------------------------- number formats


def fmt_bytes(size: float | None) -> str:
    if size is None:
        return "-"
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    return f"{value:.2f} TiB"


def fmt_count(count: float | None) -> str:
    """1234567 -> '1.23 M' (for parameters, MACs)."""
    if count is None:
        return "-"
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(count) >= scale:
            return f"{count / scale:.2f} {unit}"
    return f"{count:g}" if isinstance(count, float) else str(count)


def fmt_ms(milliseconds: float | None) -> str:
    if milliseconds is None:
        return "-"
    if milliseconds < 1:
        return f"{milliseconds * 1000:.1f} µs"
    return f"{milliseconds:.2f} ms" if milliseconds < 1000 else f"{milliseconds / 1000:.2f} s"


def fmt_float(value: float | None, digits: int = 3) -> str:
    """Scientific notation for tiny/huge values, fixed otherwise; '-' for None."""
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value != 0 and (abs(value) < 10 ** -digits or abs(value) >= 1e6):
        return f"{value:.{digits - 1}e}"
    return f"{value:.{digits}f}"


def fmt_pct(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value * 100:.{digits}f}%"
