"""`mlops bench-tokenizers`: implementations built from the same files, agreement checks, figures, traps."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from mlops_cli.core.contract import ModelRef
from mlops_cli.services import bench_tokenizers
from mlops_cli.services.bench_tokenizers import (
    BenchTokenizersOptions,
    TokenizerBenchReport,
    compare_encoded,
    load_corpus,
)
from mlops_cli.services.bench_tokenizers.implementations import Encoded, load_suite, truncation_lengths

FAST = {"iterations": 2, "warmup": 0}
FIGURES = ("us_per_call", "texts_per_s", "tokens_per_s", "bytes_per_s", "median_ms", "speedup")


def run(tokenizer: str | Path, **settings: object) -> TokenizerBenchReport:
    options = BenchTokenizersOptions(**{**FAST, **settings})  # type: ignore[arg-type]
    return bench_tokenizers.run(ModelRef.parse(str(tokenizer)), options)


def agreement(report: TokenizerBenchReport, implementation: str, workload: str):
    return next(a for a in report.agreement if a.implementation == implementation and a.workload == workload)


def assert_figures_positive(report: TokenizerBenchReport) -> None:
    assert report.timings
    for timing in report.timings:
        for name in FIGURES:
            assert getattr(timing, name) > 0, (timing.workload, timing.implementation, name)
        assert timing.calls > 0 and timing.tokens > 0 and timing.bytes > 0
    for workload in {t.workload for t in report.timings}:
        speedups = [t.speedup for t in report.timings if t.workload == workload]
        assert min(speedups) == pytest.approx(1.0) and all(s >= 1.0 for s in speedups)


# ---------------------------------------------------------------- fixtures: locally built tokenizers


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny BERT WordPiece tokenizer saved as a Hugging Face folder (tokenizer.json + config)."""
    from mlops_cli.core import zoo

    folder = tmp_path_factory.mktemp("bert-tok")
    zoo.bert_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny GPT-2 byte-level BPE tokenizer: tokenizer.json + vocab.json + merges.txt."""
    from mlops_cli.core import zoo

    folder = tmp_path_factory.mktemp("gpt2-tok")
    zoo.gpt2_tokenizer().save_pretrained(folder)
    vocab, merges = zoo.bpe_vocab_and_merges()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
                                       encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def unigram_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SentencePiece Unigram model trained here on the bundled corpus (a few hundredths of a second)."""
    import sentencepiece

    from mlops_cli.core import zoo

    prefix = tmp_path_factory.mktemp("spm") / "unigram"
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(zoo.corpus_lines()), model_prefix=str(prefix), vocab_size=600, model_type="unigram",
        character_coverage=1.0, num_threads=1, minloglevel=2, hard_vocab_limit=False)
    return prefix.with_suffix(".model")


@pytest.fixture(scope="module")
def bert_report() -> TokenizerBenchReport:
    return run("builtin:tiny-bert", max_length=64)


# ---------------------------------------------------------------- WordPiece


def test_wordpiece_implementations_agree_and_figures_are_positive(bert_report: TokenizerBenchReport) -> None:
    names = [i.name for i in bert_report.implementations]
    assert names == ["transformers-python", "transformers", "tokenizers"]
    classes = {i.name: i.class_name for i in bert_report.implementations}
    assert classes["transformers-python"] == "BertTokenizerLegacy" and classes["transformers"] == "BertTokenizer"
    assert bert_report.reference == "transformers" and bert_report.model_type == "WordPiece"
    skipped = {s.name: s.reason for s in bert_report.skipped}
    assert "byte-level BPE" in skipped["tiktoken"] and ".model" in skipped["sentencepiece"]
    assert bert_report.agree, [(a.implementation, a.workload, a.examples[:1]) for a in bert_report.agreement
                               if a.mismatched]
    assert {a.workload for a in bert_report.agreement} == {"single", "pair", "batch", "decode"}
    assert all(a.checked == 67 for a in bert_report.agreement)
    assert_figures_positive(bert_report)
    assert {t.workload for t in bert_report.timings} == {"single", "pair", "batch", "decode"}
    batch = next(t for t in bert_report.timings if t.workload == "batch")
    assert batch.calls == 3 and batch.texts == 67  # 67 pairs in batches of 32


