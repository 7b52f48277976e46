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

from rich.console import Console, RenderableType
from rich.table import Table
from rich.text import Text

_stdout: Console | None = None
_stderr: Console | None = None


def stdout() -> Console:
    """Console on stdout (created lazily, so CliRunner's captured streams are honoured)."""
    global _stdout
    if _stdout is None or _stdout.file is not sys.stdout:
        _stdout = Console(file=sys.stdout, highlight=False, soft_wrap=False)
    return _stdout


def stderr() -> Console:
    global _stderr
    if _stderr is None or _stderr.file is not sys.stderr:
        _stderr = Console(file=sys.stderr, highlight=False)
    return _stderr


# ---------------------------------------------------------------- JSON


def to_jsonable(value: Any) -> Any:
    """Dataclasses, paths, enums, tuples and numpy scalars -> plain JSON types (non-finite -> None)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {field.name: to_jsonable(getattr(value, field.name)) for field in dataclasses.fields(value)}
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


def table(title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]],
          numeric: Sequence[str] = (), caption: str | None = None) -> Table:
    """A table in the house style; columns named in `numeric` are right-aligned.

    Titles, captions and cells are plain text: a path like `run[1]/model.pt` must not be read as markup.
    """
    result = Table(title=Text(title, style="bold"), title_justify="left",
                   caption=Text(caption) if caption is not None else None,
                   caption_justify="left", header_style="bold cyan", show_lines=False)
    for column in columns:
        result.add_column(column, justify="right" if column in numeric else "left", overflow="fold")
    for row in rows:
        result.add_row(*(cell if isinstance(cell, Text) else Text(str(cell)) for cell in row))
    return result


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
