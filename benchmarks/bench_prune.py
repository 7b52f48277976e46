"""What pruning buys on CPU: unstructured zeros against a real structural shrink, same amount, same model.

For each model it runs `mlops prune`'s service twice at --amount (default 0.5): L1 unstructured (zeros in dense
tensors) and L1 with --structured-shrink (channels removed). Each pruned model is timed A/B interleaved with
the unpruned one (median of --repeats) at a batch large enough for compute to dominate. Expected: unstructured
pruning leaves raw size, MACs and latency unchanged (only the gzip size drops); the shrink cuts all of them.
On a shared machine pass --threads 1 so the cores are not oversubscribed.

With --size-mb N it measures instead how fast the compressed-size estimate is on a synthetic state of N MiB
(fp32, 30% zeros as after pruning): gzip -6 of every byte (what prune did before), gzip -1 of every byte, and
the default (gzip -1 of a fixed sample), each in MB/s of weights, with the estimate's error against the exact
gzip -1 size.

    .venv/bin/python benchmarks/bench_prune.py [--amount 0.5] [--repeats 30] [--threads 1]
    .venv/bin/python benchmarks/bench_prune.py --size-mb 128
"""

from __future__ import annotations

import argparse
import time

import torch

from mlops_cli import render
from mlops_cli.core.contract import ModelRef
from mlops_cli.core.inputs import InputRequest
from mlops_cli.render.prune import speed_change
from mlops_cli.services import prune
from mlops_cli.services.prune import PruneOptions, PruneReport

WORKLOADS = {  # model -> --input specs (large enough that compute, not call overhead, dominates)
    "builtin:convnet": ("x:float32[batch=256,1,28,28]",),
    "builtin:lenet": ("x:float32[batch=256,1,32,32]",),
    "builtin:tiny-bert": ("input_ids:int64[batch=16,sequence=128]", "attention_mask:int64[batch=16,sequence=128]"),
}
COLUMNS = ("model", "variant", "params", "MACs", "raw size", "gzip size", "max |diff|", "p50 before", "p50 after",
           "speed-up")


def rows_for(model: str, inputs: tuple[str, ...], amount: float, repeats: int) -> list[tuple[str, ...]]:
    rows = []
    for shrink in (False, True):
        options = PruneOptions(method="l1", amounts=(amount,), structured_shrink=shrink,
                               inputs=InputRequest(specs=inputs), repeats=repeats, warmup=3)
        report = prune.run(ModelRef.parse(model), options)
        rows.append(row(model, report))
    return rows


def row(model: str, report: PruneReport) -> tuple[str, ...]:
    result = report.results[0]
    latency = result.latency
    assert latency is not None
    variant = f"shrink {result.amount:g}" if report.structured_shrink else f"l1 zeros {result.amount:g}"
    macs = (f"{render.fmt_count(report.macs_before)} -> {render.fmt_count(result.macs)}" if result.macs is not None
            else "unchanged (dense)")
    return (model, variant, f"{render.fmt_count(report.parameters_before)} -> {render.fmt_count(result.parameters)}",
            macs, f"{render.fmt_bytes(report.size_before.raw_bytes)} -> {render.fmt_bytes(result.size.raw_bytes)}",
            f"{render.fmt_bytes(report.size_before.gzip_bytes)} -> {render.fmt_bytes(result.size.gzip_bytes)}",
            render.fmt_float(result.drift.max_abs), render.fmt_ms(latency.before.median_ms),
            render.fmt_ms(latency.after.median_ms), speed_change(latency))


SIZE_COLUMNS = ("method", "codec", "bytes compressed", "seconds", "MB/s of weights", "estimate", "vs exact gzip -1")


def size_estimate_rows(megabytes: int) -> list[tuple[str, ...]]:
    """Time the three ways of estimating the compressed size on one synthetic pruned state."""
    from mlops_cli.services.prune.sizes import weight_sizes

    generator = torch.Generator().manual_seed(0)
    state = {}
    for index in range(megabytes // 4):  # 4 MiB tensors, zeros as unstructured pruning leaves them
        tensor = torch.randn(1024, 1024, generator=generator) * 0.02
        tensor[torch.rand(tensor.shape, generator=generator) < 0.3] = 0
        state[f"layer{index}.weight"] = tensor
    variants = {"gzip -6, every byte (before)": {"level": 6, "sample_bytes": None},
                "gzip -1, every byte": {"sample_bytes": None}, "gzip -1, sampled (default)": {}}
    figures = {}
    for name, kwargs in variants.items():
        started = time.perf_counter()
        figures[name] = (weight_sizes(state, **kwargs), time.perf_counter() - started)  # type: ignore[arg-type]
    exact = figures["gzip -1, every byte"][0].gzip_bytes or 1
    rows: list[tuple[str, ...]] = []
    for name, (size, seconds) in figures.items():
        error = f"{(size.gzip_bytes or 0) / exact - 1:+.2%}" if size.codec == "gzip -1" else "-"
        rows.append((name, size.codec, f"{size.sampled_share:.1%}", f"{seconds:.2f}",
                     f"{size.raw_bytes / seconds / 1e6:.1f}", render.fmt_bytes(size.gzip_bytes), error))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--amount", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--models", nargs="*", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--size-mb", type=int, default=0,
                        help="measure the compressed-size estimate on a synthetic state of this many MiB instead")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.size_mb:
        render.stdout().print(render.table(f"Compressed-size estimate on {args.size_mb} MiB of fp32 weights, 30% "
                                           "zeros", SIZE_COLUMNS, size_estimate_rows(args.size_mb),
                                           numeric=SIZE_COLUMNS[2:]))
        return
    rows = [r for model in args.models for r in rows_for(model, WORKLOADS[model], args.amount, args.repeats)]
    console = render.stdout()
    console.print(render.table(f"Pruning at amount {args.amount:g}: zeros vs structural shrink "
                               f"(CPU, {torch.get_num_threads()} thread(s))", COLUMNS, rows,
                               numeric=COLUMNS[2:]))
    console.print(render.note("MACs counted by mlops_cli.core.flops on one forward at the input shape; latency: "
                              "A/B interleaved medians; drift: worst max |diff| over the parity input sets."))


if __name__ == "__main__":
    main()
