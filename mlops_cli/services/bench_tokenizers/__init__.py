"""Benchmark every implementation of one tokenizer on the same texts, and check that they agree.

Workloads: one text per call, one pair per call, batches of pairs padded and truncated to max_length
(longest-first), and decoding. Implementations are timed A/B/A/B (`measure_interleaved`) so machine noise
hits all alike. Before timing, every implementation's output on every text is compared with the
reference implementation's (ids, attention mask, token types): a fast tokenizer that disagrees is no win.

The Rust libraries size their worker pool once per process, so a thread sweep (`thread_sweep=(1, 2)`) runs each
setting in a child process (`python -m mlops_cli.services.bench_tokenizers SETTINGS_JSON`) that prints
its timings as JSON.

The package: `files.py` finds the files behind a TOKENIZER reference, `implementations.py` wraps every
library that can run them, this module benchmarks them: `run(ref, BenchTokenizersOptions) -> report`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from mlops_cli.core.contract import ModelRef, Report, ServiceOptions, StepCallback
from mlops_cli.core.errors import InputError, ResourceError, UsageError
from mlops_cli.core.timing import measure_interleaved
from mlops_cli.services.bench_tokenizers.implementations import (
    IMPLEMENTATION_NAMES,
    Encoded,
    Implementation,
    Skipped,
    TokenizerSuite,
    load_suite,
    quiet_transformers,
    rust_thread_setting,
)

WORKLOADS = ("single", "pair", "batch", "decode")
WORKLOAD_HELP = {
    "single": "one text per call",
    "pair": "one text pair per call",
    "batch": "a batch of pairs per call, padded and truncated to max_length",
    "decode": "ids back to text, one text per call",
}


# ---------------------------------------------------------------- settings and report


@dataclass(frozen=True, kw_only=True)
class BenchTokenizersOptions(ServiceOptions):
    """How to benchmark; the fields of this class (not the inherited ones) are sent as JSON to the child
    processes of a thread sweep."""

    texts_file: str | None = None
    iterations: int = 10
    warmup: int = 2
    batch_size: int = 32
    max_length: int = 64
    thread_sweep: tuple[int, ...] = ()  # --threads: Rust worker threads, one child process per value
    reference: str | None = None
    implementations: tuple[str, ...] = ()
    workloads: tuple[str, ...] = WORKLOADS
    examples: int = 3


@dataclass(frozen=True)
class ImplementationInfo:
    name: str
    library: str
    class_name: str
    backend: str
    adds_special_tokens: bool
    reference: bool
    notes: tuple[str, ...]


@dataclass(frozen=True)
class WorkloadTiming:
    """One implementation on one workload: a pass over the whole corpus, timed `repeats` times."""

    workload: str
    implementation: str
    threads: int
    calls: int  # calls per pass
    texts: int  # texts (or pairs) per pass
    tokens: int  # tokens per pass (the reference's count, so rates compare like with like)
    bytes: int  # UTF-8 bytes per pass
    median_ms: float
    p90_ms: float
    min_ms: float
    spread_pct: float
    repeats: int
    us_per_call: float
    texts_per_s: float
    tokens_per_s: float
    bytes_per_s: float
    speedup: float  # against the slowest implementation on this workload


@dataclass(frozen=True)
class Mismatch:
    workload: str
    index: int
    text: str
    fields: tuple[str, ...]
    reference: Any  # ids (tuple) or decoded text
    candidate: Any


@dataclass(frozen=True)
class Agreement:
    implementation: str
    workload: str
    compared: str  # what was compared: "ids, attention_mask, token_type_ids", "text ids", "decoded text"
    checked: int
    mismatched: int
    examples: tuple[Mismatch, ...]


@dataclass(frozen=True)
class ThreadRun:
    threads: int
    timings: tuple[WorkloadTiming, ...]


@dataclass(frozen=True, kw_only=True)
class TokenizerBenchReport(Report):
    tokenizer: str
    kind: str
    model_type: str
    files: tuple[str, ...]
    corpus: str
    texts: int
    pairs: int
    iterations: int
    warmup: int
    batch_size: int
    max_length: int
    rust_threads: int
    reference: str
    implementations: tuple[ImplementationInfo, ...]
    skipped: tuple[Skipped, ...]
    timings: tuple[WorkloadTiming, ...]
    agreement: tuple[Agreement, ...]
    sweep: tuple[ThreadRun, ...]
    load_average: float | None
    cpu_count: int
    agree: bool  # every implementation agrees with the reference on every workload
    disagreeing: tuple[str, ...]


# ---------------------------------------------------------------- corpus


@dataclass(frozen=True)
class Corpus:
    name: str
    texts: tuple[str, ...]
    pairs: tuple[tuple[str, str], ...]


def load_corpus(path: str | None) -> Corpus:
    """The built-in mixed Chinese/English corpus, or a file: one text per line, or TSV pairs (a<TAB>b).

    With one text per line, pairs are neighbouring lines (line i with line i+1, the last with the first).
    """
    if path is None:
        from mlops_cli.core import zoo

        lines = zoo.corpus_lines()
        return Corpus("built-in zh/en corpus", tuple(lines), _neighbour_pairs(lines))
    source = Path(path)
    try:
        raw = source.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise InputError(f"--texts: no such file: {source}") from exc
    except UnicodeDecodeError as exc:
        raise InputError(f"--texts: {source} is not UTF-8 text", hint="Save the file as UTF-8.") from exc
    lines = [line.rstrip("\r") for line in raw.splitlines() if line.strip()]
    if not lines:
        raise InputError(f"--texts: {source} has no texts", hint="Put one text per line, or a<TAB>b pairs.")
    if not any("\t" in line for line in lines):
        return Corpus(str(source), tuple(lines), _neighbour_pairs(lines))
    pairs = []
    for number, line in enumerate(lines, 1):
        parts = line.split("\t")
        if len(parts) != 2 or not all(p.strip() for p in parts):
            raise InputError(f"--texts: line {number} of {source} is not a TSV pair (two non-empty fields)",
                             hint="Either every line is 'first<TAB>second', or no line has a tab.")
        pairs.append((parts[0], parts[1]))
    return Corpus(str(source), tuple(text for pair in pairs for text in pair), tuple(pairs))


def _neighbour_pairs(lines: Sequence[str]) -> tuple[tuple[str, str], ...]:
    if len(lines) == 1:
        return ((lines[0], lines[0]),)
    return tuple((lines[i], lines[(i + 1) % len(lines)]) for i in range(len(lines)))


# ---------------------------------------------------------------- the benchmark


def run(ref: ModelRef, options: BenchTokenizersOptions) -> TokenizerBenchReport:
    """Check agreement and time every implementation of the tokenizer `ref` names; a thread sweep runs its
    timings in child processes."""
    _validate(options)
    if len(options.thread_sweep) > 1 or (options.thread_sweep and not _can_set_threads_here(options.thread_sweep[0])):
        return _bench_with_children(ref, options)
    with _thread_environment(options.thread_sweep[0] if options.thread_sweep else None):
        return _bench_here(ref, options)


def _validate(settings: BenchTokenizersOptions) -> None:
    for name, value, low in (("--iterations", settings.iterations, 1), ("--warmup", settings.warmup, 0),
                             ("--batch-size", settings.batch_size, 1), ("--max-length", settings.max_length, 8),
                             ("--examples", settings.examples, 0)):
        if value < low:
            raise UsageError(f"{name} must be at least {low} (got {value})")
    if any(n < 1 for n in settings.thread_sweep):
        raise UsageError("--threads values must be at least 1")
    unknown_impls = [name for name in settings.implementations if name not in IMPLEMENTATION_NAMES]
    if unknown_impls:
        raise UsageError(f"unknown implementation(s): {', '.join(unknown_impls)}",
                         hint="Choose from: " + ", ".join(IMPLEMENTATION_NAMES))
    unknown = [w for w in settings.workloads if w not in WORKLOADS]
    if unknown or not settings.workloads:
        raise UsageError(f"unknown workload(s): {', '.join(unknown) or '(none given)'}",
                         hint="Choose from: " + ", ".join(WORKLOADS))


def _bench_here(ref: ModelRef, settings: BenchTokenizersOptions) -> TokenizerBenchReport:
    corpus = load_corpus(settings.texts_file)
    note = settings.on_step
    with tempfile.TemporaryDirectory(prefix="mlops-tok-") as scratch, quiet_transformers():
        note("loading tokenizer implementations")
        suite = load_suite(ref, Path(scratch))
        bench = _Run(settings, corpus, suite)
        note("checking agreement")
        agreement = bench.agreement()
        timings = bench.time_workloads(note)
        return bench.report(agreement, timings, ())


def _bench_with_children(ref: ModelRef, settings: BenchTokenizersOptions) -> TokenizerBenchReport:
    """Agreement here (it does not depend on threads); timings in one fresh child process per setting."""
    corpus = load_corpus(settings.texts_file)
    note = settings.on_step
    with tempfile.TemporaryDirectory(prefix="mlops-tok-") as scratch, quiet_transformers():
        bench = _Run(settings, corpus, load_suite(ref, Path(scratch)))  # bad input fails here, clearly
        note("checking agreement")
        agreement = bench.agreement()
        runs = []
        for threads in settings.thread_sweep:
            note(f"timing with {threads} Rust thread(s) in a child process")
            runs.append(ThreadRun(threads, _child_timings(ref, dataclasses.replace(settings, thread_sweep=(threads,)))))
        return bench.report(agreement, runs[0].timings, tuple(runs), rust_threads=runs[0].threads)


class _Run:
    """One benchmark in this process: the suite, the corpus, and the reference's outputs."""

    def __init__(self, settings: BenchTokenizersOptions, corpus: Corpus, suite: TokenizerSuite) -> None:
        self.settings, self.corpus, self.suite = settings, corpus, suite
        self.reference = suite.get(settings.reference or suite.default_reference)
        self.implementations = [impl for impl in suite.implementations if impl is self.reference
                                or not settings.implementations or impl.name in settings.implementations]
        self.threads = rust_thread_setting()
        self.warnings = list(suite.warnings)
        self.templates = {impl.name: impl.template_ids() for impl in self.implementations}
        pair_specials = self.reference.pair_special_count()
        self.pad_id = _pad_id(self.reference, suite)
        self.workloads = list(settings.workloads)
        if "batch" in self.workloads and self.pad_id is None:
            self.workloads.remove("batch")
            self.warnings.append("the tokenizer has no pad, eos or unk token: the batch workload was skipped")
        for impl in self.implementations:
            impl.configure_batch(settings.max_length, self.pad_id or 0, self.threads, pair_specials,
                                 _padding_side(self.reference))
        self.batches = [self.corpus.pairs[i:i + settings.batch_size]
                        for i in range(0, len(self.corpus.pairs), settings.batch_size)]
        self.ref_single = [self.reference.encoded(self.reference.single(t))[0] for t in corpus.texts]

    # ---- agreement

    def agreement(self) -> tuple[Agreement, ...]:
        results = []
        for impl in self.implementations:
            if impl is self.reference:
                continue
            for workload in self.workloads:
                results.append(self._agree(impl, workload))
        return tuple(results)

    def _agree(self, impl: Implementation, workload: str) -> Agreement:
        full = impl.template and self.reference.template
        ref_tpl, cand_tpl = self.templates[self.reference.name], self.templates[impl.name]
        mismatches: list[Mismatch] = []
        checked = 0
        for index, text, ref_value, cand_value in self._outputs(impl, workload):
            checked += 1
            fields: tuple[str, ...]
            if workload == "decode":
                fields = ("text",) if ref_value != cand_value else ()
            else:
                fields = compare_encoded(ref_value, cand_value, ref_tpl, cand_tpl, full)
                if not full:
                    ref_value, cand_value = ref_value.content(ref_tpl), cand_value.content(cand_tpl)
                else:
                    ref_value, cand_value = ref_value.ids, cand_value.ids
            if fields:
                mismatches.append(Mismatch(workload, index, text, fields, ref_value, cand_value))
        compared = ("decoded text" if workload == "decode" else
                    "ids, attention_mask, token_type_ids" if full else "text ids (no special tokens)")
        return Agreement(impl.name, workload, compared, checked, len(mismatches),
                         tuple(mismatches[:self.settings.examples]))

    def _outputs(self, impl: Implementation, workload: str) -> Iterator[tuple[int, str, Any, Any]]:
        ref = self.reference
        if workload == "single":
            for index, text in enumerate(self.corpus.texts):
                yield index, text, self.ref_single[index], impl.encoded(impl.single(text))[0]
        elif workload == "pair":
            for index, (first, second) in enumerate(self.corpus.pairs):
                yield (index, f"{first} | {second}", ref.encoded(ref.pair(first, second))[0],
                       impl.encoded(impl.pair(first, second))[0])
        elif workload == "batch":
            index = 0
            for batch in self.batches:
                rows = zip(ref.encoded(ref.batch(batch)), impl.encoded(impl.batch(batch)), strict=True)
                for (first, second), (ref_row, cand_row) in zip(batch, rows, strict=True):
                    yield index, f"{first} | {second}", ref_row, cand_row
                    index += 1
        else:
            decode_ids = self._decode_inputs(impl)
            for index, text in enumerate(self.corpus.texts):
                yield index, text, ref.decode(self.ref_single[index].ids), impl.decode(decode_ids[index])

    def _decode_inputs(self, impl: Implementation) -> list[tuple[int, ...]]:
        """Everyone decodes the reference's ids; template-free libraries get them without special tokens."""
        if impl.template:
            return [row.ids for row in self.ref_single]
        template = self.templates[self.reference.name]
        return [row.content(template) for row in self.ref_single]

    # ---- timing

    def time_workloads(self, note: StepCallback) -> tuple[WorkloadTiming, ...]:
        timings: list[WorkloadTiming] = []
        for workload in self.workloads:
            note(f"timing {workload}: {WORKLOAD_HELP[workload]}")
            passes = {impl.name: self._pass(impl, workload) for impl in self.implementations}
            measured = measure_interleaved(passes, warmup=self.settings.warmup, repeats=self.settings.iterations)
            timings.extend(self._figures(workload, measured))
        return tuple(timings)

    def _pass(self, impl: Implementation, workload: str) -> Callable[[], None]:
        texts, pairs, batches = self.corpus.texts, self.corpus.pairs, self.batches
        if workload == "single":
            def run() -> None:
                for text in texts:
                    impl.single(text)
        elif workload == "pair":
            def run() -> None:
                for first, second in pairs:
                    impl.pair(first, second)
        elif workload == "batch":
            def run() -> None:
                for batch in batches:
                    impl.batch(batch)
        else:
            decode_ids = self._decode_inputs(impl)

            def run() -> None:
                for ids in decode_ids:
                    impl.decode(ids)
        return run

    def _figures(self, workload: str, measured: dict[str, Any]) -> list[WorkloadTiming]:
        calls, texts, tokens, size = self._volume(workload)
        slowest = max(timing.median_ms for timing in measured.values())
        figures = []
        for name, timing in measured.items():
            seconds = timing.median_ms / 1000.0
            figures.append(WorkloadTiming(
                workload=workload, implementation=name, threads=self.threads, calls=calls, texts=texts,
                tokens=tokens, bytes=size, median_ms=timing.median_ms, p90_ms=timing.p90_ms, min_ms=timing.min_ms,
                spread_pct=timing.spread_pct, repeats=timing.repeats, us_per_call=timing.median_ms * 1000.0 / calls,
                texts_per_s=texts / seconds, tokens_per_s=tokens / seconds, bytes_per_s=size / seconds,
                speedup=slowest / timing.median_ms))
        return figures

    def _volume(self, workload: str) -> tuple[int, int, int, int]:
        """(calls, texts, tokens, bytes) of one pass, tokens as the reference counts them."""
        ref = self.reference
        pair_bytes = sum(len(a.encode()) + len(b.encode()) for a, b in self.corpus.pairs)
        if workload == "single":
            return (len(self.corpus.texts), len(self.corpus.texts), sum(r.real_tokens for r in self.ref_single),
                    sum(len(t.encode()) for t in self.corpus.texts))
        if workload == "pair":
            tokens = sum(ref.encoded(ref.pair(a, b))[0].real_tokens for a, b in self.corpus.pairs)
            return len(self.corpus.pairs), len(self.corpus.pairs), tokens, pair_bytes
        if workload == "batch":
            tokens = sum(row.real_tokens for batch in self.batches for row in ref.encoded(ref.batch(batch)))
            return len(self.batches), len(self.corpus.pairs), tokens, pair_bytes
        decoded = sum(len(ref.decode(r.ids).encode()) for r in self.ref_single)
        return len(self.ref_single), len(self.ref_single), sum(len(r.ids) for r in self.ref_single), decoded

    # ---- report

    def report(self, agreement: tuple[Agreement, ...], timings: tuple[WorkloadTiming, ...],
               sweep: tuple[ThreadRun, ...], rust_threads: int | None = None) -> TokenizerBenchReport:
        warnings = list(self.warnings)
        load_average, cores = _load_average(), os.cpu_count() or 1
        if load_average is not None and load_average > cores:
            warnings.append(f"load average {load_average:.2f} exceeds the {cores} cores: timings are unreliable")
        files = self.suite.files
        infos = tuple(ImplementationInfo(impl.name, impl.library, impl.class_name, impl.backend, impl.template,
                                         impl is self.reference, tuple(impl.notes))
                      for impl in self.implementations)
        disagreeing = tuple(dict.fromkeys(a.implementation for a in agreement if a.mismatched))
        return TokenizerBenchReport(
            tokenizer=files.reference, kind=files.kind, model_type=self.suite.model_type, files=files.shown,
            corpus=self.corpus.name, texts=len(self.corpus.texts), pairs=len(self.corpus.pairs),
            iterations=self.settings.iterations, warmup=self.settings.warmup, batch_size=self.settings.batch_size,
            max_length=self.settings.max_length, rust_threads=rust_threads or self.threads,
            reference=self.reference.name, implementations=infos, skipped=tuple(self.suite.skipped),
            timings=timings, agreement=agreement, sweep=sweep, warnings=tuple(warnings),
            load_average=load_average, cpu_count=cores, agree=not disagreeing, disagreeing=disagreeing)


