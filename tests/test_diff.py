"""`mlops diff A B`: names the layers a fine-tune touched, counts identical tensors, sees through formats,
shards, prefixes and ties, and with --expect-same is a CI gate (exit 0 when nothing changed, 6 otherwise)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mlops_cli.core.contract import LoadOptions, ModelRef
from mlops_cli.services.diff import DiffOptions, DiffReport, run

TOUCHED = ("bert.encoder.layer.1.output.dense", "bert.encoder.layer.1.attention.self.query")


def diff(a: Path | str, b: Path | str, **options: object) -> DiffReport:
    return run(ModelRef.parse(str(a)), DiffOptions(other=ModelRef.parse(str(b)), **options))  # type: ignore[arg-type]


def copy_with(source: Path, target: Path, change: dict[str, float] | None = None) -> Path:
    """A copy of a saved model folder whose tensors of the modules in `change` moved by that much (noise)."""
    shutil.copytree(source, target)
    state = load_file(target / "model.safetensors")
    generator = torch.Generator().manual_seed(0)
    for name, tensor in state.items():
        amount = next((v for layer, v in (change or {}).items() if name.startswith(layer + ".")), None)
        if amount is not None:
            state[name] = tensor + amount * torch.randn(tensor.shape, generator=generator)
    save_file(state, str(target / "model.safetensors"), metadata={"format": "pt"})
    return target


@pytest.fixture
def bert(zoo_dir: Path, tmp_path: Path) -> Path:
    """The built-in tiny BERT with the touched layers' biases zeroed (as at initialisation): a zero tensor that
    moves has an infinite relative change, which the first test checks."""
    folder = shutil.copytree(zoo_dir / "tiny-bert", tmp_path / "base")
    state = load_file(folder / "model.safetensors")
    for layer in TOUCHED:
        state[f"{layer}.bias"] = torch.zeros_like(state[f"{layer}.bias"])
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def test_a_fine_tuned_copy_names_the_changed_layers(bert: Path, tmp_path: Path) -> None:
    tuned = copy_with(bert, tmp_path / "tuned", {TOUCHED[0]: 0.05, TOUCHED[1]: 0.01})
    report = diff(bert, tuned)
    changed = [layer.layer for layer in report.layers if layer.changed_tensors]
    assert changed == list(TOUCHED)  # sorted by change: 0.05 noise moves more than 0.01
    assert report.changed == 4 and report.identical == report.compared - 4  # weight and bias of each
    assert report.layers[0].relative_change > report.layers[1].relative_change > 0
    assert all(layer.relative_change == 0 for layer in report.layers[2:])
    biases = [t for t in report.tensors[:2]]  # zero biases that moved: relative change infinite, no cosine
    assert {t.name for t in biases} == {f"{layer}.bias" for layer in TOUCHED}
    assert all(t.relative_change == float("inf") and t.cosine is None for t in biases)
    top = report.tensors[2]
    assert top.name == f"{TOUCHED[0]}.weight" and top.changed_share == 1.0 and 0 < top.cosine < 1  # type: ignore[operator]
    assert not report.passed and "4 of 41 tensors differ" in report.verdict


def test_expect_same_is_a_ci_gate(cli, bert: Path, tmp_path: Path) -> None:
    same = copy_with(bert, tmp_path / "same")
    result = cli("diff", bert, same, "--expect-same")
    assert result.exit_code == 0, result.output
    assert "PASS" in result.stdout and "the same: 41 tensors" in result.stdout
    tampered = copy_with(bert, tmp_path / "tampered", {"bert.pooler.dense": 1e-3})
    result = cli("diff", bert, tampered, "--expect-same", "--json")
    assert result.exit_code == 6
    data = result.json()
    assert data["passed"] is False and data["changed"] == 2
    assert data["layers"][0]["layer"] == "bert.pooler.dense"
    assert cli("diff", bert, tampered, "--expect-same", "--atol", "1").exit_code == 0  # within atol
    assert cli("diff", bert, tampered).exit_code == 0  # without the gate a difference is a result, not a failure


def test_torch_file_with_prefix_and_tied_tensor_matches_safetensors(bert: Path, tmp_path: Path) -> None:
    """A DataParallel torch.save of the same weights, with a head tied to the embeddings (stored once in
    safetensors, twice-named in torch), is the same model once --strip-prefix is given."""
    state = load_file(bert / "model.safetensors")
    embeddings = "bert.embeddings.word_embeddings.weight"
    tied = {f"module.{k}": v for k, v in state.items()}
    tied["module.head.weight"] = tied[f"module.{embeddings}"]  # one storage, two names
    torch.save({"state_dict": tied, "epoch": 3}, tmp_path / "ckpt.pt")
    report = diff(bert / "model.safetensors", tmp_path / "ckpt.pt", load=LoadOptions(strip_prefix="module."))
    assert report.passed, report.verdict
    assert report.tied == ("head.weight",) and report.only_in_b == ()
    assert any("epoch" in warning for warning in report.warnings)
    unstripped = diff(bert / "model.safetensors", tmp_path / "ckpt.pt")
    assert len(unstripped.only_in_a) == 41 and unstripped.compared == 0


def test_names_shapes_and_dtypes_that_differ(cli, tmp_path: Path) -> None:
    save_file({"a": torch.ones(2, 3), "b": torch.ones(4), "c": torch.zeros(2), "gone": torch.ones(1)},
              str(tmp_path / "a.safetensors"))
    save_file({"a": torch.ones(3, 2), "b": torch.ones(4, dtype=torch.float16), "c": torch.zeros(2),
               "new": torch.ones(1)}, str(tmp_path / "b.safetensors"))
    result = cli("diff", tmp_path / "a.safetensors", tmp_path / "b.safetensors", "--json")
    assert result.exit_code == 0
    data = result.json()
    assert data["only_in_a"] == ["gone"] and data["only_in_b"] == ["new"]
    assert data["shape_changed"] == [{"name": "a", "a": "[2, 3]", "b": "[3, 2]"}]
    assert data["dtype_changed"] == [{"name": "b", "a": "float32", "b": "float16"}]
    by_name = {t["name"]: t for t in data["tensors"]}
    assert by_name["b"]["dtype"] == "float32 -> float16" and by_name["b"]["max_abs_diff"] == 0
    assert not by_name["b"]["identical"] and by_name["c"]["identical"]
    assert by_name["c"]["cosine"] is None and by_name["c"]["relative_change"] == 0  # zeros: no direction
    text = cli("diff", tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    assert "One side only (2)" in text.stdout and "Shape/dtype changed (2)" in text.stdout and "DIFF" in text.stdout


def test_nan_in_the_same_place_is_no_change(tmp_path: Path) -> None:
    values = torch.tensor([1.0, float("nan"), 3.0])
    save_file({"x": values}, str(tmp_path / "a.safetensors"))
    save_file({"x": values.clone()}, str(tmp_path / "b.safetensors"))
    moved = values.clone()
    moved[0] = float("nan")
    save_file({"x": moved}, str(tmp_path / "c.safetensors"))
    assert diff(tmp_path / "a.safetensors", tmp_path / "b.safetensors").passed
    changed = diff(tmp_path / "a.safetensors", tmp_path / "c.safetensors")
    assert changed.tensors[0].max_abs_diff == float("inf") and changed.tensors[0].changed_share == pytest.approx(1 / 3)


def test_sharded_index_reads_like_one_file(bert: Path, tmp_path: Path) -> None:
    state = load_file(bert / "model.safetensors")
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[:20], "model-00002-of-00002.safetensors": names[20:]}
    for file, members in shards.items():
        save_file({n: state[n] for n in members}, str(tmp_path / file))
    index = {"metadata": {}, "weight_map": {n: f for f, members in shards.items() for n in members}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    report = diff(bert, tmp_path / "model.safetensors.index.json")
    assert report.passed and report.identical == 41 and report.kind_b == "sharded"


def test_what_diff_cannot_read_exits_3(cli, tmp_path: Path) -> None:
    assert cli("diff", "builtin:convnet", "builtin:convnet").exit_code == 3
    (tmp_path / "notes.txt").write_text("not weights")
    result = cli("diff", tmp_path / "notes.txt", tmp_path / "notes.txt")
    assert result.exit_code == 3 and "not a format" in result.output