def test_python_bert_omits_token_type_ids_unless_asked(tmp_path: Path) -> None:
    from transformers import BertTokenizerLegacy

    from mlops_cli.core import zoo

    suite = load_suite(ModelRef.parse("builtin:tiny-bert"), tmp_path)
    python, rust = suite.get("transformers-python"), suite.get("transformers")
    assert isinstance(python.tokenizer, BertTokenizerLegacy)
    first, second = zoo.corpus_lines()[:2]
    assert "token_type_ids" not in python.tokenizer(first, second)  # the trap itself
    ours, reference = python.encoded(python.pair(first, second))[0], rust.encoded(rust.pair(first, second))[0]
    assert ours.token_type_ids is not None and ours == reference and 1 in ours.token_type_ids
    assert any("token_type_ids" in line for line in python.notes)
    # an implementation that drops them is a disagreement, not a pass
    missing = Encoded(reference.ids, reference.attention_mask, None)
    template = rust.template_ids()
    assert compare_encoded(reference, missing, template, template, full=True) == ("token_type_ids missing",)


def test_python_bert_breaks_longest_first_ties_differently() -> None:
    report = run("builtin:tiny-bert", max_length=16, workloads=("batch",))
    python, direct = agreement(report, "transformers-python", "batch"), agreement(report, "tokenizers", "batch")
    assert python.mismatched > 0 and direct.mismatched == 0
    example = python.examples[0]
    assert "ids" in example.fields and len(example.reference) == len(example.candidate) == 16
    assert report.disagreeing == ("transformers-python",) and not report.agree


@pytest.mark.parametrize(("first", "second", "budget"), [(10, 10, 13), (20, 5, 13), (5, 20, 13), (3, 3, 13),
                                                         (30, 10, 13), (10, 30, 12), (40, 40, 7), (7, 6, 13)])