def compare_encoded(reference: Encoded, candidate: Encoded, ref_template: frozenset[int],
                    cand_template: frozenset[int], full: bool) -> tuple[str, ...]:
    """Names of the fields where `candidate` differs from `reference` (empty: they agree).

    `full`: both add the model's special tokens, so ids, attention mask and token types are compared as
    the model would see them; a token-type list the reference has and the candidate lacks is a difference.
    Otherwise only the text's own ids are compared (padding and special tokens removed).
    """
    if not full:
        return () if reference.content(ref_template) == candidate.content(cand_template) else ("ids",)
    fields = []
    if reference.ids != candidate.ids:
        fields.append("ids")
    if reference.attention_mask is not None and reference.attention_mask != candidate.attention_mask:
        fields.append("attention_mask" if candidate.attention_mask is not None else "attention_mask missing")
    if reference.token_type_ids is not None and reference.token_type_ids != candidate.token_type_ids:
        fields.append("token_type_ids" if candidate.token_type_ids is not None else "token_type_ids missing")
    return tuple(fields)


def _pad_id(reference: Implementation, suite: TokenizerSuite) -> int | None:
    for impl in (reference, *suite.implementations):
        tokenizer = getattr(impl, "tokenizer", None)
        if tokenizer is not None and getattr(tokenizer, "pad_token_id", None) is not None:
            return int(tokenizer.pad_token_id)
        processor = getattr(impl, "processor", None)
        if processor is not None:
            for piece_id in (processor.pad_id(), processor.eos_id(), processor.unk_id()):
                if piece_id >= 0:
                    return int(piece_id)
    return None


