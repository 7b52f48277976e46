"""Tables for `mlops generate`: the run's setup, the figures per strategy, the generated texts, the explain table.

Figures and texts are separate tables so that the texts stay readable at 80 columns (CI logs, pipes).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from rich.console import RenderableType
from rich.table import Table
from rich.text import Text

from mlops_cli.render import fmt_bytes, fmt_ms, fmt_pct, key_values, note, stdout, table

METRICS_NOTE = ("TTFT: call to first generated token. tok/s and per-token latency p50 / p90 (time between "
                "consecutive tokens): after the first token. Medians over the measured runs; total ± half its "
                "range. All figures and token ids: --json.")


TEXT_LIMIT = 400  # characters of generated text shown per output; --json has it all
PROMPT_LIMIT = 24  # characters of a batch's prompt shown beside its text
TITLE_LIMIT = 60  # characters of the prompt in the explain table's title


def _visible(text: str, limit: int | None = None) -> str:
    """Text on one table line: newlines, tabs and other control characters escaped, cut to `limit` characters."""
    shown = "".join(char if char.isprintable() or char == " " else repr(char)[1:-1] for char in text)
    return shown if limit is None or len(shown) <= limit else shown[:limit - 1] + "…"


def _no_wrap(result: Table, headers: Iterable[str]) -> Table:
    """Figures stay on one line; the text column takes the wrapping."""
    wanted = set(headers)
    for column in result.columns:
        if str(column.header) in wanted:
            column.no_wrap = True
    return result


def _token(token: str) -> str:
    """A token with its spaces visible: repr without the quotes' ambiguity."""
    return repr(token)


def _percent(probability: float) -> str:
    return f"{probability * 100:.2f}%"


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def setup_table(report: Any) -> RenderableType:
    first = report.results[0].metrics if report.results else None
    runs = f"{first.runs} measured after {first.warmup} warm-up" if first else "-"
    engine = report.engine
    if report.cache != "dynamic" or report.compiled:
        engine += f" (cache {report.cache}{', compiled' if report.compiled else ''})"
    return key_values("generate", [
        ("model", f"{report.model} ({report.architecture})"),
        ("device / dtype", f"{report.device} / {report.dtype}"),
        ("engine", engine),
        ("prompts", report.batch_size),
        ("max new tokens", report.max_new_tokens),
        ("seed", report.seed),
        ("runs per strategy", runs),
        ("peak memory", report.memory_measure),
    ])


def _latency(metrics: Any) -> str:
    """Per-token latency as 'p50 / p90'."""
    latency = metrics.token_latency
    if latency is None:
        return "-"
    return f"{fmt_ms(latency.median_ms).removesuffix(' ms')} / {fmt_ms(latency.p90_ms)}"


def _total(metrics: Any) -> str:
    """Median total time, with its spread over the measured runs when there are several."""
    total = metrics.total
    if metrics.runs < 2 or not total.median_ms:
        return fmt_ms(total.median_ms)
    return f"{fmt_ms(total.median_ms)} ±{fmt_pct((total.max_ms - total.min_ms) / total.median_ms / 2, 0)}"


def results_table(report: Any) -> RenderableType:
    """One row per strategy: its figures. Every column may wrap, so the table fits a narrow terminal."""
    mixed = len({r.engine for r in report.results}) > 1  # --engine loop with beam strategies
    columns = ["strategy", *(["engine"] if mixed else []), "TTFT", "tok/s", "p50 / p90", "total", "peak mem"]
    rows = []
    for result in report.results:
        metrics = result.metrics
        rows.append([result.strategy, *([result.engine] if mixed else []),
                     fmt_ms(metrics.ttft.median_ms) if metrics.ttft else "-", _rate(metrics.decode_tokens_per_s),
                     _latency(metrics), _total(metrics), _memory(metrics.peak_memory_bytes)])
    numeric = ("TTFT", "tok/s", "p50 / p90", "total", "peak mem")
    return table("results", columns, rows, numeric=numeric, caption=METRICS_NOTE)


def texts_table(report: Any) -> RenderableType:
    """The generated texts (and their new-token counts) in a table of their own: the text column gets what the
    labels leave of the width, however many figure columns the results table has."""
    batch = report.batch_size > 1
    columns = ["strategy", *(["prompt"] if batch else []), "new", "generated text"]
    rows = []
    for result in report.results:
        for index, output in enumerate(result.outputs):
            text = _visible(output.text, TEXT_LIMIT)
            if output.stop_reason != "max_new_tokens":
                text += f" [{output.stop_reason}]"
            rows.append([result.strategy if index == 0 else "",
                         *([_visible(output.prompt, PROMPT_LIMIT)] if batch else []), output.new_tokens, text])
    return table("texts", columns, rows, numeric=("new",))


def explain_table(explanation: Any) -> RenderableType:
    width = max((len(step.candidates) for step in explanation.steps), default=0)
    columns = ["step", "text so far", *(f"#{i + 1}" for i in range(width))]
    rows = []
    for step in explanation.steps:
        context = _visible(explanation.prompt + step.text_before)
        context = context if len(context) <= 28 else "…" + context[-27:]
        choices = [Text(f"{_token(c.token)} {_percent(c.probability)}",
                        style="bold" if c.token_id == step.chosen.token_id else "") for c in step.candidates]
        if all(c.token_id != step.chosen.token_id for c in step.candidates):  # only on exact probability ties
            choices[-1] = Text(f"{_token(step.chosen.token)} {_percent(step.chosen.probability)}", style="bold")
        rows.append([step.step, context, *choices, *([""] * (width - len(choices)))])
    agreement = {True: " Chosen tokens equal the greedy run's.", False: " Chosen tokens DIFFER from the greedy run's.",
                 None: ""}[explanation.matches_greedy]
    caption = ("Candidates by probability after the logits processors (what greedy picks from); the chosen one is "
               "bold. KV-cached." + agreement)
    title = f"explain: greedy step by step for {_visible(explanation.prompt, TITLE_LIMIT)!r}"
    return _no_wrap(table(title, columns, rows, numeric=("step",), caption=caption), ("step",))


def generate_tables(report: Any) -> Iterable[RenderableType]:
    yield setup_table(report)
    yield results_table(report)
    yield texts_table(report)
    if report.explanation is not None:
        yield explain_table(report.explanation)
    for result in report.results:
        if not result.reproducible:
            yield note(f"{result.strategy}: the measured runs did not all produce the same tokens")
        if result.fixed_length_ok is False:
            yield note(f"{result.strategy}: --fixed-length asked for {report.max_new_tokens} new tokens per prompt")
    for line in report.notes:
        yield note(line)


class TextPrinter:
    """`--stream`: prints each strategy's text on stdout as it is produced, under a label."""

    def __init__(self) -> None:
        self.current: str | None = None

    def __call__(self, strategy: str, piece: str | None) -> None:
        console = stdout()
        if piece is None:
            console.print()
            self.current = None
            return
        if self.current != strategy:
            console.print(Text(f"{strategy}: ", style="bold"), end="")
            self.current = strategy
        console.print(Text(piece), end="", soft_wrap=True)
        console.file.flush()


def _memory(peak: int | None) -> str:
    """A peak that could not be measured says so: never a 0 that reads as "no memory used"."""
    return "not measured" if peak is None else fmt_bytes(peak)
