"""Built-in models are reproducible: same weights every build, tokenizer files regenerate identically."""

from __future__ import annotations

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
    from mlops_cli.core.inputs import example_inputs
    from mlops_cli.core.loading import load_model
    from mlops_cli.core.runtimes import runner_for

    for name in zoo.ENTRIES:
        loaded = load_model(f"builtin:{name}")
        outputs = runner_for(loaded)(example_inputs(loaded).tensors)
        assert outputs and all(v.shape[0] == 2 for v in outputs.values()), name
