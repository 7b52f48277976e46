"""The root `mlops` app: registers every command module and maps errors to exit codes, once.

Command modules live in `mlops_cli/commands/`; each exposes `register(app)`. They import torch and
friends only inside their functions, so `mlops --help` stays fast. Whatever a command (or a job file) raises
comes through `MlopsGroup.main`, the one place that turns it into a message on stderr and an exit code.
"""

from __future__ import annotations

import importlib
import inspect
import os
import pkgutil
import sys
import traceback
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from mlops_cli import __version__, commands
from mlops_cli.core.errors import MlopsError, ResourceError

# Order in `mlops --help`; modules not listed come after, alphabetically.
COMMAND_ORDER = ("inspect", "summarize", "estimate", "view", "export", "verify_parity", "compress", "prune",
                 "diff", "average", "bench", "bench_tokenizers", "generate", "zoo")


def exit_code_for(exc: BaseException) -> tuple[int, str, str | None]:
    """The one error -> (exit code, message, hint) table. Typed errors carry their own code and hint."""
    if isinstance(exc, MlopsError):
        return exc.exit_code, exc.message, exc.hint
    if isinstance(exc, MemoryError):
        return ResourceError.exit_code, "out of memory", "Use a smaller batch/shape or a machine with more memory."
    if type(exc).__name__ == "OutOfMemoryError":  # torch's CUDA allocation failure (a RuntimeError), by name: no torch
        first_line = next(iter(str(exc).strip().splitlines()), "")
        return ResourceError.exit_code, f"out of GPU memory: {first_line}".rstrip(": "), \
            "Use --device cpu or smaller inputs; a model too big for one GPU runs placed: --device-map auto " \
            "--max-memory (docs/scaling.md)."
    if isinstance(exc, OSError):
        if exc.errno == 28:
            return ResourceError.exit_code, f"no space left on device: {exc.filename or ''}".strip(": "), \
                "Free some disk space."
        return 1, f"{exc.strerror or exc}: {exc.filename or ''}".strip(": "), \
            "Run with MLOPS_DEBUG=1 for the traceback."
    return 1, f"internal error: {type(exc).__name__}: {exc}", \
        "This is a bug in mlops; rerun with MLOPS_DEBUG=1 and report the traceback."


def _widen_piped_help() -> None:
    """--help is formatted by Typer's own Rich console, 80 columns when piped, which truncated option names:
    give it the width our tables get (render.default_width). TERMINAL_WIDTH, Typer's own setting, still wins."""
    from typer import rich_utils

    from mlops_cli.render import default_width

    if not os.environ.get("TERMINAL_WIDTH"):
        rich_utils.MAX_WIDTH = default_width()


