"""`mlops view MODEL`.

No `from __future__ import annotations`: `@model_options` rebuilds the signature and typer must see the
Annotated option types as objects, not strings.
"""

from collections.abc import Iterator
from typing import TYPE_CHECKING, Annotated, Any

import typer

from mlops_cli.commands.common import InputOpt, JsonOpt, ModelArg, QuietOpt, SeedOpt, model_options, progress_steps

if TYPE_CHECKING:
    from mlops_cli.core.loading import LoadOptions


@model_options
def view_command(
    model: ModelArg,
    port: Annotated[int | None, typer.Option(
        "--port", min=0, max=65535, show_default=False,
        help="Port on 127.0.0.1 (default: 8080 when free, else a free one; 0: any free port).")] = None,
    browse: Annotated[bool, typer.Option("--browse", help="Also open the URL in a web browser.")] = False,
    inputs: InputOpt = None,
    seed: SeedOpt = 0,
    serve_seconds: Annotated[float | None, typer.Option(
        "--serve-seconds", hidden=True, help="Stop after this many seconds (tests, scripts).")] = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    *,
    load: "LoadOptions",
) -> None:
    """Open a model in Netron, served on 127.0.0.1 until Ctrl-C. ONNX, TorchScript and .pt2 files are shown as
    they are (no model code runs here); other models are exported to a temporary ONNX file first (--input
    describes its inputs). Only the model and its external data are served, from a private temporary folder;
    no browser opens unless --browse.

    Example: mlops view model.onnx --port 8081
    """
    from contextlib import ExitStack

    from mlops_cli import render
    from mlops_cli.core.contract import ModelRef
    from mlops_cli.core.inputs import InputRequest
    from mlops_cli.services.view import ViewOptions, ViewSession, run

    with ExitStack() as preparing:
        on_step = preparing.enter_context(progress_steps("Preparing the model for Netron", quiet))

        def ready(session: ViewSession) -> None:
            preparing.close()  # the progress line goes before the URL is shown
            render.emit(session, as_json, _session_table, quiet)
            if not quiet:
                render.hint("Serving until Ctrl-C." if serve_seconds is None else f"Serving for {serve_seconds:g} s.")

        options = ViewOptions(load=load, on_step=on_step, port=port, browse=browse, serve_seconds=serve_seconds,
                              inputs=InputRequest(specs=tuple(inputs or ()), seed=seed), on_ready=ready)
        run(ModelRef.parse(model), options)
    if not quiet:
        render.hint("Stopped; the temporary files are deleted.")


def _session_table(session: Any) -> Iterator[Any]:
    from mlops_cli.render import key_values

    yield key_values("Netron", [
        ("url", session.url), ("model", session.reference), ("shown as", session.source),
        ("files served (nothing else)", ", ".join(session.served_files)),
    ])


def register(app: typer.Typer) -> None:
    app.command("view")(view_command)
