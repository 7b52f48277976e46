"""Built-in models are reproducible (same weights every build, tokenizer files regenerate identically), and the
trained ones mean something: tiny-gpt2 continues corpus lines, tiny-bert tells English from Chinese."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from mlops_cli.core import zoo


def test_builds_are_seeded_and_leave_global_rng_alone() -> None:
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    first, _ = zoo.build("tiny-gpt2")
    second, _ = zoo.build("tiny-gpt2")
    assert torch.rand(1) == before  # building did not consume the caller's random stream
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_bundled_bpe_files_regenerate_identically(tmp_path) -> None:
    """BPE training is deterministic; WordPiece training breaks frequency ties arbitrarily, which is why the
    bundled files (not a fresh training) define the built-in tokenizers."""
    zoo.train_tokenizer_files(tmp_path)
    for name in ("bpe-vocab.json", "bpe-merges.txt"):
        assert (tmp_path / name).read_text(encoding="utf-8") == (zoo.DATA / name).read_text(encoding="utf-8"), name


def test_tokenizers_round_trip_mixed_text() -> None:
    text = "export the model 今天天气很好"
    gpt2 = zoo.gpt2_tokenizer()
    assert gpt2.decode(gpt2(text).input_ids) == text
    bert = zoo.bert_tokenizer()
    encoded = bert(text)
    assert encoded.input_ids[0] == bert.cls_token_id and encoded.input_ids[-1] == bert.sep_token_id
    assert bert.unk_token_id not in encoded.input_ids


def test_every_entry_builds_and_runs() -> None:
    from mlops_cli.core.inputs import plan_inputs
    from mlops_cli.core.loading import load_model
    from mlops_cli.core.runtimes import runner_for

    for name in zoo.ENTRIES:
        loaded = load_model(f"builtin:{name}")
        outputs = runner_for(loaded)(plan_inputs(loaded).example.tensors)
        assert outputs and all(v.shape[0] == 2 for v in outputs.values()), name


# ---------------------------------------------------------------- the trained models


@pytest.fixture()
def fresh_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty disk cache and an empty in-process cache: the next build of a trained model trains."""
    monkeypatch.setenv("MLOPS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(zoo, "_MEMORY", {})
    return tmp_path / "cache" / "zoo"


def corpus_words() -> set[str]:
    return {word for line in zoo.corpus_lines() for word in WORD.findall(line.lower())}


WORD = re.compile(r"[a-z]+")


@pytest.mark.slow
def test_training_is_deterministic_and_cached_on_disk(fresh_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    threads = torch.get_num_threads()
    first = {name: zoo.build(name)[0].state_dict() for name in zoo.RECIPES}
    assert torch.get_num_threads() == threads  # training ran on one thread and put the count back
    cached = sorted(p.name for p in fresh_cache.iterdir())
    assert [name.rsplit("-", 1)[0] for name in cached] == sorted(zoo.RECIPES)
    monkeypatch.setenv("MLOPS_CACHE_DIR", str(fresh_cache.parent.parent / "elsewhere"))
    monkeypatch.setattr(zoo, "_MEMORY", {})
    for name, state in first.items():  # trained again from scratch: the very same weights
        again = zoo.build(name)[0].state_dict()
        assert state.keys() == again.keys()
        for key, value in state.items():
            assert torch.equal(value, again[key]), (name, key)


def test_a_damaged_cache_file_is_trained_again(fresh_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reference = zoo.build("tiny-bert")[0].state_dict()
    cached = next(fresh_cache.glob("tiny-bert-*.safetensors"))
    cached.write_bytes(b"not safetensors")
    monkeypatch.setattr(zoo, "_MEMORY", {})
    rebuilt = zoo.build("tiny-bert")[0].state_dict()
    assert all(torch.equal(value, rebuilt[key]) for key, value in reference.items())
    assert cached.read_bytes() != b"not safetensors"  # rewritten


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_the_trained_lms_continue_corpus_lines_with_corpus_words(name: str) -> None:
    model, tokenizer = zoo.build(name)
    known = corpus_words()
    english = [line for line in zoo.corpus_lines() if zoo.language_of(line) == 0][::4]
    generated_words = []
    for line in english:
        prompt = " ".join(line.split()[:3])
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        output = model.generate(ids, max_new_tokens=16, do_sample=False)
        words = tokenizer.decode(output[0, ids.shape[1]:], skip_special_tokens=True).lower().split()
        generated_words += WORD.findall(" ".join(words[:-1]))  # the last word may be cut by max_new_tokens
    assert len(generated_words) >= 4 * len(english)
    assert sum(word in known for word in generated_words) >= 0.9 * len(generated_words)  # measured: 100%, 100%


def test_tiny_bert_tells_english_from_chinese_on_held_out_lines() -> None:
    model, tokenizer = zoo.build("tiny-bert")
    assert model.config.id2label == {0: "english", 1: "chinese"}
    training, held_out = zoo.classifier_split()
    assert held_out and not {text for text, _ in held_out} & {text for text, _ in training}
    assert {label for _, label in held_out} == {0, 1}
    with torch.no_grad():
        encoded = tokenizer([text for text, _ in held_out], padding=True, return_tensors="pt")
        predicted = model(**encoded).logits.argmax(-1).tolist()
    accuracy = sum(p == label for p, (_, label) in zip(predicted, held_out, strict=True)) / len(held_out)
    assert accuracy >= 0.9  # measured: 14 of 14


def test_a_saved_built_in_is_the_same_whether_trained_now_or_loaded_from_the_cache(tmp_path, monkeypatch) -> None:
    """Training tiny-bert padded its tokenizer for good: `zoo save` wrote another tokenizer.json after a fresh
    training than from the cache (found by the docs' reproducibility check)."""
    from mlops_cli.core import zoo
    from mlops_cli.services.zoo import save_model

    monkeypatch.setenv("MLOPS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(zoo, "_MEMORY", {})
    save_model("tiny-bert", tmp_path / "trained")  # trains (empty cache), then caches
    monkeypatch.setattr(zoo, "_MEMORY", {})
    save_model("tiny-bert", tmp_path / "cached")  # loads from the disk cache
    for name in ("tokenizer.json", "tokenizer_config.json", "model.safetensors"):
        assert (tmp_path / "trained" / name).read_bytes() == (tmp_path / "cached" / name).read_bytes(), name
