"""`mlops inspect FILE`."""

from __future__ import annotations

from typing import Annotated

import typer

from mlops_cli.commands.common import JsonOpt


def inspect_command(
    path: Annotated[str, typer.Argument(metavar="FILE", show_default=False,
                                        help="A checkpoint file or model folder.")],
    as_json: JsonOpt = False,
) -> None:
    """What a checkpoint holds, without building a model: format, tensors, dtypes, sizes, training-checkpoint
    entries, metadata and config. Safe: nothing is unpickled beyond tensors, no code runs.

    Example: mlops inspect model.safetensors --json
    """
    from mlops_cli import render
    from mlops_cli.core.contract import ModelRef
    from mlops_cli.render.inspect import inspect_tables
    from mlops_cli.services.inspect import InspectOptions, run

    render.emit(run(ModelRef.parse(path), InspectOptions()), as_json, inspect_tables)


def register(app: typer.Typer) -> None:
    app.command("inspect")(inspect_command)