class MlopsGroup(TyperGroup):
    """The root command: every exception a command raises becomes a message, a hint and its exit code here."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        _widen_piped_help()
        try:
            return super().main(*args, **kwargs)
        except (SystemExit, KeyboardInterrupt):
            raise
        except Exception as exc:
            from mlops_cli import render

            if os.environ.get("MLOPS_DEBUG") == "1":
                traceback.print_exc()
            code, message, hint = exit_code_for(exc)
            render.error(message, hint)
            sys.exit(code)


app = typer.Typer(
    cls=MlopsGroup,
    name="mlops",
    help="Model-ops toolbox for PyTorch checkpoints: inspect, summarize, estimate, view, export, verify parity, "
         "compress, prune, diff, average, benchmark and generate. Exit codes: 0 ok, 2 usage, 3 bad input, "
         "4 unsafe input, 5 output exists, 6 validation failed, 7 out of resources, 130 interrupted.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mlops {__version__}")
        raise typer.Exit()


def load_job_file(path: Path) -> dict[str, Any]:
    """A job file (YAML or TOML) maps command paths to option defaults, e.g. {"export": {"onnx": {...}}}."""
    from mlops_cli.core.errors import InputError

    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:  # OSError, YAML and TOML syntax errors alike
        raise InputError(f"job file {path} could not be read: {exc}") from exc
    if not isinstance(data, dict):
        raise InputError(f"job file {path} must map command names to their options")
    return data


def resolve_job_keys(command: Any, data: dict[str, Any], where: str = "") -> dict[str, Any]:
    """Map a job file onto the command tree: keys name commands (or groups), then options, written as
    parameters (`max_new_tokens`) or as on the command line (`max-new-tokens`, `json`). A key that names
    nothing is an error, never a silently ignored setting."""
    from mlops_cli.core.errors import UsageError

    subcommands = getattr(command, "commands", None)
    resolved: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{where}{key}"
        if subcommands is not None:
            if key not in subcommands:
                raise UsageError(f"job file: {path!r} is not a command here",
                                 hint=f"Commands: {', '.join(sorted(subcommands))}.")
            if not isinstance(value, dict):
                raise UsageError(f"job file: {path!r} must map option names to values")
            resolved[key] = resolve_job_keys(subcommands[key], value, f"{path}.")
            continue
        aliases = {flag[2:].replace("-", "_"): param.name for param in command.params
                   if getattr(param, "param_type_name", "") == "option"
                   for flag in param.opts if flag.startswith("--")}
        if key.replace("-", "_") not in aliases:
            raise UsageError(f"job file: {where.rstrip('.')!r} has no option {key!r} (arguments such as MODEL "
                             "stay on the command line)",
                             hint=f"Its options: {', '.join(sorted(k.replace('_', '-') for k in aliases))}.")
        resolved[aliases[key.replace("-", "_")]] = value
    return resolved


def _config(ctx: typer.Context, value: Path | None) -> Path | None:
    if value is not None:
        job = resolve_job_keys(ctx.command, load_job_file(value))
        ctx.default_map = {**(ctx.default_map or {}), **job}
    return value


@app.callback()
def root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Show the version and exit.")] = False,
    config: Annotated[Path | None, typer.Option(
        "--config", callback=_config, is_eager=True, show_default=False,
        help="Job file (YAML/TOML) giving option defaults per command, e.g. configs/ci-export.yaml; "
             "options on the command line win.")] = None,
) -> None:
    """Model-ops toolbox for PyTorch checkpoints."""


def _command_modules() -> list[str]:
    names = [m.name for m in pkgutil.iter_modules(commands.__path__) if not m.name.startswith("_")]
    rank = {name: index for index, name in enumerate(COMMAND_ORDER)}
    return sorted(names, key=lambda name: (rank.get(name, len(rank)), name))


def _first_sentence(text: str) -> str:
    """A docstring's first sentence on one line: the short help shown in command listings."""
    flat = " ".join(text.split("\n\n")[0].split())
    end = flat.find(". ")
    return flat if end < 0 else flat[: end + 1]


def _reflowed(doc: str) -> str:
    """The docstring with each prose paragraph on one line. Typer keeps the line breaks of every paragraph but
    the first, so source lines wrapped at 120 columns would break raggedly on an 80- or 100-column terminal; lists
    and indented blocks keep theirs."""
    paragraphs = inspect.cleandoc(doc).split("\n\n")
    return "\n\n".join(paragraph if any(line.startswith(("-", "*", " ", "\b")) for line in paragraph.splitlines())
                       else " ".join(paragraph.splitlines()) for paragraph in paragraphs)


def _set_help_texts(typer_app: typer.Typer) -> None:
    """Listings show one sentence per command; `COMMAND --help` shows the whole docstring, reflowed."""
    for info in typer_app.registered_commands:
        doc = info.help or (info.callback.__doc__ if info.callback else None)
        if doc:
            info.help = _reflowed(doc)
            info.short_help = info.short_help or _first_sentence(doc)
    for group in typer_app.registered_groups:
        if group.typer_instance is not None:
            _set_help_texts(group.typer_instance)


for _name in _command_modules():
    _module = importlib.import_module(f"mlops_cli.commands.{_name}")
    if hasattr(_module, "register"):
        _module.register(app)
_set_help_texts(app)


def main() -> int:
    """Console-script entry point; returns the process exit code (errors were mapped by `MlopsGroup.main`)."""
    try:
        app()
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0
