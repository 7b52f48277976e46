"""`mlops bench MODEL`.

No `from __future__ import annotations`: `@model_options` rebuilds the signature and typer must see the
Annotated option types as objects, not strings.
"""

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from mlops_cli.commands.common import (
    Device,
    DeviceOpt,
    ForceOpt,
    InputOpt,
    JsonOpt,
    ModelArg,
    QuietOpt,
    RepeatsOpt,
    SeedOpt,
    ThreadsOpt,
    WarmupOpt,
    model_options,
    progress_steps,
)
from mlops_cli.core.errors import UsageError

if TYPE_CHECKING:
    from mlops_cli.core.loading import LoadOptions

RUNTIME_NAMES = "eager, compile, onnxruntime, torchscript, pt2"


@model_options
def bench_command(
    model: ModelArg,
    runtime: Annotated[str | None, typer.Option(
        "--runtime", show_default=False,
        help=f"Runtimes, comma-separated: {RUNTIME_NAMES}. Default: eager,onnxruntime (an artefact: its own "
             "runtime). Exported runtimes are exported into a temporary folder and verified first.")] = None,
    batch: Annotated[str, typer.Option("--batch", help="Batch sizes, comma-separated (swept upwards; a runtime "
                                                       "out of memory at one is not run at larger ones).")] = "1",
    seq_len: Annotated[str | None, typer.Option(
        "--seq-len", show_default=False, help="Sequence lengths for text models, comma-separated (default: the "
                                              "model's).")] = None,
    dtype: Annotated[str, typer.Option(
        "--dtype", help="Precisions for eager/compile, comma-separated: fp32, fp16, bf16, int8 (torch dynamic int8 "
                        "of the Linear layers, CPU). Half precision on CPU only when asked (not representative).")
    ] = "fp32",
    device: DeviceOpt = Device.cpu,
    threads: ThreadsOpt = None,
    repeats: RepeatsOpt = 20,
    warmup: WarmupOpt = 3,
    against: Annotated[str | None, typer.Option(
        "--against", show_default=False,
        help="The original of an artefact given as MODEL: benched as the eager baseline, and the artefact is "
             "verified against it.")] = None,
    inputs: InputOpt = None,
    seed: SeedOpt = 0,
    plot: Annotated[Path | None, typer.Option(
        "--plot", show_default=False, help="Write latency and throughput vs batch per runtime: a .png "
                                           "(matplotlib) or a self-contained .html page.")] = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    *,
    load: "LoadOptions",
) -> None:
    """Benchmark one model across runtimes, precisions and batch sizes, with timing you can trust. The same inputs
    everywhere, each runtime verified against eager before it is timed (one whose outputs differ is reported, not
    timed), eager and every runtime timed interleaved at each shape, latency p50/p90, throughput (tokens/s for
    text), peak memory, and each speed-up with its 95% interval ("no measurable difference" when it spans 1.0).
    Warnings say when the machine is busy or oversubscribed. Exit 7 only when nothing could run.

    Example: mlops bench builtin:tiny-bert --runtime eager,onnxruntime --batch 1,8 --seq-len 128 --threads 1
    """
    from mlops_cli import render
    from mlops_cli.core.contract import ModelRef
    from mlops_cli.core.errors import ValidationFailed
    from mlops_cli.render.bench import bench_tables
    from mlops_cli.services.bench import BenchOptions, run

    with progress_steps(f"benchmarking {model}", quiet=quiet or as_json) as on_step:
        options = BenchOptions(
            runtimes=names(runtime), batches=numbers(batch, "--batch"),
            seq_lens=numbers(seq_len, "--seq-len"), dtypes=names(dtype), device=device.value,
            threads=threads, repeats=repeats, warmup=warmup,
            against=ModelRef.parse(against) if against else None, inputs=tuple(inputs or ()), seed=seed,
            plot=plot, force=force, load=load, on_step=on_step)
        report = run(ModelRef.parse(model), options)
    render.emit(report, as_json, bench_tables, quiet)
    if not report.passed:
        raise ValidationFailed("nothing could be timed: every runtime failed or differs from eager (see above)",
                               hint="Check the 'Not timed' rows; bench the failing runtime alone to see why.")


def names(text: str | None) -> tuple[str, ...]:
    """'eager, onnxruntime' -> ('eager', 'onnxruntime'), duplicates dropped, order kept."""
    if not text:
        return ()
    return tuple(dict.fromkeys(part.strip().lower() for part in text.split(",") if part.strip()))


def numbers(text: str | None, option: str) -> tuple[int, ...]:
    """'1,8,32' -> (1, 8, 32)."""
    values = names(text)
    if not all(value.isdigit() and int(value) > 0 for value in values):
        raise UsageError(f"{option} {text!r}: expected positive whole numbers separated by commas",
                         hint=f"Example: {option} 1,8,32")
    return tuple(int(value) for value in values)


def register(app: typer.Typer) -> None:
    app.command("bench")(bench_command)
