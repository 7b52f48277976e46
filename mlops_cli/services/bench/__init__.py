"""`mlops bench MODEL`: one model across runtimes, precisions and batch sizes, with timing you can trust.

Every runtime runs on the same inputs. A runtime that needs an artefact gets one exported into a temporary folder
and verified by the export service; in-process variants (torch.compile, fp16/bf16, dynamic int8) and a given
artefact benched `--against` its original are checked with the parity engine. A runtime whose outputs differ is
reported, never timed. Timing is interleaved with eager at every shape (core/timing), so each speed-up comes with
a bootstrap interval, and the reasons not to trust the figures (a busy machine, oversubscription, frequency
scaling, noisy samples) end up in the report's warnings.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from mlops_cli.core.contract import LoadOptions, ModelRef, Report, ServiceOptions
from mlops_cli.core.errors import ResourceError, UsageError
from mlops_cli.core.inputs import InputPlan, InputRequest
from mlops_cli.core.loading import LoadedModel
from mlops_cli.services.bench.candidates import (
    ARTEFACT_RUNTIME,
    COMPILE,
    DTYPES,
    EAGER,
    EXPORTED_RUNTIMES,
    HALF,
    RUNTIMES,
    Candidate,
    artefact_candidate,
    compiled,
    eager_variant,
    torch_candidate,
)
from mlops_cli.services.bench.sweep import (
    DIFFERS,
    OUT_OF_MEMORY,
    SKIPPED,
    TIMED,
    BenchRow,
    SweepSettings,
    guarded,
    time_sweep,
)

__all__ = ["DTYPES", "RUNTIMES", "BenchOptions", "BenchReport", "BenchRow", "run"]

BASELINE = f"{EAGER} fp32"
DEFAULT_RUNTIMES = (EAGER, "onnxruntime")
CPU_HALF_NOTE = ("{dtype} on CPU: half-precision compute on CPU is not representative (often 10-100x slower than "
                 "fp32 on CPUs without half units); benched because it was asked for")


@dataclass(frozen=True, kw_only=True)
class BenchOptions(ServiceOptions):
    """What `mlops bench` was asked to run; empty tuples mean the defaults described on each field."""

    runtimes: tuple[str, ...] = ()  # empty: eager and onnxruntime (a torch model), the artefact's own runtime
    batches: tuple[int, ...] = (1,)
    seq_lens: tuple[int, ...] = ()  # empty: the model's default sequence length (text models)
    dtypes: tuple[str, ...] = ("fp32",)
    device: str = "cpu"
    threads: int | None = None  # None: the free cores (core.timing.default_threads)
    repeats: int = 20
    warmup: int = 3
    against: ModelRef | None = None  # the original of an artefact given as MODEL
    inputs: tuple[str, ...] = ()  # --input specs
    seed: int = 0
    plot: Path | None = None
    force: bool = False  # overwrite an existing plot file


@dataclass(frozen=True, kw_only=True)
class BenchReport(Report):
    model: str
    against: str | None
    device: str
    threads: int
    threads_source: str  # "--threads" or why this many
    repeats: int
    warmup: int
    input_source: str
    baseline: str | None  # what speed-ups are relative to (eager fp32), None when benched alone
    rows: tuple[BenchRow, ...]
    notes: tuple[str, ...] = ()
    plot: str | None = None
    passed: bool = True  # at least one row was timed


def run(ref: ModelRef, options: BenchOptions) -> BenchReport:
    """Load, prepare every candidate (export, compile, cast, quantise), verify them, then sweep the shapes."""
    from mlops_cli.core.io import check_output
    from mlops_cli.core.loading import load_model, placement_for
    from mlops_cli.core.runtimes import gather_on_cpu, run_device
    from mlops_cli.core.timing import default_threads, trust_warnings
    from mlops_cli.services.bench.plot import check_plot_path, write_plot

    check_options(options)
    if options.plot is not None:
        check_plot_path(options.plot)
        check_output(options.plot, options.force, [*ref.sources, *(options.against.sources if options.against else ())])
    threads = options.threads or default_threads()
    options.on_step("loading")
    model = load_model(ref, options.load)
    gather_on_cpu(model, "bench")  # each runtime it compares gets the whole model
    device = run_device(model, options.device)  # a gathered model stays on CPU for --device auto
    original = load_model(options.against, placement_for(options.against, options.load)) if options.against else None
    if original is not None:
        gather_on_cpu(original, "bench")  # its eager runtime is moved to `device`
    notes: list[str] = []
    with torch_threads(threads):
        plan = plan_inputs_for(original or model, options)
        with tempfile.TemporaryDirectory(prefix="mlops-bench-") as folder:
            candidates, rows = prepare(ref, model, original, options, device, threads, Path(folder), notes)
            options.on_step("verifying")
            candidates, differing = verify(candidates, plan)
            rows += differing
            options.on_step("timing")
            baseline = BASELINE if any(c.label == BASELINE for c in candidates) else None
            rows += time_sweep(candidates, plan, SweepSettings(
                options.batches, sequence_lengths(plan, options), options.repeats, options.warmup, device, baseline))
    timed = [row for row in rows if row.status == TIMED]
    if not timed and any(row.status == OUT_OF_MEMORY for row in rows):
        raise ResourceError("out of memory: no runtime could run even the smallest batch",
                            hint="Use a smaller --batch/--seq-len, fewer runtimes, or a machine with more memory.")
    plot = None
    if options.plot is not None and timed:
        plot = str(write_plot(options.plot, rows, f"mlops bench {ref} ({device}, {threads} thread(s))",
                              options.force))
    warnings = [*model.warnings, *(original.warnings if original else ()),
                *trust_warnings(threads if device == "cpu" else None, (r.latency for r in timed if r.latency))]
    return BenchReport(
        model=str(ref), against=str(options.against) if options.against else None, device=device, threads=threads,
        threads_source="--threads" if options.threads else "default: the usable cores not busy with other work",
        repeats=options.repeats, warmup=options.warmup, input_source=plan.source, baseline=baseline,
        rows=tuple(rows), notes=tuple(notes), plot=plot, passed=bool(timed), warnings=tuple(warnings))


def check_options(options: BenchOptions) -> None:
    """Unknown names and impossible sizes are usage errors, before anything is loaded."""
    unknown = [r for r in options.runtimes if r not in RUNTIMES] + [d for d in options.dtypes if d not in DTYPES]
    if unknown:
        raise UsageError(f"unknown runtime or dtype: {', '.join(unknown)}",
                         hint=f"Runtimes: {', '.join(RUNTIMES)}; dtypes: {', '.join(DTYPES)}.")
    if not options.batches or min(options.batches) < 1 or (options.seq_lens and min(options.seq_lens) < 1):
        raise UsageError("--batch and --seq-len take positive whole numbers, e.g. --batch 1,8,32")
    if options.repeats < 1 or options.warmup < 0:
        raise UsageError("--repeats must be at least 1 and --warmup at least 0",
                         hint="Use --repeats 3 or more: fewer samples give no interval on a speed-up.")


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """torch's intra-op threads pinned for the run (ONNX Runtime sessions get the same count), then restored."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def plan_inputs_for(model: LoadedModel, options: BenchOptions) -> InputPlan:
    """One input plan for every runtime, at the smallest sizes asked for (the parity check runs there)."""
    from mlops_cli.core.inputs import plan_inputs

    request = InputRequest(specs=options.inputs, seed=options.seed, batch_size=min(options.batches),
                           seq_len=min(options.seq_lens) if options.seq_lens else None)
    return plan_inputs(model, request)


