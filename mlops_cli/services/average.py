"""`mlops average CKPT... -o OUT`: checkpoint averaging (model soups), weighted averages and EMA.

Every method is computed in float64, as it is defined, and cast back to each tensor's dtype; each is a weighted
sum Σ cᵢ·xᵢ, whose shares cᵢ the report lists:
- uniform: Σxᵢ / N;
- weighted (`weights`): cᵢ = wᵢ / Σw. Weights that do not sum to 1 are normalised, and the report says so
  (a warning): the result is always an average, never a scaled model;
- EMA over the ordered list (`ema` = d): ema = d·ema + (1−d)·x from the first checkpoint on, which unrolls
  to c₀ = d^(N−1) and cᵢ = (1−d)·d^(N−1−i).

Integer tensors (num_batches_tracked, step counters, position ids) cannot be averaged: they are copied from the
last checkpoint. Float buffers (BatchNorm running_mean/running_var) are averaged, or copied from the last with
`buffers="last"`. Each of them is listed in the report, with whether the inputs disagreed on it.

Streaming: inputs are read range by range (core/weight_set.py), the sum of one range is written before
the next is read, and a safetensors output is written tensor by tensor behind a header computed up front, so the
peak memory is a few ranges, not a model (the report measures it). torch.save cannot write that way: a torch
output is collected first (the report says `streamed: false`). The output is written like the last input
(safetensors, torch file, sharded index, Hugging Face folder with its config and tokenizer, weights folder with
its mlops.json), atomically, never over an existing path without `force`.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from mlops_cli.core.contract import ModelRef, OutputOptions, Report
from mlops_cli.core.errors import InputError, UsageError
from mlops_cli.core.inputs import InputRequest
from mlops_cli.core.safetensors_file import CHUNK_ELEMENTS
from mlops_cli.core.weight_set import TensorMeta, WeightSet, open_weights

BUFFER_MODES = ("average", "last")
# Float buffers by name (a weights file does not say which tensors are buffers): BatchNorm's running statistics.
FLOAT_BUFFER_SUFFIXES = ("running_mean", "running_var")
WEIGHT_SUM_SLACK = 1e-6  # weights summing to 1 within this are taken as they are


@dataclass(frozen=True, kw_only=True)
class AverageOptions(OutputOptions):
    """Average MODEL (given to `run`) with `others`, in that order (EMA: the first initialises)."""

    others: tuple[ModelRef, ...]
    weights: tuple[float, ...] | None = None
    ema: float | None = None  # decay d
    buffers: str = "average"  # float buffers: average, or copy from the last checkpoint
    evaluate: bool = False  # run the parity engine: the average against each input
    inputs: InputRequest = field(default_factory=InputRequest)
    device: str = "cpu"


@dataclass(frozen=True)
class KeptTensor:
    """An integer tensor or float buffer, and what was done with it."""

    name: str
    dtype: str
    kind: str  # integer, buffer
    handling: str  # copied from the last checkpoint, averaged
    differs: bool  # the inputs do not all hold the same values


@dataclass(frozen=True)
class InputDrift:
    """How far the averaged model's outputs are from one input's (over every input set and output)."""

    checkpoint: str
    coefficient: float
    max_abs_diff: float | None
    mean_abs_diff: float | None
    min_cosine: float | None
    top1_agreement: float | None
    problem: str | None = None


@dataclass(frozen=True, kw_only=True)
class AverageReport(Report):
    inputs: tuple[str, ...]
    method: str  # uniform, weighted, ema
    coefficients: tuple[float, ...]  # each input's share of every averaged tensor
    decay: float | None
    output: str
    output_kind: str
    tensors: int
    averaged: int
    copied: int
    kept: tuple[KeptTensor, ...]  # integer tensors and float buffers
    elements: int
    largest_tensor_bytes: int
    output_bytes: int
    streamed: bool  # written tensor by tensor (safetensors), or collected first (torch.save)
    peak_rss_growth_bytes: int | None  # measured while averaging and writing (None: not measurable here)
    seconds: float
    drift: tuple[InputDrift, ...] = ()
    drift_inputs: str | None = None


def run(ref: ModelRef, options: AverageOptions) -> AverageReport:
    """Average MODEL and `options.others` tensor by tensor into `options.output`."""
    import time

    import torch  # noqa: F401  imported before measuring: its import is not the averaging's memory or time

    from mlops_cli.core.io import check_output
    from mlops_cli.core.timing import PeakMemory

    refs = (ref, *options.others)
    method, coefficients, warnings = coefficients_for(len(refs), options.weights, options.ema)
    if options.buffers not in BUFFER_MODES:
        raise UsageError(f"--buffers {options.buffers!r} is not one of {', '.join(BUFFER_MODES)}")
    sources = [source for item in refs for source in item.sources]
    check_output(options.output, options.force, sources)  # fail fast, before reading anything
    started = time.perf_counter()
    with contextlib.ExitStack() as stack, PeakMemory() as memory:
        options.on_step("reading headers")
        sets = [stack.enter_context(open_weights(item, options.load)) for item in refs]
        check_compatible(sets)
        options.on_step("averaging")
        averager = _Averager(sets, method, coefficients, options.ema, options.buffers)
        written, streamed = _write_output(averager, options, sources)
        kept = averager.kept()
    seconds = time.perf_counter() - started
    last = sets[-1]
    warnings += [w for s in sets for w in s.warnings]
    if last.dropped_entries:
        warnings.append(f"training-checkpoint entries not carried over (they are not weights): "
                        f"{', '.join(last.dropped_entries)}")
    report = AverageReport(
        warnings=tuple(warnings), inputs=tuple(s.reference for s in sets), method=method,
        coefficients=coefficients, decay=options.ema, output=str(options.output), output_kind=last.kind,
        tensors=len(last.tensors), averaged=len(last.tensors) - sum(k.handling != "averaged" for k in kept),
        copied=sum(k.handling != "averaged" for k in kept), kept=kept,
        elements=sum(m.numel for m in last.tensors.values()),
        largest_tensor_bytes=max((_nbytes(m) for m in last.tensors.values()), default=0),
        output_bytes=written, streamed=streamed, peak_rss_growth_bytes=memory.growth_bytes, seconds=seconds)
    if options.evaluate:
        options.on_step("evaluating")
        report = _with_drift(report, refs, options)
    return report


def coefficients_for(count: int, weights: tuple[float, ...] | None,
                     ema: float | None) -> tuple[str, tuple[float, ...], list[str]]:
    """(method, each checkpoint's share, warnings) for N checkpoints."""
    if count < 2:
        raise UsageError("average needs at least two checkpoints", hint="Give two or more CKPT arguments.")
    if weights is not None and ema is not None:
        raise UsageError("--weights and --ema cannot be combined", hint="Use one of them.")
    if ema is not None:
        if not 0 <= ema < 1:
            raise UsageError(f"--ema {ema:g} must be in [0, 1)", hint="Typical decays: 0.9, 0.99, 0.999.")
        shares = [(1 - ema) * ema ** (count - 1 - index) for index in range(count)]
        shares[0] = ema ** (count - 1)
        return "ema", tuple(shares), []
    if weights is None:
        return "uniform", tuple(1 / count for _ in range(count)), []
    if len(weights) != count:
        raise UsageError(f"--weights has {len(weights)} values for {count} checkpoints",
                         hint="Give one weight per checkpoint, in the same order.")
    if any(w < 0 or not math.isfinite(w) for w in weights) or sum(weights) <= 0:
        raise UsageError("--weights must be non-negative numbers with a positive sum")
    total = sum(weights)
    warnings = [] if abs(total - 1) <= WEIGHT_SUM_SLACK else [
        f"--weights sum to {total:g}, not 1: normalised to {', '.join(f'{w / total:.4g}' for w in weights)}"]
    return "weighted", tuple(w / total for w in weights), warnings


def check_compatible(sets: list[WeightSet]) -> None:
    """Same names, shapes and dtypes everywhere, else InputError (exit 3) naming the offenders."""
    first = sets[0]
    problems = []
    for other in sets[1:]:
        missing = [n for n in first.tensors if n not in other.tensors]
        extra = [n for n in other.tensors if n not in first.tensors]
        differing = [f"{n} {_describe(first.tensors[n])} vs {_describe(other.tensors[n])}"
                     for n in first.tensors if n in other.tensors
                     and _describe(first.tensors[n]) != _describe(other.tensors[n])]
        for names, what in ((missing, f"missing from {other.reference}"), (extra, f"only in {other.reference}"),
                            (differing, f"with another shape or dtype in {other.reference}")):
            if names:
                problems.append(f"{len(names)} tensor(s) {what}: {_first(names)}")
    if problems:
        raise InputError(f"the checkpoints do not match {first.reference}: " + "; ".join(problems),
                         hint="Average checkpoints of one architecture (--strip-prefix / --key align names).")


def _describe(meta: TensorMeta) -> str:
    return f"{meta.dtype}{list(meta.shape)}"


def _first(names: list[str], shown: int = 5) -> str:
    return ", ".join(names[:shown]) + (f" (+{len(names) - shown} more)" if len(names) > shown else "")


def _nbytes(meta: TensorMeta) -> int:
    return meta.numel * _torch_dtype(meta.dtype).itemsize if meta.numel else 0


def _torch_dtype(name: str) -> Any:
    from mlops_cli.core.safetensors_file import torch_dtype

    return torch_dtype(name)


class _Averager:
    """Produces each output tensor range by range: the weighted sum of the inputs, or the last input's values."""

    def __init__(self, sets: list[WeightSet], method: str, coefficients: tuple[float, ...], decay: float | None,
                 buffers: str) -> None:
        self.sets, self.method, self.coefficients, self.buffers = sets, method, coefficients, buffers
        self.decay = decay or 0.0
        self.last = sets[-1]
        self._kept: dict[str, KeptTensor] = {}

    def is_copied(self, meta: TensorMeta) -> bool:
        return not meta.is_float or (self.buffers == "last" and is_float_buffer(meta.name))

    def chunks(self, name: str) -> Iterator[Any]:
        """The output tensor `name`, flattened, in ranges of CHUNK_ELEMENTS (its own dtype)."""
        import torch

        meta = self.last.tensors[name]
        copied = self.is_copied(meta)
        if not meta.is_float or is_float_buffer(name):
            self._kept[name] = KeptTensor(name, meta.dtype, "buffer" if meta.is_float else "integer",
                                          "copied from the last checkpoint" if copied else "averaged",
                                          self._differs(name))
        for start in range(0, meta.numel, CHUNK_ELEMENTS):
            stop = min(start + CHUNK_ELEMENTS, meta.numel)
            if copied:
                yield self.last.read(name, start, stop)
                continue
            ranges = (weights.read(name, start, stop).to(torch.float64) for weights in self.sets)
            yield self._combine(ranges).to(_torch_dtype(meta.dtype))

    def _combine(self, ranges: Iterator[Any]) -> Any:
        """One range of the result, from the same range of every input, computed as the method is defined
        (a sum divided by N; Σ cᵢ·xᵢ; the EMA recurrence), so it rounds the way a hand computation does."""
        total = next(ranges).clone()
        if self.method == "ema":
            for values in ranges:
                total.mul_(self.decay).add_(values, alpha=1 - self.decay)
        elif self.method == "uniform":
            for values in ranges:
                total.add_(values)
            total.div_(len(self.sets))
        else:
            total.mul_(self.coefficients[0])
            for share, values in zip(self.coefficients[1:], ranges, strict=True):
                total.add_(values, alpha=share)
        return total

    def full(self, name: str) -> Any:
        import torch

        meta = self.last.tensors[name]
        parts = list(self.chunks(name))
        flat = torch.cat(parts) if parts else torch.empty(0, dtype=_torch_dtype(meta.dtype))
        return flat.reshape(meta.shape)

    def _differs(self, name: str) -> bool:
        import torch

        numel = self.last.tensors[name].numel
        for start in range(0, numel, CHUNK_ELEMENTS):
            stop = min(start + CHUNK_ELEMENTS, numel)
            reference = self.last.read(name, start, stop)
            if any(not torch.equal(s.read(name, start, stop), reference) for s in self.sets[:-1]):
                return True
        return False

    def kept(self) -> tuple[KeptTensor, ...]:
        return tuple(self._kept[name] for name in self.last.tensors if name in self._kept)


def is_float_buffer(name: str) -> bool:
    return name.rpartition(".")[2] in FLOAT_BUFFER_SUFFIXES


# ---------------------------------------------------------------- writing like the last input


def _write_output(averager: _Averager, options: AverageOptions, sources: list[Path]) -> tuple[int, bool]:
    """Write the average like the last input; (bytes written, streamed?)."""
    from mlops_cli.core.io import atomic_dir, atomic_file

    last = averager.last
    shard_names = list(last.shards)
    if last.kind in ("safetensors", "torch"):
        with atomic_file(options.output, options.force, sources) as temp:
            streamed = _write_shard(averager, shard_names[0], temp)
        return Path(options.output).stat().st_size, streamed
    with atomic_dir(options.output, options.force, sources) as folder:
        if last.kind in ("hf-folder", "weights-folder"):
            from mlops_cli.core.io import copy_extras

            copy_extras(last.root, folder, rewritten=())
        streamed = all([_write_shard(averager, name, folder / name) for name in shard_names])
        if last.index_file:
            _write_index(last, folder / last.index_file)
    return sum(p.stat().st_size for p in Path(options.output).rglob("*") if p.is_file()), streamed


def _write_shard(averager: _Averager, shard: str, path: Path) -> bool:
    """One weights file of the output, holding what the same file of the last input holds; True if streamed."""
    names = [name for name, meta in averager.last.tensors.items() if meta.shard == shard]
    if averager.last.is_safetensors(shard):
        write_safetensors_stream(path, {n: averager.last.tensors[n] for n in names}, averager.last.metadata,
                                 averager.chunks)
        return True
    _save_torch_state(averager, names, path)
    return False


def write_safetensors_stream(path: Path, tensors: dict[str, TensorMeta], metadata: dict[str, str],
                             chunks: Callable[[str], Iterator[Any]]) -> None:
    """A safetensors file written tensor by tensor: the header first (computed from names, dtypes and shapes),
    then each tensor's ranges as `chunks(name)` yields them, in the order safetensors' own writer uses."""
    import torch

    from mlops_cli.core.safetensors_file import FROM_TORCH, write_tensors

    def write_tensor(name: str, handle: BinaryIO) -> None:
        for chunk in chunks(name):
            handle.write(memoryview(chunk.contiguous().view(torch.uint8).numpy()))

    with open(path, "wb") as out:
        write_tensors(out, {n: (FROM_TORCH[m.dtype], m.shape) for n, m in tensors.items()}, metadata, write_tensor)


def _save_torch_state(averager: _Averager, names: list[str], path: Path) -> None:
    """torch.save needs the whole state_dict: collected here (ties kept as ties), under the input's key if any."""
    import torch

    from mlops_cli.core.io import make_torch_zip_deterministic

    state: dict[str, Any] = {}
    for name in names:
        twin = averager.last.tensors[name].tied_to
        state[name] = state[twin] if twin in state else averager.full(name)
    content = {averager.last.state_key: state} if averager.last.state_key else state
    with open(path, "wb") as handle:
        torch.save(content, handle)
    make_torch_zip_deterministic(path)


def _write_index(last: WeightSet, path: Path) -> None:
    total = sum(_nbytes(meta) for meta in last.tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": {n: m.shard for n, m in sorted(last.tensors.items())}}
    path.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


# ---------------------------------------------------------------- --eval


def _with_drift(report: AverageReport, refs: tuple[ModelRef, ...], options: AverageOptions) -> AverageReport:
    """The averaged model against each input, through the parity engine on one input plan."""
    import dataclasses

    from mlops_cli.core.inputs import plan_inputs
    from mlops_cli.core.loading import load_model
    from mlops_cli.core.parity import check_parity
    from mlops_cli.core.runtimes import resolve_device, runner_for

    device = resolve_device(options.device)
    averaged = load_model(ModelRef.parse(str(options.output)), options.load)
    plan = plan_inputs(averaged, options.inputs)
    candidate = runner_for(averaged, device)
    drift = []
    for ref, share in zip(refs, report.coefficients, strict=True):
        parity = check_parity(runner_for(load_model(ref, options.load), device), candidate, list(plan.sets),
                              time_runs=False, check_determinism=False)
        drift.append(_drift_of(ref.text, share, parity))
    return dataclasses.replace(report, drift=tuple(drift), drift_inputs=plan.source)


def _drift_of(name: str, share: float, parity: Any) -> InputDrift:
    diffs = [d for shape in parity.shapes for d in shape.outputs]
    problem = next((s.error for s in parity.shapes if s.error and not s.outputs), None)

    def pick(values: list[float | None], choose: Callable[[list[float]], float]) -> float | None:
        present = [v for v in values if v is not None]
        return choose(present) if present else None

    mean = pick([d.mean_abs for d in diffs], lambda v: sum(v) / len(v))
    return InputDrift(name, share, pick([d.max_abs for d in diffs], max), mean,
                      pick([d.cosine for d in diffs], min), pick([d.top1_agreement for d in diffs], min), problem)
