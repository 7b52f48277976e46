"""Benchmark decoding on ONNX Runtime (KV-cache export) against PyTorch eager `model.generate`.

A Llama-class model of SmolLM-135M's shape (hidden 576, 30 layers, 9 heads, 3 KV heads, intermediate 1536,
vocab 49152; random weights, built locally) is exported with `export_with_past`, then both sides decode the
same prompt greedily, interleaved (ONNX, PyTorch, ONNX, PyTorch... so machine noise hits both alike), one
thread each, a fixed number of new tokens (EOS ignored). Printed per side: TTFT and decode tokens/s (tokens
after the first / time from the first token to the last, as `mlops generate` defines it), medians over the
measured runs, and the ratio ONNX / PyTorch; also whether both produced the same tokens. On a shared machine
the wall-clock figures swing with the load: the process CPU time per call (one thread each side, ONNX Runtime
without spinning threads) is printed too and is the steadier comparison.

`--int4` adds the decoder quantised by `services/onnx_lm/int4.py` (MatMulNBits, `--block-size`) as a third
side, with the file sizes and the perplexity of both graphs on the bundled corpus (tokenised with the zoo's
GPT-2 tokenizer, whose ids are valid in this vocabulary; with random weights the perplexity itself means
nothing, its change says how much the quantisation moved the logits).

    .venv/bin/python benchmarks/bench_onnx_lm.py            # SmolLM-135M shape
    .venv/bin/python benchmarks/bench_onnx_lm.py --small    # 4 layers, hidden 256: a quick run
    .venv/bin/python benchmarks/bench_onnx_lm.py --int4 --block-size 32
    .venv/bin/python benchmarks/bench_onnx_lm.py --accuracy-levels 0,4 --repeat 3   # int4 per accuracy level
    .venv/bin/python benchmarks/bench_onnx_lm.py --accuracy-levels 0,4 --bits 8     # int8 weight-only
    .venv/bin/python benchmarks/bench_onnx_lm.py --genai --genai-int4 --repeat 3

`--genai` adds ONNX Runtime GenAI (`export onnx --engine genai`): the model saved as an HF folder, built by the
runtime's model builder (fp32; `--genai-int4`: its weight-only int4), run by `og.Generator`'s own greedy search
with one intra-op thread (EOS ignored through min_length), interleaved with the other sides.

Measured (2026-12-01, 2 shared CPU cores, 1 thread per side, 32-token prompt, 64 new tokens, fp32, onnxruntime
1.32, torch 2.13, transformers 5.24; medians of 3-5 interleaved runs): export 11-53 s (load-dependent), 653 MB
(the tied LM head is stored twice); same greedy tokens on both sides.
- ONNX fp32 / torch generate, decode tokens/s: 1.07, 1.08, 1.22 on three runs (12-14 vs 9-12 tokens/s);
  CPU time per token 1.12-1.32x less. Decoding this size is bound by reading the weights, so fp32 gains little.
- int4 (block 32, 211 MatMulNBits): 653 MB -> 199 MB (0.30x; the fp32 embedding stays); perplexity on the
  corpus +1.1% (random weights: only the change means something); decode 2.04x torch (accuracy level
  default), 3.06x with --accuracy-level 4 (int8 compute), 22.7 / 35.6 tokens/s.
- `--accuracy-levels 0,4 --repeat 3` (2026-12-01, same machine, heavily shared: load average 5-6 on 2 cores):
  perplexity change +1.13% (level 0, ONNX Runtime's default) vs +1.18% (level 4), greedy agreement 44.6% on both
  (random weights); decode 2.19x vs 2.99x torch (12.4 / 17.0 tokens/s against 5.7), CPU time per token 2.14x vs
  2.67x less. Level 4 is therefore `compress int4`'s default.
- `--accuracy-levels 0,4 --bits 8 --repeat 3` (int8 weight-only, `compress int8 --weight-only`; same day, same
  load): 653 MB -> 266 MB (0.41x; the fp32 embedding stays), perplexity -0.02% (level 0) / -0.08% (level 4),
  greedy agreement 94.7% / 93.7%; decode 0.14x torch at level 0 (1.3 tokens/s: no fast 8-bit kernel with float
  compute) and 2.12x at level 4 (19.5 against 9.2 tokens/s; CPU time per token 2.71x less). Level 4 is not optional
  for 8 bits: `--weight-only` always uses it.
- ONNX Runtime GenAI (onnxruntime-genai 0.18; three runs: `--genai --genai-int4 --repeat 3`, `--genai --repeat 5`,
  `--genai --genai-int4 --repeat 3`; load average 4-4.5 on the 2 cores, other benchmarks running): build 1.7-6.9 s
  (539 MB, the tied head stored once) against the torch export's 23-56 s; same greedy tokens as torch. fp32
  decode vs our loop on the torch export: 0.88x, 1.38x, 1.46x wall clock (6.6 vs 7.5, 10.6 vs 7.7, 11.9 vs 8.2
  tokens/s), CPU time per token 1.09x, 1.34x, 1.28x less (43.9 vs 47.8, 40.2 vs 53.9, 42.1 vs 53.9 ms); vs torch
  generate 1.83x, 1.68x, 1.72x; TTFT 354 vs 247, 245 vs 287, 220 vs 258 ms. `--small` (4.9M parameters): 1.59-1.85x
  our loop, 4.2-4.3x torch. The builder's int4 (85 MB): 32.6 and 41.8 tokens/s = 9.0x and 6.0x torch fp32 decode
  (4.4-4.6x less CPU per token); perplexity on the corpus +1.25% against the genai fp32 folder (random weights:
  only the change means something). Hence `--engine auto` builds the genai folder for the families the builder
  supports.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from mlops_cli.services.decoding import DecodingParams
from mlops_cli.services.generate_measure import ClockCriterion, RunRecord, StepClock, run_metrics
from mlops_cli.services.onnx_lm.export_with_past import export_with_past
from mlops_cli.services.onnx_lm.generate_onnx import OnnxDecoder, onnx_decode

SMOLLM_135M = {"hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
               "intermediate_size": 1536, "vocab_size": 49152}
SMALL = {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2,
         "intermediate_size": 688, "vocab_size": 8192}


def llama(shape: dict[str, int]) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**shape, max_position_embeddings=2048, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


def onnx_run(decoder: OnnxDecoder, input_ids: torch.Tensor, new_tokens: int) -> RunRecord:
    clock = StepClock(cuda=False)
    clock.begin()
    sequences = onnx_decode(decoder, input_ids, None, DecodingParams(max_new_tokens=new_tokens),
                            observers=[lambda *_: clock.tick()])
    return RunRecord(sequences, clock.start, clock.ticks, time.perf_counter(), None)


def torch_run(model: Any, input_ids: torch.Tensor, new_tokens: int) -> RunRecord:
    from transformers import StoppingCriteriaList

    clock = StepClock(cuda=False)
    clock.begin()
    with torch.inference_mode():
        sequences = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                                   max_new_tokens=new_tokens, min_new_tokens=new_tokens, eos_token_id=None,
                                   pad_token_id=0, stopping_criteria=StoppingCriteriaList([ClockCriterion(clock)]))
    return RunRecord(sequences, clock.start, clock.ticks, time.perf_counter(), None)


def genai_run(model: Any, input_ids: torch.Tensor, new_tokens: int) -> RunRecord:
    """ONNX Runtime GenAI's own greedy search (EOS ignored through min_length), ticking after each token."""
    from mlops_cli.services.onnx_lm.genai import new_generator, token_array

    prompt = input_ids[0].tolist()
    total = len(prompt) + new_tokens
    clock = StepClock(cuda=False)
    clock.begin()
    generator = new_generator(model, total, do_sample=False, min_length=total)
    generator.append_tokens(token_array([prompt]))
    while not generator.is_done():
        generator.generate_next_token()
        clock.tick()
    end = time.perf_counter()
    return RunRecord(torch.tensor([[int(t) for t in generator.get_sequence(0)]]), clock.start, clock.ticks, end, None)


