"""Regenerate every captured output in the docs, so that no doc shows help or output that went stale.

- docs/cli.md: the `--help` of every mlops command.
- docs/commands/*.md: the blocks between `<!-- generated: COMMANDS -->` and `<!-- /generated -->`. COMMANDS is
  what the block shows, as you would type it in bash: `mlops ARGS`, several joined by `; `; a command ending in
  `> /dev/null` runs without its output shown; `echo "exit $?"` after a command prints its exit code, and is the
  only way a non-zero exit is accepted. Each page's examples run in order in a fresh empty folder (so relative
  paths such as `convnet.onnx` are those files), on the built-in models, in this process.

Captured output is normalised where it varies from run to run, with placeholders: timings, rates, speed-ups
and memory growth become `<timing>` / `<memory>` (a table column or row of them, and the table is realigned),
float noise below 1e-5 becomes `<1e-5`, the work folder disappears from paths, load-average warnings are dropped.
The examples run with a private, empty MLOPS_CACHE_DIR, so the user's cache (trained built-ins, remembered ONNX
passes) cannot change what they print.

    .venv/bin/python scripts/gen_docs.py                 # rewrite everything (`make docs`)
    .venv/bin/python scripts/gen_docs.py --check         # exit 1 naming what is stale (tests/test_docs.py)
    .venv/bin/python scripts/gen_docs.py --twice         # rewrite, then check in a fresh process: what still varies

A command that fails (exit 1, an exception, or any non-zero exit without `echo "exit $?"` after it) stops the
script with the page, the command and its output.
"""

from __future__ import annotations

import difflib
import os
import re
import shlex
import subprocess
import sys
import tempfile
import textwrap
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's mlops_cli, whatever the environment has installed
HELP_ENV = {"COLUMNS": "100", "NO_COLOR": "1", "TERM": "dumb"}
EXAMPLE_ENV = {"COLUMNS": "140", "NO_COLOR": "1", "TERM": "dumb"}
# One thread everywhere: fewer run-to-run differences (set in main(), before any command imports torch).
THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}

from rich.cells import cell_len  # noqa: E402
from rich.table import Table  # noqa: E402
from typer.main import get_command  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from mlops_cli.app import app  # noqa: E402

CLI_DOC = ROOT / "docs" / "cli.md"
COMMAND_DOCS = ROOT / "docs" / "commands"
BLOCK = re.compile(r"(<!-- generated: (?P<commands>.+?) -->\n)(?P<body>.*?)(<!-- /generated -->)", re.S)
EXIT_ECHO = 'echo "exit $?"'
TIMING = "<timing>"

# Table columns whose figures are timings (or derived from them), by header; rows by their first cell.
TIMING_HEADER = re.compile(r"(?i)(p50|p90|/s$|/call|spread|speed-up|TTFT|^total$|^seconds$|^time$|latency)")
VOLATILE_ROW = {re.compile(r"(?i)(^latency|\btime\b)"): TIMING,
                re.compile(r"(?i)^load average$"): "<load>",
                re.compile(r"(?i)^peak memory growth$"): "<memory>"}  # mlops average: RSS growth of one run
MEMORY_HEADER = re.compile(r"(?i)^peak mem")
# Free text: (pattern, replacement); what DROP matches is removed (it appears only on a busy machine).
FLOAT_NOISE = re.compile(r"\b\d\.\d\de-(?:0[5-9]|[1-9]\d)\b")
SUBSTITUTIONS = [(re.compile(r"(?<![\w.<])\d+(?:\.\d+)?\s?(?:ns|µs|us|ms|s)\b(?!/)"), TIMING), (FLOAT_NOISE, "<1e-5"),
                 (re.compile(r"(?<=, )\d+ (intra-op )?thread\(s\)"), r"<n> \1thread(s)"),  # default_threads()
                 # TorchScript and torch.export archives embed the source files' absolute paths (torch's debug
                 # info), so their size depends on where the checkout lives
                 (re.compile(r"(\.pt2? \()\d+(?:\.\d+)? (?:B|KiB|MiB)\)"), r"\1<size>)")]