def _padding_side(reference: Implementation) -> str:
    tokenizer = getattr(reference, "tokenizer", None)
    return "left" if getattr(tokenizer, "padding_side", "right") == "left" else "right"


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


# ---------------------------------------------------------------- worker threads


def _can_set_threads_here(threads: int) -> bool:
    """The Rust pool is sized at its first use: only a fresh process (or an unchanged size) can honour it."""
    return threads == 1 or "tokenizers" not in sys.modules or threads == rust_thread_setting()


@contextmanager
def _thread_environment(threads: int | None) -> Iterator[None]:
    """Set TOKENIZERS_PARALLELISM / RAYON_NUM_THREADS for this run, and put them back afterwards."""
    if threads is None:
        yield
        return
    saved = {name: os.environ.get(name) for name in ("TOKENIZERS_PARALLELISM", "RAYON_NUM_THREADS")}
    os.environ.update(_thread_env(threads))
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _thread_env(threads: int) -> dict[str, str]:
    return {"TOKENIZERS_PARALLELISM": "false" if threads == 1 else "true", "RAYON_NUM_THREADS": str(threads)}


def _child_settings(ref: ModelRef, settings: BenchTokenizersOptions) -> str:
    """What a child process needs, as JSON: the reference and this class's own fields (not the loading options
    nor the step callback, which are the parent's)."""
    inherited = {f.name for f in fields(ServiceOptions)}
    own = {f.name: getattr(settings, f.name) for f in fields(settings) if f.name not in inherited}
    return json.dumps({"tokenizer": str(ref), **own})


