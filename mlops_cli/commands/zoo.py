"""`mlops zoo list` and `mlops zoo save NAME DIR`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mlops_cli.commands.common import ForceOpt, JsonOpt

zoo_app = typer.Typer(help="Built-in tiny models, built locally and deterministically (tiny-gpt2, tiny-llama "
                           "and tiny-bert trained in seconds on the bundled corpus) for demos and tests.",
                      no_args_is_help=True)


@zoo_app.command("list")
def list_command(as_json: JsonOpt = False) -> None:
    """List the built-in models (use them as builtin:NAME).

    Example: mlops zoo list --json
    """
    from mlops_cli import render
    from mlops_cli.render.zoo import listing_tables
    from mlops_cli.services.zoo import list_models

    render.emit(list_models(), as_json, listing_tables)


@zoo_app.command("save")
def save_command(
    name: Annotated[str, typer.Argument(help="Built-in model name (see `mlops zoo list`).", show_default=False)],
    directory: Annotated[Path, typer.Argument(metavar="DIR", help="Folder to create.", show_default=False)],
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Write a built-in model as a normal checkpoint folder (HF folder, or safetensors + mlops.json).

    Example: mlops zoo save tiny-bert ./tiny-bert
    """
    from mlops_cli import render
    from mlops_cli.core.contract import BUILTIN_PREFIX, ModelRef
    from mlops_cli.render.zoo import save_tables
    from mlops_cli.services.zoo import ZooSaveOptions, run

    ref = ModelRef.parse(name)  # `zoo save tiny-bert` and `zoo save builtin:tiny-bert` alike
    if ref.builtin is None:
        ref = ModelRef.parse(f"{BUILTIN_PREFIX}{name}")
    render.emit(run(ref, ZooSaveOptions(output=directory, force=force)), as_json, save_tables)


def register(app: typer.Typer) -> None:
    app.add_typer(zoo_app, name="zoo")