DROP = [re.compile(rf"(?m)^(?:warning: )?{start}(?:[^\n]|\n(?!\n)){{0,300}}?{end}\n?") for start, end in (
    (r"load average [\d.]+ exceeds", "unreliable"),
    (r"latency was noisy \(", r"idle\s+machine"),
    (r"the machine is busy:", r"(?:noisy|core\(s\))$"),
    (r"\d+ thread\(s\) asked for but only", r"\(use\s+--threads\)"),
    (r"CPU frequency scaling is on", r"during\s+the\s+run"),
    (r"noisy samples:", r"as\s+noise"),
)]
ANNOTATIONS: list[str] = []  # the titles and captions of the tables the current example printed


class DocsError(RuntimeError):
    """An example failed: the message names the page and the command."""


@dataclass(frozen=True)
class Step:
    """One command of a generated block."""

    args: list[str]
    shown: bool  # False for `... > /dev/null`
    echo_exit: bool  # followed by `echo "exit $?"`
    text: str  # as written in the marker


def record_annotations() -> None:
    """Remember every table's title and caption (ANNOTATIONS): rich wraps them to the table's width."""
    original = Table.__init__

    def init(self: Table, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        ANNOTATIONS.extend(str(text) for text in (self.title, self.caption) if text)

    Table.__init__ = init  # type: ignore[method-assign]


def invoke(args: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Run `mlops ARGS` in this process; Python warnings behave as in a fresh process (once per example)."""
    ANNOTATIONS.clear()
    with warnings.catch_warnings():
        result = CliRunner().invoke(app, args, env=env)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise DocsError(f"`mlops {shlex.join(args)}` raised {result.exception!r}\n{result.output}") \
            from result.exception
    return result.exit_code, result.output


def tidy(text: str) -> str:
    """Rich pads lines to the console width: strip that, and the blank lines around the text."""
    return "\n".join(line.rstrip() for line in text.strip("\n").splitlines())


# --- docs/cli.md -------------------------------------------------------------------------------------------------

def command_paths(command: object, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command path, groups first (depth-first, in help order)."""
    paths = [path]
    for name, sub in getattr(command, "commands", {}).items():
        paths += command_paths(sub, (*path, name))
    return paths


def help_text(path: tuple[str, ...] | list[str]) -> str:
    code, output = invoke([*path, "--help"], HELP_ENV)
    if code != 0:
        raise DocsError(f"`mlops {' '.join(path)} --help` exited {code}\n{output}")
    return tidy(output)


def render_cli_reference() -> str:
    sections = ["# mlops command reference\n\nGenerated by `scripts/gen_docs.py` (`make docs`) from each "
                "command's `--help`; a test fails when it is stale.\n"]
    for path in command_paths(get_command(app)):
        title = " ".join(("mlops", *path))
        sections.append(f"## `{title}`\n\n```text\n{help_text(path)}\n```\n")
    return "\n".join(sections)


# --- normalising example output ------------------------------------------------------------------------------------

def is_table_line(line: str) -> bool:
    return bool(line) and line[0] in "┏┃┡│├└┌┗┣╭╰"


def split_cells(line: str) -> list[str]:
    return line[1:-1].split(line[0])


def justify(cells: list[str], default: str) -> str:
    """How rich aligned a column: 'right' when its cells are padded on the left (one space of padding)."""
    right = sum(1 for c in cells if c.strip() and c.startswith("  ") and c.endswith(" ") and not c.endswith("  "))
    left = sum(1 for c in cells if c.strip() and c.endswith("  ") and c.startswith(" ") and not c.startswith("  "))
    return default if right == left else "right" if right > left else "left"


def substitute(text: str) -> str:
    for pattern, replacement in SUBSTITUTIONS:
        text = pattern.sub(replacement, text)
    return text


def normalise_table(lines: list[str]) -> list[str]:
    """Put placeholders in the timing columns and rows of one rich table, then realign it if anything changed."""
    content = [i for i, line in enumerate(lines) if line[0] in "┃│"]
    if not content:
        return lines
    rows = {i: split_cells(lines[i]) for i in content}
    width = len(rows[content[0]])
    if any(len(cells) != width for cells in rows.values()):
        return lines  # not a plain grid: leave it alone
    header = [i for i in content if lines[i][0] == "┃"]
    names = [" ".join(rows[i][col].strip() for i in header).strip() for col in range(width)]
    body = [i for i in content if lines[i][0] == "│"]
    new = {i: [c.strip() for c in rows[i]] for i in content}
    for i in body:
        new[i] = [substitute(c) for c in new[i]]
    for col, name in enumerate(names):
        for pattern, placeholder in ((TIMING_HEADER, TIMING), (MEMORY_HEADER, "<memory>")):
            if pattern.search(name):
                for i in body:
                    if new[i][col] not in ("", "-"):
                        new[i][col] = placeholder
    for i in body:
        for pattern, placeholder in VOLATILE_ROW.items():
            if pattern.search(new[i][0]):
                new[i][1:] = [placeholder if c not in ("", "-") else c for c in new[i][1:]]
    unchanged = all(new[i] == [c.strip() for c in rows[i]] for i in content)
    if unchanged and len({cell_len(line) for line in lines}) == 1:
        return lines  # a path taken out of a cell also leaves the rows uneven: realign then too
    widths = [max(cell_len(new[i][col]) for i in content) for col in range(width)]
    changed = {col for col in range(width) for i in body if new[i][col] != rows[i][col].strip()}
    sides = [justify([rows[i][col] for i in content], "right" if col in changed else "left") for col in range(width)]
    out = []
    for i, line in enumerate(lines):
        if i in new:
            cells = [(" " * (w - cell_len(c)) + c if side == "right" else c + " " * (w - cell_len(c)))
                     for c, w, side in zip(new[i], widths, sides, strict=True)]
            out.append(line[0] + line[0].join(f" {c} " for c in cells) + line[-1])
        else:  # a rule: left corner, fill, junction, right corner
            fill, junction = line[1], next((ch for ch in line[1:-1] if ch != line[1]), line[1])
            out.append(line[0] + junction.join(fill * (w + 2) for w in widths) + line[-1])
    return out


def without_workdir(text: str, workdir: Path) -> str:
    for folder in {str(workdir), os.path.realpath(workdir)}:
        text = text.replace(folder + os.sep, "").replace(folder, ".")
    return text


def annotation_at(lines: list[str], start: int, notes: list[str]) -> tuple[str, int] | None:
    """One of the notes (titles, captions) that starts at lines[start], and how many lines rich wrapped it to."""
    text = "\n".join(lines[start:start + 12])
    for note in sorted(notes, key=len, reverse=True):
        match = re.match(r"\s+".join(map(re.escape, note.split())) + r"(?=\n|$)", text)
        if match:
            return note, match.group().count("\n") + 1
    return None


def normalise(output: str, workdir: Path) -> str:
    """Take out what varies from run to run (see the module docstring)."""
    output = without_workdir(output, workdir)
    notes = [without_workdir(note, workdir) for note in ANNOTATIONS]
    for pattern in DROP:
        output = pattern.sub("", output)
    lines = tidy(output).splitlines()
    segments: list[tuple[str, list[str]]] = []  # ("table" | "note" | "line", lines)
    i = 0
    while i < len(lines):
        if is_table_line(lines[i]):
            j = i + 1
            while j < len(lines) and is_table_line(lines[j]) and lines[j - 1][0] not in "└┗╰":
                j += 1  # up to the bottom border: a wide table folds into parts printed one after the other
            segments.append(("table", normalise_table(lines[i:j])))
            i = j
        elif found := annotation_at(lines, i, notes):
            segments.append(("note", [substitute(found[0])]))
            i += found[1]
        else:
            segments.append(("line", [substitute(lines[i])]))
            i += 1
    out: list[str] = []
    for index, (kind, text) in enumerate(segments):
        if kind == "note":  # rich wraps a title or caption to the width of its table, which may have changed
            after = segments[index + 1] if index + 1 < len(segments) else ("", [])
            before = segments[index - 1] if index else ("", [])
            table = after[1] if after[0] == "table" else before[1] if before[0] == "table" else None
            if table:
                text = textwrap.wrap(text[0], cell_len(table[0]), break_on_hyphens=False)
        out += text
    return "\n".join(out)


# --- docs/commands/*.md ------------------------------------------------------------------------------------------

def parse_steps(commands: str, where: str) -> list[Step]:
    parts = [part.strip() for part in commands.split("; ")]
    steps: list[Step] = []
    for index, part in enumerate(parts):
        if part == EXIT_ECHO:
            continue
        words = shlex.split(part)
        if not words or words[0] != "mlops":
            raise DocsError(f"{where}: a generated block runs `mlops ...` commands, not `{part}`")
        shown = words[-2:] != [">", "/dev/null"]
        args = words[1:] if shown else words[1:-2]
        echo = index + 1 < len(parts) and parts[index + 1] == EXIT_ECHO
        steps.append(Step(args=args, shown=shown, echo_exit=echo, text=part))
    return steps


def run_block(commands: str, workdir: Path, where: str) -> str:
    """The console text of one generated block: each shown command after `$ `, then its normalised output."""
    shown: list[str] = []
    for step in parse_steps(commands, where):
        is_help = "--help" in step.args
        code, output = invoke(step.args, HELP_ENV if is_help else EXAMPLE_ENV)
        if code == 1 or (code != 0 and not step.echo_exit):
            raise DocsError(f"{where}: `{step.text}` exited {code}:\n{output}")
        text = tidy(output) if is_help else normalise(output, workdir)
        shown.append(f"$ {step.text}" + (f"\n{text}" if step.shown and text else ""))
        if step.echo_exit:
            shown.append(f'$ {EXIT_ECHO}\nexit {code}')
    return "\n".join(shown)


def render_page(path: Path) -> str:
    """The page with every generated block regenerated (in a fresh work folder, in order)."""
    text = path.read_text(encoding="utf-8")
    previous = Path.cwd()
    # A short folder name of fixed length: printed paths (removed afterwards) must not change how rich wraps.
    with tempfile.TemporaryDirectory(prefix="mlops-docs-", dir="/tmp" if Path("/tmp").is_dir() else None) as folder:
        os.chdir(folder)
        try:
            def replace(match: re.Match[str]) -> str:
                where = f"{path.relative_to(ROOT)}: `{match['commands']}`"
                console = run_block(match["commands"], Path(folder), where)
                return f"{match[1]}```console\n{console}\n```\n{match[4]}"

            return BLOCK.sub(replace, text)
        finally:
            os.chdir(previous)


def rendered_docs() -> dict[Path, str]:
    pages = {CLI_DOC: render_cli_reference()}
    for page in sorted(COMMAND_DOCS.glob("*.md")):
        print(f"gen_docs: {page.relative_to(ROOT)}", file=sys.stderr)
        pages[page] = render_page(page)
    return pages


def main(argv: list[str]) -> int:
    os.environ.update(HELP_ENV, **THREAD_ENV)
    record_annotations()
    # A private, empty mlops cache: what the examples print must not depend on what the user's cache remembers
    # (trained built-ins, ONNX passes measured no faster), nor on what earlier tests left in theirs.
    with tempfile.TemporaryDirectory(prefix="mlops-docs-cache-") as cache:
        os.environ["MLOPS_CACHE_DIR"] = cache
        try:
            pages = rendered_docs()
        except DocsError as error:
            print(f"gen_docs: FAILED: {error}", file=sys.stderr)
            return 1
    stale = [path for path, text in pages.items()
             if not path.exists() or path.read_text(encoding="utf-8") != text]
    if "--check" in argv:
        for path in stale:
            old = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
            diff = list(difflib.unified_diff(old, pages[path].splitlines(), "on disk", "generated now", lineterm=""))
            print(f"{path.relative_to(ROOT)} is stale: run `make docs`", *diff[:40], sep="\n", file=sys.stderr)
        return 1 if stale else 0
    for path in stale:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(pages[path], encoding="utf-8")
        print(f"gen_docs: wrote {path.relative_to(ROOT)}", file=sys.stderr)
    if "--twice" in argv:  # what the test does next: a fresh process must produce the same bytes
        return subprocess.run([sys.executable, __file__, "--check"], check=False).returncode
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
