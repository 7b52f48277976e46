"""Tables for parity reports (verify-parity, and the verification step of exports, compress, prune).

Numbers stay short (3 significant digits, percentages with one decimal) and their columns are declared numeric,
so they line up and never wrap.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from rich.console import RenderableType
from rich.text import Text

from mlops_cli.core.compare import AGREEMENT, COSINE, ELEMENTWISE, Criterion
from mlops_cli.core.parity import ParityReport
from mlops_cli.render import fmt_float, fmt_ms, fmt_pct, key_values, note, table, verdict
from mlops_cli.render.perplexity import perplexity_tables
from mlops_cli.services.onnx_lm import GenerationParityReport
from mlops_cli.services.onnx_lm.quality import PromptParity
from mlops_cli.services.verify_parity import VerifyParityReport

PARITY_COLUMNS = ("input set", "output", "max |diff|", "max rel", "mean |diff|", "p99 |diff|", "cosine",
                  "top-1", "min atol", "result")
CRITERIA_COLUMNS = ("output", "criterion", "worst at", "value", "threshold", "result")
LATENCY_COLUMNS = ("input set", "reference p50", "reference p90", "candidate p50", "candidate p90", "speed-up")


SHORT_PROBLEM = 60  # longer failure messages go under the table instead of into its last column


def parity_rows(report: ParityReport) -> Iterator[tuple[object, ...]]:
    for shape in report.shapes:
        if shape.error and not shape.outputs:
            yield (shape.label, "-", "-", "-", "-", "-", "-", "-", "-", Text("FAIL: see below", style="red"))
            continue
        for diff in shape.outputs:
            problem = diff.problem if diff.problem and len(diff.problem) <= SHORT_PROBLEM else "see below"
            failed = diff.failed_criterion
            failure = f"FAIL: {problem}" if diff.problem else f"FAIL: {failed.name}" if failed else "FAIL"
            status = Text("PASS", style="green") if diff.passed else Text(failure, style="red")
            yield (shape.label, diff.name, fmt_float(diff.max_abs), fmt_float(diff.max_rel), fmt_float(diff.mean_abs),
                   fmt_float(diff.p99_abs), fmt_float(diff.cosine, 6), fmt_pct(diff.top1_agreement),
                   fmt_float(diff.min_atol_to_pass), status)


def criteria_rows(report: ParityReport) -> Iterator[tuple[object, ...]]:
    """Every check of every output at its worst input set: value against threshold."""
    for item in report.criteria:
        criterion = item.criterion
        status = Text("PASS", style="green") if criterion.passed else Text("FAIL", style="red")
        yield (item.output, _criterion_name(criterion), item.input_set, fmt_criterion(criterion, criterion.value),
               fmt_threshold(criterion), status)


def _criterion_name(criterion: Criterion) -> str:
    return "atol needed" if criterion.name == ELEMENTWISE else criterion.name


def fmt_criterion(criterion: Criterion, value: float) -> str:
    """Short numbers: cosines with 6 decimals, agreements as percentages, atols in 3 significant digits."""
    if criterion.name == ELEMENTWISE:
        return fmt_float(value)
    return fmt_float(value, 6) if criterion.name == COSINE else fmt_pct(value)


def fmt_threshold(criterion: Criterion) -> str:
    """`>= 0.99999`, `>= 99.0%`, `<= 1.50e-03`: the rule and the threshold as the preset states it."""
    shown = f"{criterion.threshold:g}" if criterion.name == COSINE else fmt_criterion(criterion, criterion.threshold)
    return f"{criterion.rule} {shown}"


def failure_details(report: ParityReport) -> Iterator[Text]:
    """The failures too long for a table cell: input sets that did not run, long mismatch messages."""
    for shape in report.shapes:
        if shape.error and not shape.outputs:
            yield Text(f"{shape.label}: {shape.error}", style="red")
        for diff in shape.outputs:
            if diff.problem and len(diff.problem) > SHORT_PROBLEM:
                yield Text(f"{shape.label}, {diff.name}: {diff.problem}", style="red")


def rule_caption(report: ParityReport) -> str:
    """What an element must satisfy: the preset's scale-aware bound, or the plain atol/rtol."""
    agreement = AGREEMENT.get(report.preset or "")
    if agreement is None:
        return f"pass: |cand - ref| <= atol {report.atol:g} + rtol {report.rtol:g} * |ref|"
    return (f"pass (preset {report.preset}): |cand - ref| <= max(atol {report.atol:g}, {agreement.scale:g} * "
            f"max|ref|) + rtol {report.rtol:g} * |ref|, and the criteria below")


