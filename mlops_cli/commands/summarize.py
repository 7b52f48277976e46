"""`mlops summarize MODEL`.

No `from __future__ import annotations`: `@model_options` rebuilds the signature and typer must see the
Annotated option types as objects, not strings.
"""

from typing import TYPE_CHECKING, Annotated

import typer

from mlops_cli.commands.common import (
    BatchSizeOpt,
    Device,
    DeviceOpt,
    InputOpt,
    JsonOpt,
    ModelArg,
    QuietOpt,
    RepeatsOpt,
    SeedOpt,
    SeqLenOpt,
    ThreadsOpt,
    WarmupOpt,
    model_options,
    progress_steps,
)

if TYPE_CHECKING:
    from mlops_cli.core.loading import LoadOptions


@model_options
def summarize_command(
    model: ModelArg,
    inputs: InputOpt = None,
    batch_size: BatchSizeOpt = None,
    seq_len: SeqLenOpt = None,
    depth: Annotated[int, typer.Option("--depth", min=0, help="Deepest module level shown in the layer table.")] = 3,
    device: DeviceOpt = Device.auto,
    repeats: RepeatsOpt = 10,
    threads: ThreadsOpt = None,
    warmup: WarmupOpt = 2,
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
    from mlops_cli.core.contract import ModelRef
    from mlops_cli.core.inputs import InputRequest
    from mlops_cli.render.summarize import summary_tables
    from mlops_cli.services.summarize import SummarizeOptions, run

    with progress_steps("Summarizing", quiet) as on_step:
        request = InputRequest(specs=tuple(inputs or ()), batch_size=batch_size, seq_len=seq_len, seed=seed)
        options = SummarizeOptions(load=load, on_step=on_step, threads=threads, inputs=request, depth=depth,
                                   device=device.value, warmup=warmup, repeats=repeats)
        report = run(ModelRef.parse(model), options)
    render.emit(report, as_json, summary_tables, quiet)


def register(app: typer.Typer) -> None:
    app.command("summarize")(summarize_command)
