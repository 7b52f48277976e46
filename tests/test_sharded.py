"""Sharded Hugging Face checkpoints (`model.safetensors.index.json` + shards) through inspect, compress half
and summarize, on a tiny Llama saved with `save_pretrained(max_shard_size="20KB")`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from mlops_cli.core.shards import read_shard_indexes, shard_problems

INDEX = "model.safetensors.index.json"
CONFIG = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
          "intermediate_size": 128, "vocab_size": 100, "max_position_embeddings": 64}
PARAMETERS = 86_848  # 2 x (4096 + 2048 + 2048 + 4096 + 3 x 8192 + 128) + 2 x 6400 + 64


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    import transformers

    folder = tmp_path_factory.mktemp("sharded") / "llama"
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG))
    model.save_pretrained(folder, max_shard_size="20KB")
    assert (folder / INDEX).is_file() and len(list(folder.glob("*.safetensors"))) > 2
    return folder


def test_inspect_reads_headers_only(cli: Any, sharded: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import safetensors
    import safetensors.torch
    import torch

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("inspect read tensor data")

    for module, name in ((safetensors, "safe_open"), (safetensors.torch, "load_file"), (torch, "load")):
        monkeypatch.setattr(module, name, refuse)
    result = cli("inspect", sharded, "--json")
    assert result.exit_code == 0, result.output
    data = result.json()
    index = read_shard_indexes(sharded)[0]
    assert data["tensor_count"] == len(index.weight_map) and data["element_count"] == PARAMETERS
    assert data["tensor_bytes"] == index.total_size == 4 * PARAMETERS
    assert set(index.shards) <= set(data["files"])
    assert not any("incomplete" in note for note in data["notes"])


def test_inspect_names_a_missing_shard(cli: Any, sharded: Path, tmp_path: Path) -> None:
    """Before: a folder missing a shard inspected as a smaller, complete checkpoint, without a word."""
    broken = tmp_path / "broken"
    shutil.copytree(sharded, broken)
    shard = read_shard_indexes(broken)[0].shards[1]
    (broken / shard).unlink()
    result = cli("inspect", broken, "--json")
    assert result.exit_code == 0, result.output
    assert any("incomplete checkpoint" in note and shard in note for note in result.json()["notes"])


def test_shard_problems_names_tensors_no_shard_holds(sharded: Path, tmp_path: Path) -> None:
    folder = tmp_path / "extra"
    shutil.copytree(sharded, folder)
    index = json.loads((folder / INDEX).read_text())
    first_shard = next(iter(index["weight_map"].values()))
    index["weight_map"]["ghost.weight"] = first_shard
    (folder / INDEX).write_text(json.dumps(index))
    names = set(read_shard_indexes(sharded)[0].weight_map)
    assert shard_problems(sharded, names) == []
    assert shard_problems(folder, names) == [f"{INDEX} lists 1 tensor(s) that no shard holds (ghost.weight)"]


def test_compress_half_and_summarize_round_trip(cli: Any, sharded: Path, tmp_path: Path) -> None:
    output = tmp_path / "half"
    result = cli("compress", "half", sharded, "-o", output, "--json")
    assert result.exit_code == 0, result.output
    before, after = read_shard_indexes(sharded)[0], read_shard_indexes(output)[0]
    assert after.weight_map == before.weight_map  # same shards, same tensors in each
    inspected = cli("inspect", output, "--json").json()
    assert after.total_size == inspected["tensor_bytes"] < before.total_size  # the index's total follows the bytes
    assert {d["dtype"] for d in inspected["dtypes"]} == {"float16", "float32"}  # norms kept in fp32
    for folder in (sharded, output):
        summary = cli("summarize", folder, "--repeats", "0", "--json")
        assert summary.exit_code == 0, summary.output
        data = summary.json()
        assert data["parameters"]["unique"] == PARAMETERS
        assert set(data["stored"]["files"]) == set(read_shard_indexes(folder)[0].shards)
        assert data["stored"]["tensor_bytes"] == read_shard_indexes(folder)[0].total_size


def test_estimate_counts_what_the_shards_hold(cli: Any, sharded: Path) -> None:
    """estimate reads config.json only, yet its count is the parameters the shards store."""
    result = cli("estimate", sharded, "--json")
    assert result.exit_code == 0, result.output
    data = result.json()
    assert data["parameters"]["unique"] == PARAMETERS
    assert data["weight_bytes"]["fp32"] == read_shard_indexes(sharded)[0].total_size


def test_loading_a_folder_with_a_missing_shard_names_it(cli: Any, sharded: Path, tmp_path: Path) -> None:
    """Before: summarize blamed the architecture ("weights do not fit ... check --task") for a missing shard."""
    broken = tmp_path / "broken"
    shutil.copytree(sharded, broken)
    shard = read_shard_indexes(broken)[0].shards[1]
    (broken / shard).unlink()
    result = cli("summarize", broken, "--repeats", "0", "--json")
    assert result.exit_code == 3
    assert shard in result.stderr and "incomplete" in result.stderr
