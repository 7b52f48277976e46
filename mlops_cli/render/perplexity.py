"""The perplexity figure of a causal LM, shown the same way by every command that measures it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from rich.console import RenderableType

from mlops_cli.render import fmt_float, note, table
from mlops_cli.services.perplexity import PerplexityComparison


def perplexity_tables(comparison: PerplexityComparison | None, before: str = "before", after: str = "after"
                      ) -> Iterator[RenderableType]:
    """Perplexity before/after, its relative change, and the greedy next-token agreement, with what was scored."""
    if comparison is None:
        return
    yield table(f"Causal LM quality on {Path(comparison.text).name}", ("measure", before, after, "change"), [
        ("perplexity (sliding window)", fmt_float(comparison.before), fmt_float(comparison.after),
         f"{comparison.relative_change:+.2%}"),
        ("greedy next-token agreement", "", f"{comparison.greedy_agreement:.1%}", ""),
    ], numeric=(before, after, "change"))
    yield note(f"{comparison.tokens} tokens ({comparison.scored_tokens} scored) in windows of {comparison.window} "
               f"moving by {comparison.stride}" + (f"; {comparison.compute}" if comparison.compute else ""))


def perplexity_summary(comparison: PerplexityComparison | None) -> str:
    """`, perplexity +0.12% (greedy agreement 99.6%)` for a verdict line; empty when not measured."""
    if comparison is None:
        return ""
    return f", perplexity {comparison.relative_change:+.2%} (greedy agreement {comparison.greedy_agreement:.1%})"
