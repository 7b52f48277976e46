"""Tables for `mlops bench-tokenizers`."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from rich.console import RenderableType
from rich.text import Text

from mlops_cli.render import key_values, note, table, verdict
from mlops_cli.services.bench_tokenizers import WORKLOAD_HELP, Mismatch, TokenizerBenchReport

SHOWN_IDS = 8
SHOWN_CHARS = 48


def bench_tokenizers_tables(report: TokenizerBenchReport) -> Iterator[RenderableType]:
    yield _summary(report)
    yield table("Implementations", ("name", "class", "library", "backend", "template"), (
        (Text(f"{i.name} (reference)", style="bold") if i.reference else i.name, i.class_name, i.library,
         i.backend, "applied" if i.adds_special_tokens else "none: compared on text ids")
        for i in report.implementations))
    for info in report.implementations:
        for line in info.notes:
            yield note(f"  {info.name}: {line}")
    if report.skipped:
        yield table("Skipped", ("name", "reason"), ((s.name, s.reason) for s in report.skipped))
    if report.timings:
        yield _speed_table(report)
    if len(report.sweep) > 1:
        yield _sweep_table(report)
    if report.agreement:
        yield table(f"Agreement with {report.reference}",
                    ("implementation", "workload", "compared", "checked", "mismatched"),
                    ((a.implementation, a.workload, a.compared, a.checked,
                      Text(str(a.mismatched), style="bold red") if a.mismatched else "0") for a in report.agreement),
                    numeric=("checked", "mismatched"))
    examples = [(a.implementation, m) for a in report.agreement for m in a.examples]
    if examples:
        yield table("First mismatches", ("implementation", "workload", "#", "text", "differs in",
                                         report.reference, "candidate"),
                    (_mismatch_row(name, m) for name, m in examples))
    yield note("Figures: the median of the timed passes over the whole corpus; spread = (p90 - min) / median. "
               "tokens/s counts the reference's tokens, texts/s counts a pair as one.")
    yield _verdict(report)


def _summary(report: TokenizerBenchReport) -> RenderableType:
    load = "-" if report.load_average is None else f"{report.load_average:.2f} on {report.cpu_count} cores"
    return key_values(f"Tokenizer: {report.tokenizer}", [
        ("kind", f"{report.kind} ({report.model_type})"),
        ("files", "\n".join(report.files) or "-"),
        ("corpus", f"{report.corpus}: {report.texts} texts, {report.pairs} pairs"),
        ("reference", report.reference),
        ("timing", f"{report.warmup} warm-up + {report.iterations} timed passes per workload, interleaved"),
        ("batch", f"{report.batch_size} pairs, padded and truncated to {report.max_length} tokens (longest first)"),
        ("Rust threads", str(report.rust_threads) if len(report.sweep) <= 1
         else ", ".join(str(run.threads) for run in report.sweep) + " (one child process each)"),
        ("load average", load),
    ])


def _speed_table(report: TokenizerBenchReport) -> RenderableType:
    rows, previous = [], None
    for timing in report.timings:
        rows.append((timing.workload if timing.workload != previous else "", timing.implementation,
                     fmt_us(timing.us_per_call), fmt_rate(timing.texts_per_s), fmt_rate(timing.tokens_per_s),
                     f"{timing.bytes_per_s / 1e6:.2f}", f"{timing.spread_pct:.0f}%", _speedup(timing.speedup)))
        previous = timing.workload
    workloads = dict.fromkeys(t.workload for t in report.timings)
    caption = "; ".join(f"{w}: {WORKLOAD_HELP[w]}" for w in workloads)
    numeric = ("µs/call", "texts/s", "tokens/s", "MB/s", "spread", "speed-up")
    return table(f"Speed ({report.rust_threads} Rust thread(s))", ("workload", "implementation", *numeric), rows,
                 numeric=numeric, caption=caption)


def _sweep_table(report: TokenizerBenchReport) -> RenderableType:
    """Batch throughput per worker-thread count (the only workload the Rust pool parallelises)."""
    base = {t.implementation: t for t in report.sweep[0].timings if t.workload == "batch"}
    rows = []
    for run in report.sweep:
        for timing in run.timings:
            if timing.workload != "batch":
                continue
            first = base.get(timing.implementation)
            gain = first.median_ms / timing.median_ms if first else None
            rows.append((run.threads, timing.implementation, fmt_us(timing.us_per_call),
                         fmt_rate(timing.texts_per_s), f"{timing.spread_pct:.0f}%",
                         "-" if gain is None else f"{gain:.2f}x"))
    return table("Thread sweep: batch workload", ("threads", "implementation", "µs/call", "texts/s", "spread",
                                                  f"vs {report.sweep[0].threads} thread(s)"),
                 rows, numeric=("threads", "µs/call", "texts/s", "spread", f"vs {report.sweep[0].threads} thread(s)"))


def _mismatch_row(implementation: str, mismatch: Mismatch) -> Sequence[Any]:
    reference, candidate = _around_difference(mismatch.reference, mismatch.candidate)
    return (implementation, mismatch.workload, mismatch.index, _clip(mismatch.text), ", ".join(mismatch.fields),
            reference, candidate)


def _around_difference(reference: Any, candidate: Any) -> tuple[str, str]:
    """Both values from a little before their first difference, so long id lists stay readable."""
    if isinstance(reference, str):
        return _clip(repr(reference)), _clip(repr(candidate))
    first = next((i for i, (a, b) in enumerate(zip(reference, candidate, strict=False)) if a != b),
                 min(len(reference), len(candidate)))
    start = max(0, first - 3)

    def window(ids: Sequence[int]) -> str:
        end = min(len(ids), start + SHOWN_IDS)
        return f"[{start}:{end}] of {len(ids)}: " + " ".join(map(str, ids[start:end]))

    return window(reference), window(candidate)


def _clip(text: str) -> str:
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS - 1] + "…"


def _speedup(value: float) -> Text:
    return Text(f"{value:.2f}x", style="bold green" if value >= 1.5 else "")


def fmt_us(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def fmt_rate(value: float) -> str:
    """Three significant figures with a k/M suffix: 740, 25.3k, 3.36M."""
    for suffix, scale in (("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}" if value >= 1 else f"{value:.2g}"


def _verdict(report: TokenizerBenchReport) -> Text:
    checked = f"{report.texts} texts and {report.pairs} pairs"
    if not report.agree:
        return verdict(False, f"{len(report.disagreeing)} implementation(s) disagree with {report.reference}: "
                              f"{', '.join(report.disagreeing)} (on {checked})")
    others = len(report.implementations) - 1
    if not others:
        return verdict(True, f"only the reference ({report.reference}) ran: nothing to compare with")
    fastest = _fastest(report)
    return verdict(True, f"{others} implementation(s) agree with {report.reference} on {checked}" + fastest)


def _fastest(report: TokenizerBenchReport) -> str:
    single = [t for t in report.timings if t.workload == "single"]
    if len(single) < 2:
        return ""
    best = max(single, key=lambda t: t.speedup)
    return f"; fastest on single texts: {best.implementation} ({best.speedup:.1f}x the slowest)"