def build_genai(model: Any, scratch: Path, precision: str) -> Any:
    """The genai folder of `model` (saved as an HF folder first), opened with one intra-op thread."""
    from mlops_cli.core import zoo
    from mlops_cli.services.onnx_lm.genai import open_model, read_genai_folder
    from mlops_cli.services.onnx_lm.genai_export import build

    source = scratch / "hf"
    model.save_pretrained(source)
    zoo.gpt2_tokenizer().save_pretrained(source)  # the builder copies a tokenizer; its ids are valid here
    start = time.perf_counter()
    folder = scratch / f"genai-{precision}"
    build(source, folder, precision, "llama", "LlamaForCausalLM", scratch / "cache")
    size = sum(p.stat().st_size for p in folder.iterdir() if p.suffix in (".onnx", ".data"))
    print(f"genai build ({precision}): {time.perf_counter() - start:.1f} s, {size / 1e6:.0f} MB")
    return open_model(read_genai_folder(folder), threads=1)


def genai_perplexity(fp32: Any, int4: Any) -> None:
    """Perplexity of the genai fp32 and int4 folders on the bundled corpus (window 128, stride 64, 512 tokens)."""
    import functools

    from mlops_cli.core import zoo
    from mlops_cli.services.onnx_lm.genai import pass_logits
    from mlops_cli.services.perplexity import EvaluationText, PerplexityProbe

    probe = PerplexityProbe.of(EvaluationText(), functools.partial(pass_logits, fp32), zoo.gpt2_tokenizer())
    result = probe.compare(functools.partial(pass_logits, int4))
    print(f"genai int4: perplexity {result.before:.1f} -> {result.after:.1f} "
          f"({100 * result.relative_change:+.2f}%), greedy agreement {100 * result.greedy_agreement:.1f}%")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="a 4-layer model instead of SmolLM-135M's shape")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--int4", action="store_true", help="also the int4 (MatMulNBits) decoder")
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--accuracy-level", type=int, default=4,
                        help="MatMulNBits compute type (4: int8, the CLI's default on CPU; 0: ONNX Runtime's default)")
    parser.add_argument("--bits", type=int, default=4, choices=(4, 8),
                        help="MatMulNBits weight bits for --accuracy-levels (8: `compress int8 --weight-only`)")
    parser.add_argument("--accuracy-levels", default=None,
                        help="compare int4 decoders at these accuracy levels, e.g. 0,4 (one side each; implies --int4)")
    parser.add_argument("--genai", action="store_true", help="also ONNX Runtime GenAI's builder folder + og.Generator")
    parser.add_argument("--genai-int4", action="store_true", help="also the builder's int4 folder")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    shape = SMALL if args.small else SMOLLM_135M
    model = llama(shape)
    parameters = sum(p.numel() for p in model.parameters())
    print(f"model: Llama {shape}, {parameters / 1e6:.1f}M parameters, fp32, 1 thread")
    prompt = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, shape["vocab_size"], (1, args.prompt_tokens), generator=prompt)
    with tempfile.TemporaryDirectory() as scratch:
        start = time.perf_counter()
        written = export_with_past(model, Path(scratch) / "decoder.onnx")
        size = written.path.stat().st_size
        print(f"export: {time.perf_counter() - start:.1f} s, {size / 1e6:.0f} MB")
        decoder = OnnxDecoder(written.path, threads=1)
        sides = {"onnxruntime": lambda: onnx_run(decoder, input_ids, args.new_tokens),
                 "torch generate": lambda: torch_run(model, input_ids, args.new_tokens)}
        if args.genai:
            genai = build_genai(model, Path(scratch), "fp32")
            sides["genai"] = lambda: genai_run(genai, input_ids, args.new_tokens)
        if args.genai_int4:
            genai4 = build_genai(model, Path(scratch), "int4")
            sides["genai int4"] = lambda: genai_run(genai4, input_ids, args.new_tokens)
            if args.genai:
                genai_perplexity(genai, genai4)
        if args.accuracy_levels:
            sides.update(int4_level_sides(written.path, args.block_size, args.accuracy_levels, input_ids,
                                          args.new_tokens, args.bits))
        elif args.int4:
            int4 = OnnxDecoder(quantize(written.path, args.block_size, args.accuracy_level), threads=1)
            sides["onnxruntime int4"] = lambda: onnx_run(int4, input_ids, args.new_tokens)
        records: dict[str, list[RunRecord]] = {name: [] for name in sides}
        cpu_seconds: dict[str, list[float]] = {name: [] for name in sides}
        for index in range(args.warmup + args.repeat):
            for name, run_side in sides.items():
                cpu = time.process_time()
                record = run_side()
                if index >= args.warmup:
                    records[name].append(record)
                    cpu_seconds[name].append(time.process_time() - cpu)
    rates: dict[str, float] = {}
    cpu_per_token: dict[str, float] = {}
    ttfts: dict[str, float] = {}
    for name, runs in records.items():
        metrics = [run_metrics(r, args.new_tokens, 1) for r in runs]
        tps = [m.decode_tokens_per_s for m in metrics if m.decode_tokens_per_s]
        ttft = [m.ttft_ms for m in metrics if m.ttft_ms is not None]
        rates[name] = statistics.median(tps)
        ttfts[name] = statistics.median(ttft)
        cpu_ms = 1000 * statistics.median(cpu_seconds[name]) / args.new_tokens
        print(f"{name:16s} decode {rates[name]:7.1f} tokens/s (min {min(tps):.1f}, max {max(tps):.1f}), "
              f"TTFT {statistics.median(ttft):7.1f} ms ({args.prompt_tokens}-token prompt), "
              f"CPU {cpu_ms:6.1f} ms per token (whole call)")
        cpu_per_token[name] = cpu_ms
    for name in rates:
        if name != "torch generate":
            print(f"ratio {name} / torch: decode tokens/s {rates[name] / rates['torch generate']:.2f}, "
                  f"CPU time per token {cpu_per_token['torch generate'] / cpu_per_token[name]:.2f}x less")
    if "genai" in rates:
        print(f"ratio genai / onnxruntime (our loop on the torch export): decode tokens/s "
              f"{rates['genai'] / rates['onnxruntime']:.2f}, TTFT {ttfts['onnxruntime'] / ttfts['genai']:.2f}x less")
    reference = records["torch generate"][0].sequences
    for name in rates:
        if name != "torch generate" and "int4" not in name:
            print(f"{name} and torch generated the same tokens: {torch.equal(records[name][0].sequences, reference)}")


