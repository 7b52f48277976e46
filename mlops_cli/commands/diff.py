"""`mlops diff A B`: what differs between two checkpoints, tensor by tensor (no model is built)."""

from __future__ import annotations

from typing import Annotated

import typer

from mlops_cli.commands.common import JsonOpt, QuietOpt, progress_steps

WeightsArg = "A weights file (safetensors, torch.save), a sharded *.safetensors.index.json, a Hugging Face folder " \
             "or a folder saved by mlops."
KeyOpt = Annotated[str | None, typer.Option(
    "--key", show_default=False,
    help="Key of the state_dict inside a training checkpoint (found automatically: state_dict, model, net...); "
         "applies to every input.")]
StripPrefixOpt = Annotated[str | None, typer.Option(
    "--strip-prefix", show_default=False,
    help="Drop this prefix from weight names on every input (e.g. 'module.' from DataParallel).")]


def diff_command(
    a: Annotated[str, typer.Argument(metavar="A", show_default=False, help=f"The checkpoint before. {WeightsArg}")],
    b: Annotated[str, typer.Argument(metavar="B", show_default=False, help=f"The checkpoint after. {WeightsArg}")],
    atol: Annotated[float, typer.Option(
        "--atol", min=0, help="An element counts as changed when |B - A| > atol (0: any change).")] = 0.0,
    expect_same: Annotated[bool, typer.Option(
        "--expect-same", help="Fail (exit 6) when anything differs beyond --atol: names, shapes, dtypes or values "
                              "(a CI gate for 'this conversion changed nothing').")] = False,
    top: Annotated[int, typer.Option("--top", min=1, help="Layers and tensors shown, most changed first.")] = 15,
    key: KeyOpt = None,
    strip_prefix: StripPrefixOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Compare two checkpoints tensor by tensor, without building a model: names only in A or B, shape and dtype
    changes, and for common tensors the relative change ‖B−A‖/‖A‖, max |Δ|, cosine and share of elements changed,
    summed per layer and sorted by change (what did fine-tuning touch?). Tensors are streamed: the two models are
    never held in memory. Exit 0 when it ran; with --expect-same, exit 6 when anything differs beyond --atol.

    Example: mlops diff base/ finetuned/ --top 10
    """
    from mlops_cli import render
    from mlops_cli.core.contract import LoadOptions, ModelRef
    from mlops_cli.core.errors import ValidationFailed
    from mlops_cli.render.diff import diff_tables
    from mlops_cli.services.diff import DiffOptions, run

    with progress_steps(f"diff {a} {b}", quiet=quiet or as_json) as on_step:
        options = DiffOptions(load=LoadOptions(key=key, strip_prefix=strip_prefix), on_step=on_step,
                              other=ModelRef.parse(b), atol=atol, expect_same=expect_same)
        report = run(ModelRef.parse(a), options)
    render.emit(report, as_json, lambda r: diff_tables(r, top), quiet)
    if expect_same and not report.passed:
        raise ValidationFailed(report.verdict, hint="Drop --expect-same to see what changed, or raise --atol.")


def register(app: typer.Typer) -> None:
    app.command("diff")(diff_command)