def sequence_lengths(plan: InputPlan, options: BenchOptions) -> tuple[int | None, ...]:
    """The sequence lengths swept: as asked, else the model's default; (None,) for inputs without one."""
    if options.seq_lens:
        return tuple(sorted(set(options.seq_lens)))
    return (plan.example.sizes.get("sequence"),)


def prepare(ref: ModelRef, model: LoadedModel, original: LoadedModel | None, options: BenchOptions, device: str,
            threads: int, folder: Path, notes: list[str]) -> tuple[list[Candidate], list[BenchRow]]:
    """The candidates to time, and rows for the runtimes that could not be prepared or are skipped."""
    artefact_runtime = ARTEFACT_RUNTIME.get(model.kind)
    if artefact_runtime is not None:
        return prepare_artefact(model, original, artefact_runtime, options, device, threads, notes)
    if original is not None:
        raise UsageError("--against compares an exported artefact (.onnx, .pt2, TorchScript) with its original; "
                         f"{ref} is not one", hint="Give the artefact as MODEL and the original with --against.")
    candidates: list[Candidate] = []
    rows: list[BenchRow] = []
    runtimes = list(dict.fromkeys((EAGER, *(options.runtimes or DEFAULT_RUNTIMES))))
    if EAGER not in options.runtimes and options.runtimes:
        notes.append("eager fp32 is benched too: it is the baseline of every speed-up")
    dtypes = list(dict.fromkeys(("fp32", *options.dtypes))) if EAGER in runtimes else list(options.dtypes)
    exported = [r for r in runtimes if r in EXPORTED_RUNTIMES]
    lower = [d for d in dtypes if d != "fp32"]
    if exported and lower:
        notes.append(f"{', '.join(exported)} run{'s' * (len(exported) == 1)} the exported fp32 graph; "
                     f"{', '.join(lower)} appl{'ies' if len(lower) == 1 else 'y'} to eager and compile")
    for runtime in runtimes:
        for dtype in (["fp32"] if runtime in EXPORTED_RUNTIMES else dtypes):
            skip = skip_reason(runtime, dtype, device)
            if skip:
                rows.append(BenchRow(runtime, dtype, None, None, SKIPPED, note=skip))
                continue
            options.on_step(f"preparing {runtime} {dtype}")
            built = guarded(partial(build_candidate, ref, model, runtime, dtype, options, device, threads, folder),
                            runtime, dtype)
            if isinstance(built, Candidate):
                candidates.append(built)
            else:
                rows.append(built)
    notes += [CPU_HALF_NOTE.format(dtype=d) for d in dtypes if d in HALF and device == "cpu"]
    if COMPILE in runtimes:
        notes.append("compile: compilation happens in the untimed first calls at each size (not in the timings)")
    return candidates, rows