def quantize(path: Path, block_size: int, accuracy_level: int | None, bits: int = 4) -> Path:
    """The int4 decoder beside `path`; prints sizes and perplexities (see the module docstring)."""
    from mlops_cli.core import zoo
    from mlops_cli.core.contract import ModelRef
    from mlops_cli.services.onnx_lm.int4 import Int4Options
    from mlops_cli.services.onnx_lm.int4 import run as int4_run
    from mlops_cli.services.perplexity import EvaluationText

    zoo.gpt2_tokenizer().save_pretrained(path.parent / "tokenizer")
    start = time.perf_counter()
    report = int4_run(ModelRef.parse(str(path)), Int4Options(
        output=path.with_name(f"decoder.int{bits}.level{accuracy_level or 0}.onnx"), force=True, bits=bits,
        block_size=block_size,
        accuracy_level=accuracy_level,
        tokenizer=path.parent / "tokenizer", evaluation=EvaluationText(max_tokens=512, window=128, stride=64)))
    quality = report.perplexity
    assert quality is not None
    print(f"int{bits} (accuracy level {accuracy_level or 'default'}): {time.perf_counter() - start:.1f} s "
          "(quantisation + 2 perplexity runs), "
          f"{report.quantized_matmuls} MatMulNBits, block {block_size}, "
          f"{report.size_before / 1e6:.0f} MB -> {report.size_after / 1e6:.0f} MB "
          f"({report.size_after / report.size_before:.2f}x); perplexity {quality.before:.1f} -> "
          f"{quality.after:.1f} ({100 * quality.relative_change:+.2f}%), greedy agreement "
          f"{100 * quality.greedy_agreement:.1f}%")
    return Path(report.output)


def int4_level_sides(path: Path, block_size: int, levels: str, input_ids: torch.Tensor, new_tokens: int,
                     bits: int = 4) -> dict[str, Any]:
    """One int4 decoder per MatMulNBits accuracy level (0: ONNX Runtime's default, float compute; 4: int8
    compute), each with its perplexity change printed, as sides decoding interleaved with the others."""
    sides = {}
    for level in (int(part) for part in levels.split(",")):
        decoder = OnnxDecoder(quantize(path, block_size, level, bits), threads=1)
        sides[f"int{bits} level {level}"] = (lambda d: lambda: onnx_run(d, input_ids, new_tokens))(decoder)
    return sides


if __name__ == "__main__":
    main()
