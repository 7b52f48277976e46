"""`mlops estimate MODEL`: size a model from its config alone.

No `from __future__ import annotations`: `@model_options` rebuilds the signature and typer must see the
Annotated option types as objects, not strings.
"""

from typing import TYPE_CHECKING, Annotated

import typer

from mlops_cli.commands.common import JsonOpt, QuietOpt, model_options, progress_steps

if TYPE_CHECKING:
    from mlops_cli.core.loading import LoadOptions


@model_options
def estimate_command(
    model: Annotated[str, typer.Argument(
        metavar="MODEL", show_default=False,
        help="A Hugging Face folder (only its config.json is read), a config.json file, builtin:NAME, or a "
             "weights file with --arch (the weights are not read).")],
    context: Annotated[int, typer.Option(
        "--context", "--seq-len", min=1, help="Tokens per sequence: KV cache, activations and attention MACs.")] = 2048,
    batch: Annotated[int, typer.Option(
        "--batch", "--batch-size", min=1, help="Sequences (or examples) processed together.")] = 1,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    *,
    load: "LoadOptions",
) -> None:
    """Estimate a model without its weights: parameters, MACs per token, weight memory per precision, KV cache,
    activations, AdamW training memory and which GPUs (24/48/80/141 GB) fit. The model is built on the meta
    device from its config: nothing is downloaded, read or allocated, so a 70B config answers in seconds.

    Example: mlops estimate path/to/config.json --context 8192 --batch 4
    """
    from mlops_cli import render
    from mlops_cli.core.contract import ModelRef
    from mlops_cli.render.estimate import estimate_tables
    from mlops_cli.services.estimate import EstimateOptions, run

    with progress_steps(f"estimating {model}", quiet=quiet or as_json) as on_step:
        options = EstimateOptions(load=load, on_step=on_step, context=context, batch=batch)
        report = run(ModelRef.parse(model), options)
    render.emit(report, as_json, estimate_tables, quiet)


def register(app: typer.Typer) -> None:
    app.command("estimate")(estimate_command)
