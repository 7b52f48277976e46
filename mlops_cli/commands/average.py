"""`mlops average CKPT... -o OUT`: uniform, weighted or EMA average of checkpoints, streamed tensor by tensor.

No `from __future__ import annotations` here: `@model_options` sets the command's signature itself, and
typer would then see the Annotated option types as plain strings.
"""

from enum import Enum
from typing import TYPE_CHECKING, Annotated

import typer

from mlops_cli.commands.common import (
    BatchSizeOpt,
    Device,
    DeviceOpt,
    ForceOpt,
    InputOpt,
    JsonOpt,
    OutputOpt,
    QuietOpt,
    SeedOpt,
    SeqLenOpt,
    model_options,
    progress_steps,
)

if TYPE_CHECKING:
    from mlops_cli.core.loading import LoadOptions


class Buffers(str, Enum):
    average = "average"
    last = "last"


@model_options
def average_command(
    checkpoints: Annotated[list[str], typer.Argument(
        metavar="CKPT...", show_default=False,
        help="Two or more checkpoints with the same tensors (files, sharded indexes, Hugging Face or mlops folders), "
             "in order: EMA runs from the first to the last; the output is written like the last.")],
    output: OutputOpt,
    weights: Annotated[str | None, typer.Option(
        "--weights", show_default=False,
        help="One weight per checkpoint, e.g. 0.2,0.3,0.5. Weights not summing to 1 are normalised (with a warning): "
             "the result is always an average.")] = None,
    ema: Annotated[float | None, typer.Option(
        "--ema", show_default=False,
        help="EMA decay d in [0, 1): ema = d*ema + (1-d)*x over the checkpoints in order, the first initialising.")
                   ] = None,
    buffers: Annotated[Buffers, typer.Option(
        "--buffers", help="Float buffers (BatchNorm running_mean/var): average them, or copy them from the last "
                          "checkpoint. Integer tensors (num_batches_tracked, counters) are always copied from the "
                          "last.")] = Buffers.average,
    evaluate: Annotated[bool, typer.Option(
        "--eval", help="Run the averaged model against each input (parity engine) and show the drift.")] = False,
    inputs: InputOpt = None,
    batch_size: BatchSizeOpt = None,
    seq_len: SeqLenOpt = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = Device.auto,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    *,
    load: "LoadOptions",
) -> None:
    """Average checkpoints (model soups, checkpoint averaging): uniform, weighted (--weights) or EMA (--ema), tensor
    by tensor in float64 without building a model, so memory stays at a few chunks. Integer tensors and float
    buffers are handled explicitly and listed. The output has the last input's format (an HF folder keeps its
    config and tokenizer, a weights folder its mlops.json), written atomically. Exit 3 names the tensors when the
    checkpoints do not match.

    Example: mlops average run/ckpt-1000 run/ckpt-2000 run/ckpt-3000 -o soup --eval
    """
    from mlops_cli import render
    from mlops_cli.core.contract import ModelRef
    from mlops_cli.core.errors import UsageError
    from mlops_cli.core.inputs import InputRequest
    from mlops_cli.render.average import average_tables
    from mlops_cli.services.average import AverageOptions, run

    try:
        shares = tuple(float(part) for part in weights.split(",")) if weights is not None else None
    except ValueError as exc:
        raise UsageError(f"--weights {weights!r} is not a comma list of numbers",
                         hint="Example: --weights 0.2,0.3,0.5") from exc
    if not checkpoints:
        raise UsageError("average needs at least two checkpoints")
    first, *others = (ModelRef.parse(text) for text in checkpoints)
    with progress_steps(f"averaging {len(checkpoints)} checkpoints", quiet=quiet or as_json) as on_step:
        options = AverageOptions(
            load=load, output=output, force=force, on_step=on_step, others=tuple(others), weights=shares, ema=ema,
            buffers=buffers.value, evaluate=evaluate, device=device.value,
            inputs=InputRequest(specs=tuple(inputs or ()), batch_size=batch_size, seq_len=seq_len, seed=seed))
        report = run(first, options)
    render.emit(report, as_json, average_tables, quiet)


def register(app: typer.Typer) -> None:
    app.command("average")(average_command)