def _child_timings(ref: ModelRef, settings: BenchTokenizersOptions) -> tuple[WorkloadTiming, ...]:
    """Time one thread setting in a fresh process, so its Rust pool is sized as asked."""
    env = {**os.environ, **_thread_env(settings.thread_sweep[0])}
    command = [sys.executable, "-m", "mlops_cli.services.bench_tokenizers", _child_settings(ref, settings)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        message = (done.stderr.strip().splitlines() or ["no output"])[-1]
        if done.returncode == -9:
            raise ResourceError(f"the benchmark child process for --threads {settings.thread_sweep[0]} was killed",
                                hint="It probably ran out of memory; use a smaller --batch-size or corpus.")
        raise InputError(f"the benchmark child process for --threads {settings.thread_sweep[0]} failed: {message}",
                         hint="Run the same command with a single --threads value to see the full error.")
    rows = json.loads(done.stdout)
    return tuple(WorkloadTiming(**row) for row in rows)


def child_main(argv: Sequence[str]) -> int:
    """Entry point of a sweep's child process: time the workloads, print them as one JSON list."""
    raw = json.loads(argv[0])
    ref = ModelRef.parse(raw.pop("tokenizer"))
    for name in ("thread_sweep", "implementations", "workloads"):
        raw[name] = tuple(raw[name])
    settings = BenchTokenizersOptions(**raw)
    corpus = load_corpus(settings.texts_file)
    with tempfile.TemporaryDirectory(prefix="mlops-tok-") as scratch, quiet_transformers():
        bench = _Run(settings, corpus, load_suite(ref, Path(scratch)))
        timings = bench.time_workloads(settings.on_step)
    rows = [{key: (None if isinstance(value, float) and not math.isfinite(value) else value)
             for key, value in dataclasses.asdict(timing).items()} for timing in timings]
    sys.stdout.write(json.dumps(rows) + "\n")
    return 0

