"""`mlops generate MODEL --prompt TEXT`.

No `from __future__ import annotations`: `@model_options` rebuilds the signature and typer must see the
Annotated option types as objects, not strings.
"""

from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from mlops_cli.commands.common import (
    Device,
    DeviceOpt,
    JsonOpt,
    ModelArg,
    QuietOpt,
    SeedOpt,
    ThreadsOpt,
    WarmupOpt,
    model_options,
    progress_steps,
)

if TYPE_CHECKING:
    from mlops_cli.core.loading import LoadOptions

DECODING = "Decoding"
MEASURING = "Measuring"


class Strategy(str, Enum):
    greedy = "greedy"
    beam = "beam"
    sample = "sample"
    beam_sample = "beam-sample"
    all = "all"


class Engine(str, Enum):
    generate = "generate"
    loop = "loop"


class DType(str, Enum):
    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"


class Cache(str, Enum):
    dynamic = "dynamic"
    static = "static"


def _opt(*names: str, panel: str = DECODING, **kwargs: Any) -> Any:
    """typer.Option grouped under a help panel."""
    return typer.Option(*names, rich_help_panel=panel, **kwargs)


@model_options
def generate_command(
    model: ModelArg,
    prompt: Annotated[str | None, _opt("--prompt", "-p", show_default=False, help="The prompt.")] = None,
    prompts_file: Annotated[Path | None, _opt(
        "--prompts", show_default=False, help="A file of prompts, one per line, generated as one batch.")] = None,
    strategy: Annotated[Strategy, _opt(
        "--strategy", help="greedy, beam, sample, beam-sample, or all (one table row per strategy, same prompt "
                           "and seed).")] = Strategy.greedy,
    max_new_tokens: Annotated[int, _opt("--max-new-tokens", min=1, help="Tokens to generate at most.")] = 32,
    num_beams: Annotated[int, _opt("--num-beams", min=2, help="Beams for beam and beam-sample.")] = 4,
    temperature: Annotated[float, _opt(
        "--temperature", help="Sampling: divide the logits by this (<1 sharper, >1 flatter).")] = 1.0,
    top_k: Annotated[int, _opt("--top-k", min=0, help="Sampling: keep the k most likely tokens (0: all).")] = 50,
    top_p: Annotated[float, _opt(
        "--top-p", help="Sampling: keep the smallest set of tokens whose probabilities add up to p (1: all).")] = 1.0,
    repetition_penalty: Annotated[float, _opt(
        "--repetition-penalty", help="Penalise tokens already in the text (prompt included): their positive logits "
                                     "are divided by this, negative ones multiplied. 1 disables it.")] = 1.0,
    no_repeat_ngram_size: Annotated[int, _opt(
        "--no-repeat-ngram-size", min=0,
        help="N: no n-gram of N tokens occurs twice in the output (prompt included): a token that would complete "
             "an N-gram already present gets probability 0. 0 disables it.")] = 0,
    seed: SeedOpt = 0,
    stop: Annotated[list[str] | None, _opt(
        "--stop", show_default=False,
        help="Stop once the text (the end of the prompt included) contains this string; the token completing it "
             "is kept. Repeatable.")] = None,
    chat: Annotated[bool, _opt(
        "--chat", help="Wrap the prompt in the tokenizer's chat template (exit 2 if it has none).")] = False,
    stream: Annotated[bool, _opt(
        "--stream", help="Print the first run's text as it is produced (the untimed warm-up run when there is "
                         "one). Not with --json.")] = False,
    explain: Annotated[bool, _opt(
        "--explain", help="Add a greedy step table: at each step the top candidates with their probabilities and "
                          "the chosen token.")] = False,
    candidates: Annotated[int, _opt("--candidates", min=1, help="Candidates per step for --explain.")] = 5,
    engine: Annotated[Engine, _opt(
        "--engine", panel=MEASURING,
        help="generate: transformers' model.generate; loop: our KV-cache loop (greedy and sampling, token for "
             "token the same output, less time per token).")] = Engine.generate,
    dtype: Annotated[DType, _opt(
        "--dtype", panel=MEASURING, help="Weights and compute precision; fp16/bf16 are meant for CUDA.")] = DType.fp32,
    device: DeviceOpt = Device.auto,
    cache: Annotated[Cache, _opt(
        "--cache", panel=MEASURING, help="KV cache: dynamic, or static (fixed size; CUDA, with --compile).")]
        = Cache.dynamic,
    compile_: Annotated[bool, _opt(
        "--compile", panel=MEASURING,
        help="torch.compile the decoding step (needs --cache static; CUDA: on CPU it brings nothing).")] = False,
    fixed_length: Annotated[bool, _opt(
        "--fixed-length", panel=MEASURING,
        help="Ignore EOS and generate exactly --max-new-tokens tokens (benchmarking); checked (exit 6).")] = False,
    repeat: Annotated[int, _opt(
        "--repeat", "--repeats", panel=MEASURING, min=1,
        help="Measured runs per strategy: median and spread (--repeats, as in the other commands, works too).")] = 1,
    warmup: WarmupOpt = 1,
    threads: ThreadsOpt = None,
    tokenizer: Annotated[Path | None, _opt(
        "--tokenizer", show_default=False,
        help="ONNX models: the folder holding the tokenizer (default: the .onnx file's folder).")] = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    *,
    load: "LoadOptions",
) -> None:
    """Generate text with a causal LM (or seq2seq model) and measure it: decoding strategies side by side,
    greedy decoding explained step by step.

    Figures, per strategy (medians over --repeat runs after --warmup runs): TTFT is the time from the call to
    the first *generated* token (prompt pass included); decode tok/s counts the tokens after the first over the
    time after the first token; per-token latency p50/p90 is the time between consecutive tokens, first token
    excluded; total is the whole call; peak memory is CUDA max allocated, or on CPU the growth of the resident
    set during the run. CUDA timings are synchronised.

    An ONNX decoder exported with its KV cache (`mlops export onnx MODEL --task causal-lm`) generates on ONNX
    Runtime (greedy or sample) with the same figures; its tokenizer comes from its folder or --tokenizer. An ONNX
    Runtime GenAI folder (genai_config.json; `export onnx --engine genai`) runs on that runtime: greedy, sample
    and beam, the same figures.

    Example: mlops generate builtin:tiny-gpt2 --prompt "The model" --strategy all --max-new-tokens 20
    """
    from mlops_cli import render
    from mlops_cli.core.contract import ModelRef
    from mlops_cli.core.errors import UsageError, ValidationFailed
    from mlops_cli.render.generate import TextPrinter, generate_tables
    from mlops_cli.services.generate import GenerateOptions, read_prompts, run

    if (prompt is None) == (prompts_file is None):
        raise UsageError("give either --prompt or --prompts FILE", hint='Example: --prompt "Once upon a time"')
    if stream and as_json:
        raise UsageError("--stream prints text for humans; it cannot be combined with --json")
    prompts = (prompt,) if prompt is not None else read_prompts(prompts_file)  # type: ignore[arg-type]
    with progress_steps("Generating", quiet or stream) as on_step:
        options = GenerateOptions(
            load=load, on_step=on_step, prompts=prompts, strategy=strategy.value, max_new_tokens=max_new_tokens,
            num_beams=num_beams, temperature=temperature, top_k=top_k, top_p=top_p,
            repetition_penalty=repetition_penalty, no_repeat_ngram_size=no_repeat_ngram_size, seed=seed,
            stop=tuple(stop or ()), chat=chat, fixed_length=fixed_length, repeat=repeat, warmup=warmup,
            engine=engine.value, cache=cache.value, compile=compile_, device=device.value, dtype=dtype.value,
            explain=explain, candidates=candidates, stream=stream, threads=threads,
            tokenizer=tokenizer,
            on_text=TextPrinter() if stream else None)
        report = run(ModelRef.parse(model), options)
    render.emit(report, as_json, generate_tables, quiet)
    short = [r.strategy for r in report.results if r.fixed_length_ok is False]
    if short:
        raise ValidationFailed(f"--fixed-length: {', '.join(short)} produced fewer than {max_new_tokens} new tokens")


def register(app: typer.Typer) -> None:
    app.command("generate")(generate_command)
