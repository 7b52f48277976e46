"""The root `mlops` app: registers every command module and maps errors to exit codes.

Command modules live in `mlops_cli/commands/`; each exposes `register(app)`. They import torch and
friends only inside their functions, so `mlops --help` stays fast.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Annotated

import typer

from mlops_cli import __version__, commands

# Order in `mlops --help`; modules not listed come after, alphabetically.
COMMAND_ORDER = ("inspect", "summarize", "view", "export", "verify_parity", "compress", "prune",
                 "bench_tokenizers", "generate", "zoo")

app = typer.Typer(
    name="mlops",
    help="Model-ops toolbox for PyTorch checkpoints: inspect, export, verify parity, compress, prune, "
         "summarize and benchmark. Exit codes: 0 ok, 2 usage, 3 bad input, 4 unsafe input, "
         "5 output exists, 6 validation failed, 7 out of resources, 130 interrupted.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mlops {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Show the version and exit.")] = False,
) -> None:
    """Model-ops toolbox for PyTorch checkpoints."""


def _command_modules() -> list[str]:
    names = [m.name for m in pkgutil.iter_modules(commands.__path__) if not m.name.startswith("_")]
    rank = {name: index for index, name in enumerate(COMMAND_ORDER)}
    return sorted(names, key=lambda name: (rank.get(name, len(rank)), name))


for _name in _command_modules():
    _module = importlib.import_module(f"mlops_cli.commands.{_name}")
    if hasattr(_module, "register"):
        _module.register(app)


def main() -> int:
    """Console-script entry point; returns the process exit code."""
    try:
        app()
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0
