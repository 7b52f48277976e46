"""The `mlops export` group. Its subcommands (onnx, jit, pt2) live in their own modules and register
onto `export_app` in their `register()` functions."""

from __future__ import annotations

import typer

export_app = typer.Typer(help="Export a model to ONNX, TorchScript or torch.export, verified by the parity engine.",
                         no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(export_app, name="export")
