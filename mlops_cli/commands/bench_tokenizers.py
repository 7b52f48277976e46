"""`mlops bench-tokenizers TOKENIZER`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mlops_cli.commands.common import JsonOpt, QuietOpt, WarmupOpt, progress_steps
from mlops_cli.core.errors import UsageError

IMPLEMENTATIONS = "transformers-python, transformers, tokenizers, tiktoken, sentencepiece"
WORKLOADS = "single, pair, batch, decode"


def bench_tokenizers_command(
    tokenizer: Annotated[str, typer.Argument(
        metavar="TOKENIZER", show_default=False,
        help="A Hugging Face folder, tokenizer.json, vocab.txt (WordPiece), vocab.json (+ merges.txt beside it), "
             "a SentencePiece .model, or builtin:tiny-bert / builtin:tiny-gpt2.")],
    texts: Annotated[Path | None, typer.Option(
        "--texts", show_default=False,
        help="UTF-8 file: one text per line (pairs = neighbouring lines) or first<TAB>second pairs. "
             "Default: the built-in mixed Chinese/English corpus.")] = None,
    iterations: Annotated[int, typer.Option("--iterations", "-n", help="Timed passes over the corpus per "
                                                                        "workload and implementation.")] = 10,
    warmup: WarmupOpt = 2,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Pairs per call in the batch workload.")] = 32,
    max_length: Annotated[int, typer.Option("--max-length", help="Pad and truncate batches to this many "
                                                                 "tokens (longest first).")] = 64,
    threads: Annotated[str | None, typer.Option(
        "--threads", show_default=False,
        help="Rust worker threads (RAYON_NUM_THREADS; 1 sets TOKENIZERS_PARALLELISM=false), also tiktoken's and "
             "sentencepiece's batch threads. A list (1,2,4) sweeps, one child process per value.")] = None,
    reference: Annotated[str | None, typer.Option(
        "--reference", show_default=False,
        help=f"Implementation the others are checked against ({IMPLEMENTATIONS}). Default: transformers "
             "(sentencepiece for a bare .model).")] = None,
    implementations: Annotated[list[str] | None, typer.Option(
        "--impl", show_default=False, help=f"Only these implementations (repeatable): {IMPLEMENTATIONS}.")] = None,
    workloads: Annotated[list[str] | None, typer.Option(
        "--workload", show_default=False, help=f"Only these workloads (repeatable): {WORKLOADS}.")] = None,
    examples: Annotated[int, typer.Option("--examples", help="Mismatches shown per implementation and "
                                                             "workload.")] = 3,
    strict: Annotated[bool, typer.Option("--strict", help="Exit 6 when any implementation disagrees.")] = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Which tokenizer implementation, how fast, and do they agree: the pure-Python and Rust-backed
    transformers classes, the tokenizers library directly, tiktoken and sentencepiece, timed side by side
    (interleaved) on single texts, pairs, padded batches and decoding, with every output compared with the
    reference's (ids, attention mask, token types).

    Example: mlops bench-tokenizers builtin:tiny-bert --max-length 32 --threads 1,2
    """
    from mlops_cli import render
    from mlops_cli.core.contract import ModelRef
    from mlops_cli.core.errors import ValidationFailed
    from mlops_cli.render.bench_tokenizers import bench_tokenizers_tables
    from mlops_cli.services.bench_tokenizers import WORKLOADS as ALL_WORKLOADS
    from mlops_cli.services.bench_tokenizers import BenchTokenizersOptions, run

    with progress_steps("Benchmarking tokenizers", quiet or as_json) as on_step:
        options = BenchTokenizersOptions(
            on_step=on_step, texts_file=str(texts) if texts else None, iterations=iterations, warmup=warmup,
            batch_size=batch_size, max_length=max_length, thread_sweep=parse_threads(threads), reference=reference,
            implementations=tuple(implementations or ()), workloads=tuple(workloads or ALL_WORKLOADS),
            examples=examples)
        report = run(ModelRef.parse(tokenizer), options)
    render.emit(report, as_json, bench_tokenizers_tables, quiet)
    if not report.agree:
        message = f"{', '.join(report.disagreeing)} disagree(s) with {report.reference}"
        if strict:
            raise ValidationFailed(message, hint="See the mismatches above; a faster tokenizer that disagrees "
                                                 "feeds the model different inputs.")
        if not quiet:
            render.hint(f"{message}; use --strict to exit 6 on disagreement")


def parse_threads(text: str | None) -> tuple[int, ...]:
    """'1,2,4' -> (1, 2, 4); duplicates dropped, order kept."""
    if not text:
        return ()
    values = []
    for part in text.split(","):
        if not part.strip().isdigit() or int(part) < 1:
            raise UsageError(f"--threads {text!r}: {part.strip()!r} is not a positive whole number",
                             hint="Use --threads 2, or a list such as --threads 1,2,4.")
        values.append(int(part))
    return tuple(dict.fromkeys(values))


def register(app: typer.Typer) -> None:
    app.command("bench-tokenizers")(bench_tokenizers_command)
