"""`mlops prune MODEL`: prune weights, report what it buys, write the result like the input.

No `from __future__ import annotations` here: `@model_options` sets the command's signature itself, and
typer would then see the Annotated option types as plain strings.
"""

from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from mlops_cli.commands.common import (
    AtolOpt,
    BatchSizeOpt,
    Device,
    DeviceOpt,
    EvalOpt,
    EvalTextOpt,
    ForceOpt,
    InputOpt,
    JsonOpt,
    ModelArg,
    Preset,
    QuietOpt,
    RepeatsOpt,
    RtolOpt,
    SeedOpt,
    SeqLenOpt,
    ThreadsOpt,
    WarmupOpt,
    evaluation_text,
    model_options,
    progress_steps,
)

if TYPE_CHECKING:
    from mlops_cli.core.loading import LoadOptions


class Method(str, Enum):
    l1 = "l1"
    random = "random"
    ln_structured = "ln-structured"
    global_ = "global"


@model_options
def prune_command(
    model: ModelArg,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", show_default=False,
        help="Where to write the pruned model (same kind as the input). A sweep writes one per amount, named "
             "OUT-<amount>. Without -o nothing is written (report only).")] = None,
    method: Annotated[Method, typer.Option(
        "--method", help="l1 / random: unstructured, per layer; ln-structured: whole rows/channels by L-n norm "
                         "(--n, --dim); global: L1 unstructured across all selected layers together.")] = Method.l1,
    amount: Annotated[str, typer.Option(
        "--amount", help="Share of weights (or channels) to remove, 0-1; a comma list (0.1,0.3,0.5) sweeps.")] = "0.3",
    n: Annotated[float, typer.Option("--n", help="Norm order for ln-structured and channel importance (1, 2, inf).")
                 ] = 2.0,
    dim: Annotated[int | None, typer.Option(
        "--dim", show_default=False, help="ln-structured: weight dimension to prune along (default 0: outputs).")
                   ] = None,
    include: Annotated[list[str] | None, typer.Option(
        "--include", show_default=False,
        help="Regex over module names (repeatable): prune only matching modules. May name embeddings, norms or the "
             "head, which are left alone by default.")] = None,
    exclude: Annotated[list[str] | None, typer.Option(
        "--exclude", show_default=False, help="Regex over module names (repeatable): never prune these.")] = None,
    structured_shrink: Annotated[bool, typer.Option(
        "--structured-shrink", help="Remove whole channels/neurons so the file and the compute really shrink.")
                                 ] = False,
    max_drift: Annotated[float | None, typer.Option(
        "--max-drift", show_default=False, help="Fail (exit 6) when any output moves by more than this (max |diff|).")
                         ] = None,
    min_top1: Annotated[float | None, typer.Option(
        "--min-top1", show_default=False, help="Fail (exit 6) when top-1 agreement with the unpruned model is lower "
                                               "(0-1).")] = None,
    size_estimate: Annotated[bool, typer.Option(
        "--size-estimate/--no-size-estimate",
        help="Estimate the compressed size, where zeros pay off (gzip -1; beyond 16 MiB of weights from a fixed "
             "sample of the bytes, as the report says). Off saves its time on large models.")] = True,
    preset: Annotated[Preset, typer.Option(
        "--preset", help="Enforce a tolerance preset on the drift (exit 6 beyond it): fp32, fp16, bf16, int8; auto "
                         "reports the drift without enforcing it (see also --max-drift, --min-top1).")
    ] = Preset.auto,  # type: ignore[attr-defined]
    atol: AtolOpt = None,
    rtol: RtolOpt = None,
    inputs: InputOpt = None,
    batch_size: BatchSizeOpt = None,
    seq_len: SeqLenOpt = None,
    repeats: RepeatsOpt = 20,
    threads: ThreadsOpt = None,
    warmup: WarmupOpt = 3,
    seed: SeedOpt = 0,
    device: DeviceOpt = Device.auto,
    eval_text: EvalTextOpt = None,
    evaluate: EvalOpt = True,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    *,
    load: "LoadOptions",
) -> None:
    """Prune a model's Linear/Conv weights (magnitude, random, Ln-structured or global) and report what it buys:
    sparsity per layer, raw vs compressed size, drift against the unpruned model and latency before/after. Zeros
    alone do not shrink a dense file or speed up dense kernels; --structured-shrink removes channels for real.
    Drift is reported, not checked, unless --max-drift, --min-top1, --preset or --atol/--rtol is given (then
    exit 6). A Hugging Face causal LM also gets its perplexity per amount on --eval-text (the pruned model in
    PyTorch) and the greedy next-token agreement with the unpruned one.

    Example: mlops prune builtin:convnet -o pruned --method l1 --amount 0.1,0.3,0.5
    """
    from mlops_cli import render
    from mlops_cli.commands.common import parse_tolerances
    from mlops_cli.core.compare import PRESETS
    from mlops_cli.core.contract import ModelRef
    from mlops_cli.core.errors import UsageError, ValidationFailed
    from mlops_cli.core.inputs import InputRequest
    from mlops_cli.render.prune import prune_tables
    from mlops_cli.services.prune import PruneOptions, run

    try:
        amounts = tuple(float(part) for part in amount.split(",") if part.strip())
    except ValueError as exc:
        raise UsageError(f"--amount {amount!r} is not a number or a comma list of numbers",
                         hint="Example: --amount 0.3 or --amount 0.1,0.3,0.5") from exc
    checked = atol or rtol or preset.value != "auto"  # pruning keeps the dtype: auto means fp32 tolerances
    tolerances = parse_tolerances(atol, rtol, PRESETS["fp32" if preset.value == "auto" else preset.value]) \
        if checked else None
    with progress_steps(f"pruning {model}", quiet=quiet or as_json) as on_step:
        options = PruneOptions(threads=threads,
            load=load, output=output, force=force, on_step=on_step, method=method.value, amounts=amounts, n=n,
            dim=dim, include=tuple(include or ()), exclude=tuple(exclude or ()), structured_shrink=structured_shrink,
            seed=seed, device=device.value, tolerances=tolerances, max_drift=max_drift, min_top1=min_top1,
            inputs=InputRequest(specs=tuple(inputs or ()), batch_size=batch_size, seq_len=seq_len, seed=seed),
            repeats=repeats, warmup=warmup, size_estimate=size_estimate,
            evaluation=evaluation_text(eval_text, evaluate))
        report = run(ModelRef.parse(model), options)
    render.emit(report, as_json, prune_tables, quiet)
    if report.enforced and not report.passed:
        raise ValidationFailed(report.verdict)


def register(app: typer.Typer) -> None:
    app.command("prune")(prune_command)
