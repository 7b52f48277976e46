"""Tables for `mlops zoo`."""

from __future__ import annotations

from collections.abc import Iterator

from rich.console import RenderableType

from mlops_cli.render import fmt_bytes, fmt_count, note, table
from mlops_cli.services.zoo import ZooListing, ZooSaveReport


def listing_tables(listing: ZooListing) -> Iterator[RenderableType]:
    yield table("Built-in models", ("reference", "kind", "description"),
                ((m.reference, m.kind, m.description) for m in listing.models))


def save_tables(report: ZooSaveReport) -> Iterator[RenderableType]:
    yield table(f"Saved builtin:{report.name} to {report.path} ({fmt_count(report.parameters)} parameters)",
                ("file", "bytes"), ((name, fmt_bytes(size)) for name, size in report.files.items()), numeric=("bytes",))
    yield note(f"use it: {report.usage}")