def skip_reason(runtime: str, dtype: str, device: str) -> str | None:
    """Why a runtime/precision pair is not benched, or None."""
    if dtype == "int8" and runtime == COMPILE:
        return "torch dynamic int8 layers run eagerly; bench int8 with the eager runtime"
    if dtype == "int8" and device != "cpu":
        return "torch dynamic int8 runs on CPU only"
    return None


def build_candidate(ref: ModelRef, model: LoadedModel, runtime: str, dtype: str, options: BenchOptions,
                    device: str, threads: int, folder: Path) -> Candidate | BenchRow:
    """One runtime at one precision, ready to time (or a row saying the export's verification failed)."""
    from mlops_cli.core.loading import load_model
    from mlops_cli.services.bench.exports import export_artefact

    if runtime in (EAGER, COMPILE):
        module = eager_variant(model, dtype, device)
        return torch_candidate(runtime, dtype, model, compiled(module, device) if runtime == COMPILE else module,
                               device)
    exported = export_artefact(runtime, ref, options.load, options.inputs, device, folder)
    if not exported.passed:
        return BenchRow(runtime, dtype, None, None, DIFFERS, note=f"export verification failed: {exported.verdict}")
    artefact = load_model(str(exported.path), LoadOptions(trust_code=True))  # written just now, by us
    candidate = artefact_candidate(artefact, device, threads)
    candidate.preset = None
    return candidate


def prepare_artefact(model: LoadedModel, original: LoadedModel | None, runtime: str, options: BenchOptions,
                     device: str, threads: int, notes: list[str]) -> tuple[list[Candidate], list[BenchRow]]:
    """An existing artefact: its own runtime, alone or against its original (eager fp32, the baseline)."""
    allowed = {runtime, EAGER} if original is not None else {runtime}
    if set(options.runtimes) - allowed:
        raise UsageError(f"{model.reference} runs on {runtime} only (plus eager with --against ORIGINAL); "
                         f"--runtime asked for {', '.join(sorted(set(options.runtimes) - allowed))}",
                         hint="Bench the original model to export it to other runtimes.")
    if set(options.dtypes) - {"fp32"}:
        notes.append("--dtype applies to eager models; the artefact runs at the precision it was exported in")
    from mlops_cli.core.precision import auto_precision

    if original is not None and (original.module is None or original.kind in ARTEFACT_RUNTIME):
        raise UsageError(f"--against {original.reference}: the original must be a PyTorch model (eager), not an "
                         "exported artefact", hint="Give the checkpoint, folder or builtin:NAME it was exported from.")
    candidate = artefact_candidate(model, device, threads)
    if original is None:
        notes.append("benched alone: nothing to verify it against or compare it with (use --against ORIGINAL)")
        return [candidate], []
    candidate.preset = auto_precision(model, original)[0]  # an int8 or fp16 artefact is checked as one
    eager = torch_candidate(EAGER, "fp32", original, eager_variant(original, "fp32", device), device)
    return [eager, candidate], []


def verify(candidates: list[Candidate], plan: InputPlan) -> tuple[list[Candidate], list[BenchRow]]:
    """Check every in-process candidate (and a given artefact) against eager fp32 with the parity engine; those
    whose outputs differ get a row instead of a timing. Exported artefacts were verified by their exporter."""
    from mlops_cli.core.parity import Tolerances, check_parity

    baseline = next((c for c in candidates if c.label == BASELINE), None)
    if baseline is None:
        return candidates, []
    reference = baseline.make_runner()
    kept: list[Candidate] = []
    rows: list[BenchRow] = []
    for candidate in candidates:
        if candidate is baseline or candidate.preset is None:
            kept.append(candidate)
            continue
        report = check_parity(reference, candidate.make_runner(), list(plan.sets),
                              Tolerances.for_preset(candidate.preset), time_runs=False, check_determinism=False)
        if report.passed:
            kept.append(candidate)
        else:
            rows.append(BenchRow(candidate.runtime, candidate.dtype, None, None, DIFFERS, note=report.verdict))
    return kept, rows