def parity_tables(report: ParityReport, title: str | None = None, *,
                  with_verdict: bool = True) -> Iterator[RenderableType]:
    """The parity table, the criteria and latency tables and the verdict line (left out for callers with
    their own)."""
    masked = "padded positions excluded" if report.masked_positions_excluded else "padded positions included"
    yield table(title or f"Parity: {report.candidate} ({report.candidate_backend}) vs {report.reference} "
                         f"({report.reference_backend})",
                PARITY_COLUMNS, parity_rows(report), numeric=PARITY_COLUMNS[2:9],
                caption=f"{masked}; device {report.device}")
    yield note(rule_caption(report))
    yield from failure_details(report)
    if report.criteria:
        yield table("Criteria (each output at its worst input set)", CRITERIA_COLUMNS, criteria_rows(report),
                    numeric=("value", "threshold"),
                    caption="atol needed: max of |diff| - rtol*|ref|; the threshold is the atol allowed")
    timed = [s for s in report.shapes if s.reference_latency and s.candidate_latency]
    if timed:
        threads = f", {report.threads} thread(s)" if report.threads else ""
        yield table(f"Latency (warm, median of repeats{threads})", LATENCY_COLUMNS, (
            (s.label, fmt_ms(s.reference_latency.median_ms), fmt_ms(s.reference_latency.p90_ms),  # type: ignore[union-attr]
             fmt_ms(s.candidate_latency.median_ms), fmt_ms(s.candidate_latency.p90_ms),  # type: ignore[union-attr]
             s.speed.describe() if s.speed else "-") for s in timed), numeric=LATENCY_COLUMNS[1:5],
            caption="speed-up: reference p50 / candidate p50 with its 95% bootstrap interval; claimed only when "
                    "the interval excludes 1.0")
    for line in report.notes:
        yield note(line)
    if with_verdict:
        yield verdict(report.passed, report.verdict)


def verify_parity_tables(report: VerifyParityReport) -> Iterator[RenderableType]:
    """`verify-parity`: what was compared on what, then the parity tables and verdict."""
    parity = report.parity
    yield key_values("Parity check", [
        ("reference", f"{report.reference} ({parity.reference_backend})"),
        ("candidate", f"{report.candidate} ({parity.candidate_backend})"),
        ("device", parity.device),
        ("preset", f"{report.preset} ({report.preset_source})"),
        ("checks", report.tolerances),
        ("inputs", f"{report.input_sets} input set(s) from {report.input_source}"),
    ])
    yield from parity_tables(parity, title="Per output and input set", with_verdict=False)
    if report.worst_output:
        yield note(f"worst output: {report.worst_output}")
    yield from perplexity_tables(report.perplexity, "reference", "candidate")
    yield verdict(report.passed, report.verdict)


def generation_parity_tables(report: GenerationParityReport) -> Iterator[RenderableType]:
    """`verify-parity --generate`: tokens per prompt, the worst pass of each, the first divergence, the verdict."""
    tolerance = (f"preset {report.preset} (scale-aware)" if report.preset
                 else f"atol {report.atol:g}, rtol {report.rtol:g} (as given)")
    yield key_values("Generation parity", [
        ("reference", report.reference), ("candidate", f"{report.candidate} ({report.runtime}, KV cache)"),
        ("greedy tokens per prompt", report.max_new_tokens), ("logits tolerance", tolerance)])
    yield prompt_parity_table(report.prompts)
    for prompt in report.prompts:
        divergence = prompt.divergence
        if divergence is not None:
            yield note(f"{prompt.prompt!r}: step {divergence.step}: reference {divergence.reference_token} "
                       f"({divergence.reference_text!r}) vs candidate {divergence.candidate_token} "
                       f"({divergence.candidate_text!r}); logit gap {divergence.reference_gap:.3g} (reference), "
                       f"{divergence.candidate_gap:.3g} (candidate)")
    yield from perplexity_tables(report.perplexity, "reference", "candidate")
    yield verdict(report.passed, report.verdict)


def prompt_parity_table(prompts: Sequence[PromptParity]) -> RenderableType:
    """One row per prompt: greedy tokens in common, the first divergence, the worst pass and the first failing one."""
    rows = []
    for prompt in prompts:
        worst = max(prompt.passes, key=lambda p: p.diff.max_abs or 0.0, default=None)
        failing = prompt.first_failing_pass
        where = "-" if failing is None else ("prompt pass" if failing.step == 0 else f"cached step {failing.step}")
        same = sum(1 for a, b in zip(prompt.reference_tokens, prompt.candidate_tokens, strict=False) if a == b)
        diverged = f"step {prompt.divergence.step}" if prompt.divergence else "-"
        rows.append((prompt.prompt, f"{same}/{len(prompt.reference_tokens)}", diverged, len(prompt.passes),
                     fmt_float(worst.diff.max_abs if worst else None), where,
                     Text("PASS", style="green") if prompt.passed else Text("FAIL", style="red")))
    return table("Per prompt: greedy tokens and the logits of every pass",
                 ("prompt", "same tokens", "first divergence", "passes", "worst max |diff|", "first failing pass",
                  "result"), rows, numeric=("same tokens", "passes", "worst max |diff|"),
                 caption="pass 0 is the prompt pass, pass k the k-th token through the KV cache")