def test_truncation_lengths_match_the_tokenizers_library(first: int, second: int, budget: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = {f"w{i}": i for i in range(50)}
    tokenizer = Tokenizer(models.WordLevel(words, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.enable_truncation(budget, strategy="longest_first")
    encoding = tokenizer.encode(" ".join(["w1"] * first), " ".join(["w2"] * second))
    assert truncation_lengths(first, second, budget) == (encoding.ids.count(1), encoding.ids.count(2))


def test_use_fast_false_returns_the_rust_class_and_the_python_one_is_built(bert_folder: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer, PreTrainedTokenizer, TokenizersBackend

    assert isinstance(AutoTokenizer.from_pretrained(bert_folder, use_fast=False), TokenizersBackend)  # the trap
    report = run(bert_folder, workloads=("single", "pair"))
    python = next(i for i in report.implementations if i.name == "transformers-python")
    assert python.class_name == "BertTokenizerLegacy" and python.backend == "Python"
    assert any("use_fast=False" in line for line in python.notes)
    assert any("extracted from tokenizer.json" in line for line in python.notes)
    suite = load_suite(ModelRef.parse(str(bert_folder)), tmp_path)
    assert isinstance(suite.get("transformers-python").tokenizer, PreTrainedTokenizer)
    assert report.agree


def test_modified_wordpiece_vocab_is_flagged(bert_folder: Path, tmp_path: Path) -> None:
    """vocab.txt edited next to an untouched tokenizer.json: the Python class reads one, Rust the other."""
    from mlops_cli.core import zoo

    folder = tmp_path / "edited"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((bert_folder / name).read_bytes())
    tokens = [t for t, _ in sorted(zoo.wordpiece_vocab().items(), key=lambda item: item[1])]
    a, b = tokens.index("天"), tokens.index("the")
    tokens[a], tokens[b] = tokens[b], tokens[a]
    (folder / "vocab.txt").write_text("".join(f"{t}\n" for t in tokens), encoding="utf-8")
    report = run(folder, workloads=("single", "pair"))
    assert agreement(report, "transformers-python", "single").mismatched > 0
    assert agreement(report, "tokenizers", "single").mismatched == 0
    example = agreement(report, "transformers-python", "single").examples[0]
    assert example.fields == ("ids",) and example.reference != example.candidate and example.text
    assert report.disagreeing == ("transformers-python",)


# ---------------------------------------------------------------- byte-level BPE


def test_bpe_has_no_python_class_and_tiktoken_agrees() -> None:
    report = run("builtin:tiny-gpt2")
    names = [i.name for i in report.implementations]
    assert names == ["transformers", "tokenizers", "tiktoken"]
    reason = next(s.reason for s in report.skipped if s.name == "transformers-python")
    assert "no pure-Python" in reason and "tiktoken" in reason
    assert report.agree and report.model_type == "BPE"
    tiktoken = next(i for i in report.implementations if i.name == "tiktoken")
    assert not tiktoken.adds_special_tokens
    assert_figures_positive(report)


def test_modified_bpe_vocab_is_flagged(gpt2_folder: Path, tmp_path: Path) -> None:
    """vocab.json with two ids swapped next to the original tokenizer.json: tiktoken (ranks from vocab.json)
    must disagree with transformers and tokenizers (which read tokenizer.json)."""
    folder = tmp_path / "edited"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "merges.txt"):
        (folder / name).write_bytes((gpt2_folder / name).read_bytes())
    vocab = json.loads((gpt2_folder / "vocab.json").read_text(encoding="utf-8"))
    vocab["Ġthe"], vocab["e"] = vocab["e"], vocab["Ġthe"]
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    report = run(folder, workloads=("single",))
    assert agreement(report, "tiktoken", "single").mismatched > 0
    assert agreement(report, "tokenizers", "single").mismatched == 0
    assert report.disagreeing == ("tiktoken",)
    assert any("tiktoken ranks merges by token id" in w for w in report.warnings)


# ---------------------------------------------------------------- SentencePiece


def test_sentencepiece_model_implementations_agree(unigram_model: Path) -> None:
    report = run(unigram_model, workloads=("single", "pair", "decode"))
    assert report.reference == "sentencepiece" and report.model_type == "Unigram"
    assert {i.name for i in report.implementations} >= {"sentencepiece", "transformers", "tokenizers"}
    assert report.agree
    assert_figures_positive(report)


def test_unigram_model_loaded_as_the_wrong_class_is_flagged(unigram_model: Path, tmp_path: Path) -> None:
    folder = tmp_path / "llama-labelled"
    folder.mkdir()
    (folder / "tokenizer.model").write_bytes(unigram_model.read_bytes())
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    report = run(folder, workloads=("single",))
    assert any("Unigram" in w and "LlamaTokenizer" in w for w in report.warnings)
    assert agreement(report, "sentencepiece", "single").mismatched > 0
    assert "sentencepiece" in report.disagreeing


# ---------------------------------------------------------------- corpus, environment


def test_texts_file_lines_and_tsv_pairs(tmp_path: Path) -> None:
    lines = tmp_path / "lines.txt"
    lines.write_text("第一句话\nsecond line\n\nthird\n", encoding="utf-8")
    corpus = load_corpus(str(lines))
    assert corpus.texts == ("第一句话", "second line", "third")
    assert corpus.pairs[0] == ("第一句话", "second line") and corpus.pairs[-1] == ("third", "第一句话")
    tsv = tmp_path / "pairs.tsv"
    tsv.write_text("今天天气很好\tThe weather is nice\nhello\tworld\n", encoding="utf-8")
    corpus = load_corpus(str(tsv))
    assert corpus.pairs == (("今天天气很好", "The weather is nice"), ("hello", "world")) and len(corpus.texts) == 4
    assert len(load_corpus(None).texts) == 67


def test_load_average_above_core_count_warns(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "getloadavg", lambda: (64.0, 64.0, 64.0))
    report = run("builtin:tiny-gpt2", workloads=("single",), implementations=("tiktoken",))
    assert any("load average 64.00 exceeds" in w for w in report.warnings)
    assert [i.name for i in report.implementations] == ["transformers", "tiktoken"]


@pytest.mark.slow
def test_thread_sweep_runs_each_setting_in_its_own_process(cli) -> None:
    result = cli("bench-tokenizers", "builtin:tiny-gpt2", "--threads", "1,2", "--workload", "batch",
                 "--impl", "tokenizers", "-n", "2", "--warmup", "0", "--json")
    assert result.exit_code == 0, result.stderr
    data = result.json()
    assert [run["threads"] for run in data["sweep"]] == [1, 2]
    for sweep_run in data["sweep"]:
        assert {t["threads"] for t in sweep_run["timings"]} == {sweep_run["threads"]}
        assert all(t["texts_per_s"] > 0 for t in sweep_run["timings"])
    assert data["rust_threads"] == 1 and data["timings"] == data["sweep"][0]["timings"]


# ---------------------------------------------------------------- the command


def test_cli_json_report(cli) -> None:
    result = cli("bench-tokenizers", "builtin:tiny-gpt2", "-n", "2", "--warmup", "0", "--json")
    assert result.exit_code == 0, result.stderr
    data = result.json()
    assert data["reference"] == "transformers" and data["agree"] is True and data["disagreeing"] == []
    assert data["files"] == ["mlops_cli/data/bpe-vocab.json (built in)", "mlops_cli/data/bpe-merges.txt"]
    assert {i["name"] for i in data["implementations"]} == {"transformers", "tokenizers", "tiktoken"}
    assert all(t["tokens_per_s"] > 0 and t["us_per_call"] > 0 for t in data["timings"])


def test_cli_tables_and_strict_exit(cli) -> None:
    result = cli("bench-tokenizers", "builtin:tiny-bert", "--max-length", "16", "--workload", "batch",
                 "-n", "1", "--warmup", "0", "--strict")
    assert result.exit_code == 6
    for words in ("Implementations", "Speed", "µs/call", "Agreement with transformers", "First mismatches", "FAIL"):
        assert words in result.stdout
    assert "transformers-python" in result.stderr and "disagree" in result.stderr
    as_json = cli("bench-tokenizers", "builtin:tiny-bert", "--max-length", "16", "--workload", "batch",
                  "--impl", "transformers-python", "-n", "1", "--warmup", "0", "--strict", "--json")
    assert as_json.exit_code == 6 and as_json.json()["disagreeing"] == ["transformers-python"]


@pytest.mark.parametrize(("args", "code", "words"), [
    (["builtin:tiny-bert", "--threads", "two"], 2, "--threads"),
    (["builtin:tiny-bert", "--impl", "fasttok"], 2, "unknown implementation"),
    (["builtin:tiny-bert", "--workload", "encode"], 2, "unknown workload"),
    (["builtin:tiny-bert", "--reference", "tiktoken"], 2, "not available"),
    (["builtin:convnet"], 2, "has no tokenizer"),
    (["no/such/tokenizer.json"], 3, "no such file"),
])
def test_cli_errors(cli, args: list[str], code: int, words: str) -> None:
    result = cli("bench-tokenizers", *args, "-n", "1")
    assert result.exit_code == code, result.stdout + result.stderr
    assert words in result.stderr


def test_cli_bad_texts_file(cli, tmp_path: Path) -> None:
    bad = tmp_path / "bad.tsv"
    bad.write_text("a\tb\nonly one field\n", encoding="utf-8")
    result = cli("bench-tokenizers", "builtin:tiny-gpt2", "--texts", bad, "-n", "1")
    assert result.exit_code == 3 and "line 2" in result.stderr
