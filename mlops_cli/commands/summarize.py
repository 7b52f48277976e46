"""`mlops summarize MODEL`.

No `from __future__ import annotations`: `@model_options` rebuilds the signature and typer must see the
Annotated option types as objects, not strings.
"""

from typing import TYPE_CHECKING, Annotated

import typer

from mlops_cli.commands.common import (
    Device,
    DeviceOpt,
    InputOpt,
    JsonOpt,
    ModelArg,
    QuietOpt,
    SeedOpt,
    model_options,
    show_warnings,
)

if TYPE_CHECKING:
    from mlops_cli.core.loading import LoadOptions


@model_options
def summarize_command(
    model: ModelArg,
    inputs: InputOpt = None,
    batch_size: Annotated[int | None, typer.Option(
        "--batch-size", min=1, show_default=False,
        help="Size of the inputs' 'batch' dimension (default: the inputs' own, 2 for built-in specs).")] = None,
    seq_len: Annotated[int | None, typer.Option(
        "--seq-len", min=1, show_default=False, help="Size of the inputs' 'sequence' dimension (text models).")] = None,
    depth: Annotated[int, typer.Option("--depth", min=0, help="Deepest module level shown in the layer table.")] = 3,
    device: DeviceOpt = Device.auto,
    repeats: Annotated[int, typer.Option(
        "--repeats", min=0, help="Timed forward passes (median reported); 0 skips timing.")] = 10,
    warmup: Annotated[int, typer.Option("--warmup", min=0, help="Untimed forward passes before timing.")] = 2,
    seed: SeedOpt = 0,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    *,
    load: "LoadOptions",
) -> None:
    """What to know about a model before shipping it: parameters (unique, tied, trainable, by dtype, bytes on
    disk and in memory), a layer table with output shapes and real MACs (attention included), MACs/FLOPs per
    example, activation memory and the warm forward time. ONNX files: inputs with symbolic dims, opset, ops,
    initializers and external data.

    Example: mlops summarize builtin:tiny-bert --seq-len 128 --batch-size 1
    """
    from mlops_cli import render
    from mlops_cli.render.summarize import summary_tables
    from mlops_cli.services.summarize import SummarizeOptions, summarize

    options = SummarizeOptions(inputs=tuple(inputs or ()), batch_size=batch_size, seq_len=seq_len, depth=depth,
                               device=device.value, warmup=warmup, repeats=repeats, seed=seed)
    with render.progress("Summarizing", quiet=quiet):
        report, loaded = summarize(model, load, options)
    show_warnings(loaded, quiet)
    render.emit(report, as_json, summary_tables)


def register(app: typer.Typer) -> None:
    app.command("summarize")(summarize_command)
