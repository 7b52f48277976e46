"""Benchmark `mlops generate`: our wrapper against a direct `model.generate` call, and our own decoding loop.

Interleaved in one process (A/B/C/A/B/C... so machine noise hits all alike), on the same model, prompt and
settings, with --fixed-length so every call produces the same number of tokens:

- `direct`: `model.generate(...)` called by hand with the same generation config;
- `service/generate`: our service (`run_once`, what `mlops generate` repeats), engine generate;
- `service/loop`: our service with `--engine loop` (our KV-cache loop);
- on CUDA also `service/static+compile` (`--cache static --compile`).

It prints end-to-end tokens/s (new tokens / median call time, everything the call does included), the
tokens/s ratio to the direct call (the median of time ratios of calls made back to back; goal for
service/generate: >= 0.97; also on process CPU time, which a busy machine disturbs far less), and the
service's own TTFT, decode tokens/s and per-token latency.

Models: the built-in tiny GPT-2 (2 layers, hidden 32: per-token overhead dominates) and a randomly
initialised GPT-2 with 6 layers, hidden 256 (model time dominates). On a shared machine pass --threads 1 to
avoid oversubscribing the cores, and read the spread column before the figures.

    .venv/bin/python benchmarks/bench_generate.py --threads 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from mlops_cli import render
from mlops_cli.core.loading import LoadedModel, ModelKind, load_model
from mlops_cli.core.timing import measure_interleaved
from mlops_cli.services.generate import (
    GenerateOptions,
    RunRecord,
    Session,
    generated_texts,
    generation_config,
    ignoring_eos,
    prepare,
    run_metrics,
    run_once,
)

WRAPPER_GOAL = 0.97
DIRECT = "direct model.generate"


def random_gpt2(layers: int, hidden: int) -> LoadedModel:
    """A GPT-2 of the given size with seeded random weights and the tiny GPT-2's tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from mlops_cli.core import zoo

    tokenizer = zoo.gpt2_tokenizer()
    eos = tokenizer.convert_tokens_to_ids(zoo.BPE_SPECIAL)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=512, n_embd=hidden, n_layer=layers,
                        n_head=max(1, hidden // 64), bos_token_id=eos, eos_token_id=eos)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = GPT2LMHeadModel(config).eval()
    return LoadedModel(f"random GPT-2 {layers}x{hidden}", ModelKind.HF, None, module=model, config=config,
                       tokenizer=tokenizer)


def direct_call(session: Session, strategy: str) -> Callable[[], Any]:
    """What a user would write: seed, then model.generate with the same generation config."""
    config = generation_config(session, strategy)

    def call() -> Any:
        torch.manual_seed(session.options.seed)
        with torch.inference_mode(), ignoring_eos(session.model, session.options.fixed_length):
            return session.model.generate(input_ids=session.input_ids, attention_mask=session.attention_mask,
                                          generation_config=config)

    return call


def service_call(session: Session, strategy: str, engine: str, records: list[RunRecord]) -> Callable[[], Any]:
    def call() -> Any:
        records.append(run_once(session, strategy, engine))

    return call


def timed(fn: Callable[[], Any], wall: list[float], cpu: list[float]) -> Callable[[], Any]:
    """Keep each call's own wall and CPU time, so calls made side by side can be compared pair by pair. CPU
    time (this process, torch on one thread) counts the work done and not the waiting for a busy CPU."""
    def call() -> Any:
        begin, begin_cpu = time.perf_counter(), time.process_time()
        result = fn()
        wall.append(time.perf_counter() - begin)
        cpu.append(time.process_time() - begin_cpu)
        return result

    return call


def paired_ratio(slower: list[float], faster: list[float]) -> float:
    """Median over repeats of time(slower) / time(faster), each pair measured back to back: far steadier on a
    busy machine than the ratio of two medians."""
    return statistics.median(a / b for a, b in zip(slower, faster, strict=True))


def bench_model(loaded: LoadedModel, args: argparse.Namespace) -> tuple[list[list[Any]], list[str]]:
    options = GenerateOptions(prompts=(args.prompt,), strategy=args.strategy, max_new_tokens=args.max_new_tokens,
                              fixed_length=True, device=args.device, seed=0)
    session = prepare(loaded, options)
    records: dict[str, list[RunRecord]] = {"service/generate": [], "service/loop": []}
    calls = {DIRECT: direct_call(session, args.strategy),
             "service/generate": service_call(session, args.strategy, "generate", records["service/generate"]),
             "service/loop": service_call(session, args.strategy, "loop", records["service/loop"])}
    if session.uses_cuda:  # --cache static --compile, measured the same way (untested on this CPU-only box)
        compiled = prepare(loaded, replace(options, cache="static", compile=True))
        records["service/static+compile"] = []
        calls["service/static+compile"] = service_call(compiled, args.strategy, "generate",
                                                       records["service/static+compile"])
    wall: dict[str, list[float]] = {name: [] for name in calls}
    cpu: dict[str, list[float]] = {name: [] for name in calls}
    timings = measure_interleaved({name: timed(fn, wall[name], cpu[name]) for name, fn in calls.items()},
                                  warmup=args.warmup, repeats=args.repeats, device=session.device)
    measured = {name: values[args.warmup:] for name, values in wall.items()}
    measured_cpu = {name: values[args.warmup:] for name, values in cpu.items()}
    new_tokens = args.max_new_tokens * session.batch_size
    reference = calls[DIRECT]()
    rows, checks = [], []
    for name, timing in timings.items():
        runs = records.get(name, [])[args.warmup:]
        metrics = [run_metrics(r, new_tokens, session.batch_size) for r in runs]
        ttft = statistics.median(m.ttft_ms for m in metrics if m.ttft_ms is not None) if metrics else None
        rates = [m.decode_tokens_per_s for m in metrics if m.decode_tokens_per_s]
        latencies = [v for m in metrics for v in m.step_latencies_ms]
        rows.append([loaded.reference, name, f"{new_tokens / (timing.median_ms / 1000):,.0f}",
                     f"{new_tokens / (timing.min_ms / 1000):,.0f}",
                     f"{paired_ratio(measured[DIRECT], measured[name]):.3f}",
                     f"{paired_ratio(measured_cpu[DIRECT], measured_cpu[name]):.3f}", render.fmt_ms(ttft),
                     f"{statistics.median(rates):,.0f}" if rates else "-",
                     render.fmt_ms(statistics.median(latencies) if latencies else None), f"{timing.spread_pct:.0f}%"])
        if runs:
            same = torch.equal(runs[-1].sequences.cpu(), reference.cpu())
            checks.append(f"{loaded.reference}: {name} tokens equal model.generate's: {'yes' if same else 'NO'}")
    wrapper = paired_ratio(measured[DIRECT], measured["service/generate"])
    wrapper_cpu = paired_ratio(measured_cpu[DIRECT], measured_cpu["service/generate"])
    verdict = "PASS" if wrapper >= WRAPPER_GOAL else ("PASS on CPU time" if wrapper_cpu >= WRAPPER_GOAL else "FAIL")
    checks.append(f"{loaded.reference}: wrapper tokens/s ratio {wrapper:.3f} wall, {wrapper_cpu:.3f} CPU time "
                  f"(goal >= {WRAPPER_GOAL}): {verdict}")
    gain = paired_ratio(measured["service/generate"], measured["service/loop"])
    gain_cpu = paired_ratio(measured_cpu["service/generate"], measured_cpu["service/loop"])
    checks.append(f"{loaded.reference}: loop engine tokens/s {gain:.2f}x (wall), {gain_cpu:.2f}x (CPU time) the "
                  f"generate engine's; text {generated_texts(session, reference)[0].text[:24]!r}")
    return rows, checks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="builtin:tiny-gpt2,random:6x256",
                        help="comma-separated: builtin:NAME, a model folder, or random:LAYERSxHIDDEN")
    parser.add_argument("--strategy", default="greedy", choices=("greedy", "sample"))
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--prompt", default="The model is exported to ONNX and")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    header = (f"bench_generate: {args.strategy}, {args.max_new_tokens} new tokens (fixed length), "
              f"{args.repeats} interleaved repeats after {args.warmup} warm-up, torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}")
    all_rows, all_checks = [], []
    for reference in args.models.split(","):
        if reference.startswith("random:"):
            layers, hidden = (int(v) for v in reference.removeprefix("random:").split("x"))
            loaded = random_gpt2(layers, hidden)
        else:
            loaded = load_model(reference)
        rows, checks = bench_model(loaded, args)
        all_rows += rows
        all_checks += checks
    console = render.stdout()
    console.print(header)
    console.print(render.table("generate: direct model.generate vs our service and engines",
                               ["model", "runner", "tok/s", "best tok/s", "vs direct", "vs direct CPU", "TTFT",
                                "decode tok/s", "p50/token", "spread"], all_rows,
                               numeric=("tok/s", "best tok/s", "vs direct", "vs direct CPU", "TTFT", "decode tok/s",
                                        "p50/token", "spread"),
                               caption="tok/s: new tokens / median call time, end to end (best: / fastest call). "
                                       "vs direct: median of paired ratios of wall time (CPU: process CPU time) "
                                       "direct / this. TTFT, decode tok/s, p50/token: the service's step clock "
                                       "(direct calls have none)."))
    for line in all_checks:
        console.print(line)
    return 0 if all("FAIL" not in line and ": NO" not in line for line in all_checks) else 1


if __name__ == "__main__":
    sys.exit(main())
