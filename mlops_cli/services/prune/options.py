"""What a prune run is asked to do, and the checks made on it before anything is loaded."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from mlops_cli.core.contract import ServiceOptions
from mlops_cli.core.errors import UsageError
from mlops_cli.core.inputs import InputRequest
from mlops_cli.core.parity import Tolerances
from mlops_cli.services.perplexity import EvaluationText

METHODS = ("l1", "random", "ln-structured", "global")


@dataclass(frozen=True, kw_only=True)
class PruneOptions(ServiceOptions):
    """What to prune and how, how to check the result, and where to write it.

    Without an output prune only reports (nothing is written): unlike the other writers (`OutputOptions`) its
    output is optional, so it declares output and force itself.
    """

    output: Path | None = None
    force: bool = False
    method: str = "l1"
    amounts: tuple[float, ...] = (0.3,)
    n: float = 2.0  # norm order of ln-structured (and of channel importance when shrinking)
    dim: int | None = None  # ln-structured: weight dimension whose slices are removed (0 = output channels)
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    structured_shrink: bool = False
    seed: int = 0
    device: str = "cpu"
    inputs: InputRequest = field(default_factory=InputRequest)
    tolerances: Tolerances | None = None  # enforce element-wise parity (exit 6) when given
    max_drift: float | None = None  # enforce: worst max |diff| over all outputs
    min_top1: float | None = None  # enforce: worst top-1 agreement over logits-like outputs
    repeats: int = 20  # 0: no latency figures
    warmup: int = 3
    size_estimate: bool = True  # the compressed-size figure (what zeros buy); off saves its time
    evaluation: EvaluationText | None = field(default_factory=EvaluationText)  # causal LMs; None: not measured

    @property
    def enforced(self) -> bool:
        return self.tolerances is not None or self.max_drift is not None or self.min_top1 is not None


def validate_options(options: PruneOptions) -> None:
    """Usage errors (exit 2) found before any model is loaded."""
    if options.method not in METHODS:
        raise UsageError(f"unknown --method {options.method!r}", hint=f"Choose one of: {', '.join(METHODS)}.")
    _check_amounts(options)
    if not options.n > 0:
        raise UsageError(f"--n {options.n:g}: the norm order must be positive (1, 2, inf)")
    if options.dim is not None and (options.method != "ln-structured" or options.structured_shrink):
        raise UsageError("--dim applies to --method ln-structured without --structured-shrink",
                         hint="Structural shrink always removes output channels; drop --dim.")
    for pattern in (*options.include, *options.exclude):
        try:
            re.compile(pattern)
        except re.error as exc:
            raise UsageError(f"--include/--exclude {pattern!r} is not a valid regular expression: {exc}") from exc
    if options.repeats < 0 or options.warmup < 0:
        raise UsageError("--repeats and --warmup must be 0 or more")
    if options.evaluation is not None:
        options.evaluation.read()  # a bad --eval-text fails before any model is loaded
    _check_thresholds(options)


def _check_amounts(options: PruneOptions) -> None:
    if not options.amounts:
        raise UsageError("--amount needs at least one value", hint="Example: --amount 0.3 or --amount 0.1,0.3,0.5")
    for amount in options.amounts:
        if not 0.0 <= amount <= 1.0 or math.isnan(amount):
            raise UsageError(f"--amount {amount:g} is not a fraction between 0 and 1",
                             hint="Give the share of weights to remove, e.g. --amount 0.3 for 30%.")
        if options.structured_shrink and amount >= 1.0:
            raise UsageError("--structured-shrink cannot remove every channel (--amount 1)",
                             hint="Use an amount below 1.")
    if len(set(options.amounts)) != len(options.amounts):
        raise UsageError("--amount lists a value twice")


def _check_thresholds(options: PruneOptions) -> None:
    if options.max_drift is not None and not options.max_drift >= 0:  # NaN fails too
        raise UsageError(f"--max-drift {options.max_drift:g} must be 0 or more (a max |diff| bound)",
                         hint="Example: --max-drift 0.05")
    if options.min_top1 is not None and not 0.0 <= options.min_top1 <= 1.0:
        raise UsageError(f"--min-top1 {options.min_top1:g} is not a fraction between 0 and 1",
                         hint="Example: --min-top1 0.99 (99% of the top-1 predictions unchanged)")
