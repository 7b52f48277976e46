"""`mlops generate`: strategies, the explain table, our decoding loop against model.generate, metrics, options.

All on the built-in tiny GPT-2 (2 layers, hidden 32, trained on the bundled corpus). PROMPT starts no corpus
line: the model says a few words and then EOS, and past EOS (--fixed-length) it repeats itself a lot, which
makes the no-repeat-ngram check meaningful.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from mlops_cli.core.errors import InputError, UsageError
from mlops_cli.core.loading import load_model
from mlops_cli.services.decoding import DecodingParams, decode, logits_processors
from mlops_cli.services.generate import (
    GenerateOptions,
    decoding_params,
    generate,
    generation_config,
    prepare,
    run_once,
)

PROMPT = "The model is exported to ONNX and"
TINY = "builtin:tiny-gpt2"


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Any:
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core box spinning threads make each
    step 10x slower; restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def gpt2() -> Any:
    return load_model(TINY)


def options(**overrides: Any) -> GenerateOptions:
    base = GenerateOptions(prompts=(PROMPT,), max_new_tokens=16, warmup=0, device="cpu")
    return replace(base, **overrides)


def ngrams(tokens: list[int], size: int) -> list[tuple[int, ...]]:
    return [tuple(tokens[i:i + size]) for i in range(len(tokens) - size + 1)]


# ---------------------------------------------------------------- strategies


def test_greedy_is_deterministic_and_equals_a_hand_written_argmax_loop(gpt2: Any) -> None:
    report = generate(gpt2, options(repeat=2, fixed_length=True))
    greedy = report.results[0]
    assert greedy.reproducible and greedy.metrics.runs == 2

    model, tokenizer = gpt2.module, gpt2.tokenizer
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():  # the tips' loop: full forward each step, no cache, argmax of the last position
        for _ in range(16):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=-1)
    prompt_length = len(tokenizer(PROMPT).input_ids)
    assert list(greedy.outputs[0].new_token_ids) == ids[0, prompt_length:].tolist()
    assert generate(gpt2, options(fixed_length=True)).results[0].outputs == greedy.outputs


def test_sampling_with_a_seed_repeats_and_another_seed_differs(gpt2: Any) -> None:
    first = generate(gpt2, options(strategy="sample", seed=7, repeat=2)).results[0]
    again = generate(gpt2, options(strategy="sample", seed=7)).results[0]
    other = generate(gpt2, options(strategy="sample", seed=8)).results[0]
    assert first.reproducible
    assert first.outputs[0].new_token_ids == again.outputs[0].new_token_ids
    assert first.outputs[0].new_token_ids != other.outputs[0].new_token_ids
    assert first.settings["do_sample"] and first.settings["top_k"] == 50


@pytest.mark.parametrize("strategy", ["greedy", "beam", "sample", "beam-sample"])
def test_no_repeat_ngram_size_means_no_ngram_occurs_twice(gpt2: Any, strategy: str) -> None:
    plain = generate(gpt2, options(strategy=strategy, max_new_tokens=24, fixed_length=True)).results[0]
    guarded = generate(gpt2, options(strategy=strategy, max_new_tokens=24, fixed_length=True,
                                     no_repeat_ngram_size=2)).results[0]
    prompt_ids = gpt2.tokenizer(PROMPT).input_ids
    if strategy == "greedy":  # the trap is real: without the option this model repeats bigrams
        plain_grams = ngrams(prompt_ids + list(plain.outputs[0].new_token_ids), 2)
        assert len(plain_grams) != len(set(plain_grams))
    grams = ngrams(prompt_ids + list(guarded.outputs[0].new_token_ids), 2)
    assert len(grams) == len(set(grams)), "a bigram occurs twice (prompt included)"


def test_strategy_all_gives_one_result_per_strategy_on_the_same_prompt_and_seed(gpt2: Any) -> None:
    report = generate(gpt2, options(strategy="all", seed=3))
    assert [r.strategy for r in report.results] == ["greedy", "beam", "sample", "beam-sample"]
    assert {r.settings["num_beams"] for r in report.results} == {1, 4}
    sample = next(r for r in report.results if r.strategy == "sample")
    alone = generate(gpt2, options(strategy="sample", seed=3)).results[0]
    assert sample.outputs == alone.outputs


def test_explain_chooses_the_greedy_tokens_with_candidates_in_probability_order(gpt2: Any) -> None:
    report = generate(gpt2, options(explain=True, candidates=4, repetition_penalty=1.3))
    explanation, greedy = report.explanation, report.results[0]
    assert explanation.matches_greedy is True
    assert [s.chosen.token_id for s in explanation.steps] == list(greedy.outputs[0].new_token_ids)
    for step in explanation.steps:
        probabilities = [c.probability for c in step.candidates]
        assert len(step.candidates) == 4 and probabilities == sorted(probabilities, reverse=True)
        assert step.candidates[0].token_id == step.chosen.token_id
        assert 0 < sum(probabilities) <= 1.0 + 1e-6
    assert explanation.text == greedy.outputs[0].text


# ---------------------------------------------------------------- our loop against model.generate


@pytest.mark.parametrize("strategy,extra", [
    ("greedy", {}),
    ("greedy", {"repetition_penalty": 1.3, "no_repeat_ngram_size": 2}),
    ("sample", {}),
    ("sample", {"temperature": 0.7, "top_k": 20, "top_p": 0.9, "repetition_penalty": 1.2, "no_repeat_ngram_size": 3}),
])
def test_loop_engine_is_token_for_token_model_generate(gpt2: Any, strategy: str, extra: dict[str, Any]) -> None:
    session = prepare(gpt2, options(strategy=strategy, max_new_tokens=24, seed=5, **extra))
    reference = run_once(session, strategy, "generate").sequences
    ours = run_once(session, strategy, "loop").sequences
    assert torch.equal(ours, reference)


def test_loop_engine_matches_on_a_left_padded_batch(gpt2: Any) -> None:
    prompts = (PROMPT, "a", "hello there, how are you")
    for strategy in ("greedy", "sample"):
        session = prepare(gpt2, options(prompts=prompts, strategy=strategy, seed=1, repetition_penalty=1.2))
        assert session.attention_mask.sum() < session.attention_mask.numel()  # really padded
        assert torch.equal(run_once(session, strategy, "loop").sequences,
                           run_once(session, strategy, "generate").sequences)


def test_loop_engine_matches_with_stop_strings_on_a_model_without_eos(gpt2: Any) -> None:
    loaded = load_model(TINY)
    loaded.module.generation_config.eos_token_id = None  # generate then leaves finished rows unpadded
    prompts = (PROMPT, "hello there, how are you")
    free = generate(loaded, options(prompts=prompts, max_new_tokens=12)).results[0].outputs[0]
    stop = gpt2.tokenizer.decode(free.new_token_ids[6:8])  # ends the first row early, not the second
    session = prepare(loaded, options(prompts=prompts, stop=(stop,), max_new_tokens=12))
    reference = run_once(session, "greedy", "generate").sequences
    assert torch.equal(run_once(session, "greedy", "loop").sequences, reference)
    first, _ = generate(loaded, options(prompts=prompts, stop=(stop,), max_new_tokens=12)).results[0].outputs
    assert first.stop_reason == "stop string" and first.new_tokens <= 8


def test_loop_processors_are_generates_in_the_same_order(gpt2: Any) -> None:
    session = prepare(gpt2, options(strategy="sample", temperature=0.7, top_k=20, top_p=0.9, repetition_penalty=1.2,
                                    no_repeat_ngram_size=3))
    theirs = gpt2.module._get_logits_processor(generation_config=generation_config(session, "sample"),
                                               input_ids_seq_length=8, device="cpu", model_kwargs={})
    ours = logits_processors(decoding_params(session, "sample"))
    assert [type(p).__name__ for p in ours] == [type(p).__name__ for p in theirs] == [
        "RepetitionPenaltyLogitsProcessor", "NoRepeatNGramLogitsProcessor", "TemperatureLogitsWarper",
        "TopKLogitsWarper", "TopPLogitsWarper"]


def test_loop_engine_refuses_a_generation_config_it_cannot_reproduce() -> None:
    loaded = load_model(TINY)
    loaded.module.generation_config.suppress_tokens = [5]
    for loop_based in ({"engine": "loop"}, {"explain": True}):
        with pytest.raises(UsageError, match=r"would not match model\.generate"):
            generate(loaded, options(**loop_based))
    assert generate(loaded, options(fixed_length=True)).results[0].outputs[0].new_tokens == 16  # generate handles it


def test_decode_stops_every_row_at_eos_and_pads_after_it(gpt2: Any) -> None:
    session = prepare(gpt2, options(prompts=(PROMPT, "a"), max_new_tokens=12))
    free = decode(gpt2.module, session.input_ids, session.attention_mask,
                  DecodingParams(max_new_tokens=12, pad_token_id=0))
    length = session.input_ids.shape[1]
    rows = [row[length:] for row in free.tolist()]
    eos = next(t for i, t in enumerate(rows[0]) if i > 0 and t not in rows[0][:i])  # pretend it is EOS
    stopped = decode(gpt2.module, session.input_ids, session.attention_mask,
                     DecodingParams(max_new_tokens=12, eos_token_ids=(eos,), pad_token_id=799))
    for free_row, row in zip(rows, stopped[:, length:].tolist(), strict=True):
        end = free_row.index(eos) + 1 if eos in free_row else len(free_row)
        assert row[:end] == free_row[:end]
        assert set(row[end:]) <= {799}
    assert len(stopped[0]) - length <= max(r.index(eos) + 1 if eos in r else 12 for r in rows)


# ---------------------------------------------------------------- lengths, stops, streaming, metrics


def test_fixed_length_ignores_eos_and_gives_exactly_max_new_tokens() -> None:
    loaded = load_model(TINY)
    free = generate(loaded, options(max_new_tokens=12, fixed_length=True)).results[0].outputs[0]
    step = next(i for i, t in enumerate(free.new_token_ids) if i > 0 and t not in free.new_token_ids[:i])
    loaded.module.generation_config.eos_token_id = free.new_token_ids[step]  # greedy now meets EOS there
    stopped = generate(loaded, options(max_new_tokens=12)).results[0]
    assert stopped.outputs[0].new_tokens == step + 1 and stopped.outputs[0].stop_reason == "eos"
    for engine in ("generate", "loop"):
        fixed = generate(loaded, options(max_new_tokens=12, fixed_length=True, engine=engine)).results[0]
        assert fixed.outputs[0].new_tokens == 12 and fixed.fixed_length_ok is True
        assert fixed.outputs[0].new_token_ids == free.new_token_ids


def test_a_stop_string_ends_generation_on_both_engines(gpt2: Any) -> None:
    free = generate(gpt2, options(max_new_tokens=20)).results[0].outputs[0]
    assert free.stop_reason == "eos" and free.new_tokens > 5
    stop = gpt2.tokenizer.decode(free.new_token_ids[3:5])  # a string the greedy text reaches at token 5, before EOS
    for engine in ("generate", "loop"):
        stopped = generate(gpt2, options(max_new_tokens=20, stop=(stop,), engine=engine)).results[0].outputs[0]
        assert stopped.stop_reason == "stop string" and stop in PROMPT + stopped.text
        assert stopped.new_tokens <= 5 and free.new_token_ids[:stopped.new_tokens] == stopped.new_token_ids
        assert stop not in PROMPT + gpt2.tokenizer.decode(stopped.new_token_ids[:-1])  # it stopped at once


@pytest.mark.parametrize("engine", ["generate", "loop"])
def test_streamed_text_is_the_generated_text_without_the_prompt(gpt2: Any, engine: str) -> None:
    pieces: list[tuple[str, str | None]] = []
    report = generate(gpt2, options(stream=True, engine=engine, strategy="sample", warmup=1,
                                    on_text=lambda strategy, piece: pieces.append((strategy, piece))))
    assert pieces[-1] == ("sample", None) and [p for p in pieces if p[1] is None] == [("sample", None)]
    streamed = "".join(piece for _, piece in pieces if piece)
    assert streamed == report.results[0].outputs[0].text  # a streamer's first put() is the prompt: skipped


@pytest.mark.parametrize("engine", ["generate", "loop"])
def test_metrics_are_consistent(gpt2: Any, engine: str) -> None:
    result = generate(gpt2, options(max_new_tokens=10, fixed_length=True, repeat=3, engine=engine)).results[0]
    metrics = result.metrics
    assert metrics.runs == 3 and metrics.prompt_tokens == len(gpt2.tokenizer(PROMPT).input_ids)
    assert metrics.new_tokens == 10
    assert metrics.token_latency.repeats == 3 * 9  # first token excluded from per-token latency
    assert 0 < metrics.ttft.median_ms < metrics.total.median_ms
    assert metrics.decode_tokens_per_s > 0
    assert metrics.decode_tokens_per_s_min <= metrics.decode_tokens_per_s <= metrics.decode_tokens_per_s_max
    assert metrics.peak_memory_bytes is not None and metrics.peak_memory_bytes >= 0


def test_beam_search_is_timed_per_step_too(gpt2: Any) -> None:
    session = prepare(gpt2, options(strategy="beam", max_new_tokens=8, fixed_length=True))
    record = run_once(session, "beam")
    assert len(record.ticks) == 8 and record.start < record.ticks[0] <= record.end


def test_batch_from_prompts_file(gpt2: Any, tmp_path: Path) -> None:
    from mlops_cli.services.generate import read_prompts

    file = tmp_path / "prompts.txt"
    file.write_text("first prompt\n\nsecond, longer prompt here\n", encoding="utf-8")
    prompts = read_prompts(file)
    assert prompts == ("first prompt", "second, longer prompt here")
    result = generate(gpt2, options(prompts=prompts, fixed_length=True, max_new_tokens=6)).results[0]
    assert [o.prompt for o in result.outputs] == list(prompts)
    assert result.metrics.new_tokens == 12
    alone = generate(gpt2, options(prompts=prompts[1:], fixed_length=True, max_new_tokens=6)).results[0]
    assert alone.outputs[0].new_token_ids == result.outputs[1].new_token_ids  # padding changes nothing


# ---------------------------------------------------------------- options and errors


@pytest.mark.parametrize("overrides,message", [
    ({"engine": "loop", "strategy": "beam"}, "greedy and sampling only"),
    ({"compile": True}, "--compile needs --cache static"),
    ({"fixed_length": True, "stop": ("x",)}, "contradict"),
    ({"temperature": 0.0}, "--temperature"),
    ({"top_p": 1.5}, "--top-p"),
    ({"max_new_tokens": 500}, "positions"),
    ({"chat": True}, "no chat template"),
])
def test_bad_options_are_usage_errors(gpt2: Any, overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        generate(gpt2, options(**overrides))


def test_a_model_that_cannot_generate_is_refused() -> None:
    with pytest.raises(InputError, match="not a text-generation model"):
        generate(load_model("builtin:tiny-bert"), options())


def test_half_precision_and_static_cache_on_cpu_say_what_they_mean(gpt2: Any) -> None:
    report = generate(load_model(TINY), options(dtype="bf16", cache="static", compile=True, max_new_tokens=4))
    assert report.cache == "dynamic" and report.compiled is False
    assert any("bf16 on CPU" in w for w in report.warnings) and any("bring nothing" in w for w in report.warnings)


def test_command_shows_the_report_warnings_once(cli: Any) -> None:
    args = ("generate", TINY, "-p", PROMPT, "--dtype", "bf16", "--max-new-tokens", "2", "--warmup", "0",
            "--device", "cpu")
    as_json = cli(*args, "--json")
    assert as_json.exit_code == 0, as_json.stderr
    assert any("bf16 on CPU" in w for w in as_json.json()["warnings"]) and "warning" not in as_json.stderr
    tables = cli(*args)
    assert tables.exit_code == 0 and tables.stderr.count("warning: --dtype bf16 on CPU") == 1


def test_run_loads_the_reference_and_checks_options_first(zoo_dir: Path) -> None:
    from mlops_cli.core.contract import ModelRef
    from mlops_cli.services.generate import run

    report = run(ModelRef.parse(str(zoo_dir / "tiny-gpt2")), options(max_new_tokens=3, fixed_length=True))
    assert report.results[0].outputs[0].new_tokens == 3 and report.warnings == ()
    with pytest.raises(UsageError, match="--top-p"):
        run(ModelRef.parse("no/such/model"), options(top_p=2.0))  # refused before loading (which would fail)


def test_chat_template_wraps_the_prompt(zoo_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "chat-gpt2"
    shutil.copytree(zoo_dir / "tiny-gpt2", folder)
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["chat_template"] = "{% for m in messages %}<{{ m.role }}>: {{ m.content }}\n{% endfor %}<assistant>:"
    config_file.write_text(json.dumps(config), encoding="utf-8")
    loaded = load_model(str(folder))
    plain = generate(loaded, options(max_new_tokens=4)).results[0].metrics.prompt_tokens
    chat = generate(loaded, options(max_new_tokens=4, chat=True)).results[0].metrics.prompt_tokens
    assert chat > plain


def test_seq2seq_models_generate_with_the_generate_engine(tmp_path: Path) -> None:
    from transformers import BartConfig, BartForConditionalGeneration

    from mlops_cli.core import zoo

    tokenizer = zoo.gpt2_tokenizer()
    eos = tokenizer.convert_tokens_to_ids(zoo.BPE_SPECIAL)
    torch.manual_seed(0)
    config = BartConfig(vocab_size=len(tokenizer), d_model=16, encoder_layers=1, decoder_layers=1,
                        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
                        max_position_embeddings=64, pad_token_id=eos, bos_token_id=eos, eos_token_id=eos,
                        decoder_start_token_id=eos, forced_eos_token_id=None)
    BartForConditionalGeneration(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    result = generate(loaded, options(max_new_tokens=6, fixed_length=True)).results[0]
    assert result.outputs[0].new_tokens == 6 and result.metrics.ttft is not None
    for refused in ({"engine": "loop"}, {"explain": True}):
        with pytest.raises(UsageError, match="decoder-only"):
            generate(loaded, options(**refused))


# ---------------------------------------------------------------- the command


def test_command_json_strategy_all(cli: Any) -> None:
    result = cli("generate", TINY, "--prompt", PROMPT, "--strategy", "all", "--max-new-tokens", "6", "--warmup", "0",
                 "--device", "cpu", "--explain", "--json")
    assert result.exit_code == 0, result.stderr
    report = result.json()
    assert [r["strategy"] for r in report["results"]] == ["greedy", "beam", "sample", "beam-sample"]
    metrics = report["results"][0]["metrics"]
    assert {"ttft", "decode_tokens_per_s", "token_latency", "total", "peak_memory_bytes"} <= set(metrics)
    assert report["explanation"]["matches_greedy"] is True and len(report["explanation"]["steps"]) == 6


def test_command_tables_and_engine_loop(cli: Any) -> None:
    result = cli("generate", TINY, "-p", PROMPT, "--engine", "loop", "--max-new-tokens", "5", "--warmup", "0",
                 "--device", "cpu", "--explain", "--candidates", "3")
    assert result.exit_code == 0, result.stderr
    assert "results" in result.stdout and "explain: greedy step by step" in result.stdout
    assert "loop" in result.stdout and "TTFT" in result.stdout


def _narrow(*args: str) -> Any:
    """The command at 80 columns (CI logs, pipes): the `cli` fixture runs at 160."""
    from typer.testing import CliRunner

    from mlops_cli.app import app

    return CliRunner().invoke(app, list(args), env={"COLUMNS": "80", "NO_COLOR": "1"})


def _texts_column(stdout: str) -> dict[str, str]:
    """The `texts` table read back: strategy -> its generated text, wrapped lines joined by one space."""
    texts: dict[str, list[str]] = {}
    strategy = ""
    in_table = False
    for line in stdout.splitlines():
        in_table = in_table or line.startswith("texts")
        cells = [cell.strip() for cell in line.split("│")[1:-1]]
        if not in_table or len(cells) < 3:
            continue
        strategy = cells[0] or strategy
        texts.setdefault(strategy, []).append(cells[-1])
    return {name: " ".join(piece for piece in pieces if piece) for name, pieces in texts.items()}


@pytest.mark.parametrize("strategy", ["greedy", "all"])
def test_command_at_80_columns_shows_every_generated_text_within_the_width(cli: Any, strategy: str) -> None:
    args = [TINY, "--prompt", "The model", "--strategy", strategy, "--max-new-tokens", "12", "--warmup", "0",
            "--device", "cpu"]
    reference = cli("generate", *args, "--json")
    assert reference.exit_code == 0, reference.stderr
    result = _narrow("generate", *args)
    assert result.exit_code == 0, result.stderr
    from rich.cells import cell_len

    assert max(cell_len(line) for line in result.stdout.splitlines()) <= 80
    assert "peak mem" in result.stdout and "total" in result.stdout  # the last figure columns are not cut off
    shown = _texts_column(result.stdout)
    expected = {r["strategy"]: r["outputs"][0]["text"] for r in reference.json()["results"]}
    assert set(shown) == set(expected)
    greedy = expected["greedy"]
    assert greedy.split() and shown["greedy"].split() == greedy.split()  # the whole text, every word
    for name, text in shown.items():
        assert text, f"{name}: empty text column"


@pytest.mark.parametrize("spelling", ["--repeat", "--repeats"])
def test_command_accepts_both_repeat_spellings(cli: Any, spelling: str) -> None:
    result = cli("generate", TINY, "-p", PROMPT, "--max-new-tokens", "3", "--warmup", "0", "--device", "cpu",
                 spelling, "2", "--json")
    assert result.exit_code == 0, result.stderr
    assert result.json()["results"][0]["metrics"]["runs"] == 2


def test_command_stream_prints_text_before_the_tables(cli: Any) -> None:
    result = cli("generate", TINY, "-p", PROMPT, "--stream", "--max-new-tokens", "5", "--device", "cpu")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith("greedy: ") and result.stdout.index("greedy: ") < result.stdout.index("results")


@pytest.mark.parametrize("args,code,words", [
    (["--prompt", "x", "--prompts", "p.txt"], 2, "either --prompt or --prompts"),
    (["--prompt", "x", "--stream", "--json"], 2, "--json"),
    (["--prompt", "x", "--engine", "loop", "--strategy", "beam"], 2, "--engine loop"),
    (["--prompts", "missing-file.txt"], 3, "could not be read"),
])
def test_command_errors(cli: Any, args: list[str], code: int, words: str) -> None:
    result = cli("generate", TINY, *args)
    assert result.exit_code == code
    assert words in result.stderr


def test_command_refuses_a_model_without_generation(cli: Any) -> None:
    result = cli("generate", "builtin:convnet", "--prompt", "x")
    assert result.exit_code == 3 and "not a text-generation model" in result.stderr


def test_help_states_what_no_repeat_ngram_size_and_ttft_mean(cli: Any) -> None:
    result = cli("generate", "--help")
    assert result.exit_code == 0
    text = " ".join(result.stdout.split())
    assert "occurs twice" in text and "first *generated* token" in text


def test_peak_memory_without_a_resettable_counter_is_sampled_never_a_zero(monkeypatch) -> None:
    """Issue #14: the ru_maxrss fallback printed 'peak mem 0 B' for a run that stayed under an earlier peak."""
    import numpy as np

    from mlops_cli.services import generate_measure

    monkeypatch.setattr(generate_measure, "_reset_peak_rss", lambda: False)
    probe = generate_measure.MemoryProbe(cuda=False)
    assert "sampled" in probe.kind
    probe.begin()
    block = np.ones(32 * 1024 * 1024, dtype=np.uint8)
    block[::4096] = 3
    import time

    time.sleep(0.02)
    peak = probe.peak()
    del block
    assert peak is not None and peak >= 24 * 1024 * 1024
