"""`mlops average`: uniform, weighted and EMA averages computed tensor by tensor, integer tensors and BatchNorm
buffers handled explicitly, outputs written like the last input, mismatched checkpoints refused (exit 3)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mlops_cli.core.contract import ModelRef
from mlops_cli.core.errors import InputError, UsageError
from mlops_cli.services.average import AverageOptions, AverageReport, coefficients_for, run


def average(inputs: list[Path], output: Path, **options: object) -> AverageReport:
    first, *others = (ModelRef.parse(str(path)) for path in inputs)
    return run(first, AverageOptions(output=output, others=tuple(others), **options))  # type: ignore[arg-type]


def small_checkpoints(folder: Path, count: int = 3) -> list[Path]:
    """Three safetensors files with known values: x_i = i + 1 everywhere, plus an int step counter."""
    paths = []
    for index in range(count):
        path = folder / f"ckpt-{index}.safetensors"
        save_file({"w": torch.full((2, 3), float(index + 1)) + torch.arange(6.0).reshape(2, 3) / 10,
                   "half": torch.full((4,), float(index + 1), dtype=torch.float16),
                   "step": torch.tensor([100 * (index + 1)])}, str(path), metadata={"format": "pt"})
        paths.append(path)
    return paths


def bn_checkpoint(path: Path, seed: int, batches: int) -> None:
    """A conv + BatchNorm state_dict (torch.save'd under 'state_dict', as a trainer would) with its buffers."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4))
    model.train()
    for _ in range(batches):
        model(torch.randn(2, 1, 6, 6))
    torch.save({"state_dict": model.state_dict(), "optimizer": {"lr": 0.1}}, path)


def test_average_of_identical_copies_is_the_copy(zoo_dir: Path, tmp_path: Path, cli) -> None:
    source = zoo_dir / "convnet"
    copies = [shutil.copytree(source, tmp_path / f"copy{i}") for i in range(3)]
    result = cli("average", *copies, "-o", tmp_path / "soup", "--json")
    assert result.exit_code == 0, result.output
    data = result.json()
    assert data["method"] == "uniform" and data["coefficients"] == pytest.approx([1 / 3] * 3)
    assert data["output_kind"] == "weights-folder" and data["streamed"] and data["averaged"] == data["tensors"] == 10
    assert sorted(p.name for p in (tmp_path / "soup").iterdir()) == ["mlops.json", "model.safetensors"]
    assert (tmp_path / "soup" / "model.safetensors").read_bytes() == (source / "model.safetensors").read_bytes()
    assert cli("diff", source, tmp_path / "soup", "--expect-same").exit_code == 0
    assert data["peak_rss_growth_bytes"] is None or data["peak_rss_growth_bytes"] < 64 * 2**20


def test_uniform_average_rounds_like_sum_over_n(tmp_path: Path) -> None:
    """Σx/N, not Σ(x/N): the two round differently in float64 and then, for ~1% of elements, in float32."""
    generator = torch.Generator().manual_seed(0)
    values = [torch.randn(20_000, generator=generator) for _ in range(3)]
    paths = []
    for index, tensor in enumerate(values):
        paths.append(tmp_path / f"{index}.safetensors")
        save_file({"x": tensor}, str(paths[-1]))
    average(paths, tmp_path / "mean.safetensors")
    expected = (values[0].double() + values[1].double() + values[2].double()) / 3
    assert torch.equal(load_file(tmp_path / "mean.safetensors")["x"], expected.float())


def test_ema_matches_the_recurrence(tmp_path: Path) -> None:
    paths = small_checkpoints(tmp_path)
    report = average(paths, tmp_path / "ema.safetensors", ema=0.9)
    states = [load_file(p) for p in paths]
    expected = states[0]["w"].double()
    for state in states[1:]:
        expected = 0.9 * expected + 0.1 * state["w"].double()  # ema = d*ema + (1-d)*x, the first initialises
    result = load_file(tmp_path / "ema.safetensors")
    assert torch.equal(result["w"], expected.float())
    assert result["half"].dtype == torch.float16 and torch.allclose(result["half"].double(), torch.tensor(
        [0.81 * 1 + 0.09 * 2 + 0.1 * 3] * 4, dtype=torch.float64), atol=1e-3)
    assert report.coefficients == pytest.approx((0.81, 0.09, 0.1)) and report.method == "ema"
    assert torch.equal(result["step"], torch.tensor([300]))  # an integer: copied from the last checkpoint
    assert [(k.name, k.kind, k.handling, k.differs) for k in report.kept] == [
        ("step", "integer", "copied from the last checkpoint", True)]


def test_weighted_average_normalises_weights_and_says_so(tmp_path: Path, cli) -> None:
    paths = small_checkpoints(tmp_path)
    result = cli("average", *paths, "-o", tmp_path / "mix.safetensors", "--weights", "1,1,2", "--json")
    assert result.exit_code == 0, result.output
    data = result.json()
    assert data["coefficients"] == [0.25, 0.25, 0.5]
    assert any("sum to 4, not 1" in w for w in data["warnings"])
    states = [load_file(p)["w"].double() for p in paths]
    expected = 0.25 * states[0] + 0.25 * states[1] + 0.5 * states[2]
    assert torch.equal(load_file(tmp_path / "mix.safetensors")["w"], expected.float())
    exact = cli("average", *paths, "-o", tmp_path / "exact.safetensors", "--weights", "0.2,0.3,0.5", "--json")
    assert exact.json()["warnings"] == []


def test_batchnorm_buffers_are_reported_and_handled(tmp_path: Path) -> None:
    paths = [tmp_path / "a.pt", tmp_path / "b.pt"]
    bn_checkpoint(paths[0], seed=0, batches=3)
    bn_checkpoint(paths[1], seed=1, batches=5)
    states = [torch.load(p, weights_only=True)["state_dict"] for p in paths]
    report = average(paths, tmp_path / "avg.pt")
    result = torch.load(tmp_path / "avg.pt", weights_only=True)
    assert set(result) == {"state_dict"} and not report.streamed and report.output_kind == "torch"
    averaged = result["state_dict"]
    assert torch.allclose(averaged["1.running_mean"], (states[0]["1.running_mean"] + states[1]["1.running_mean"]) / 2)
    assert torch.allclose(averaged["0.weight"], (states[0]["0.weight"] + states[1]["0.weight"]) / 2)
    assert averaged["1.num_batches_tracked"].item() == 5 and averaged["1.num_batches_tracked"].dtype == torch.int64
    kept = {k.name: (k.kind, k.handling, k.differs) for k in report.kept}
    assert kept == {"1.running_mean": ("buffer", "averaged", True), "1.running_var": ("buffer", "averaged", True),
                    "1.num_batches_tracked": ("integer", "copied from the last checkpoint", True)}
    assert any("optimizer" in w for w in report.warnings)  # training entries are not carried over
    last = average(paths, tmp_path / "last.pt", buffers="last")
    buffers = torch.load(tmp_path / "last.pt", weights_only=True)["state_dict"]
    assert torch.equal(buffers["1.running_var"], states[1]["1.running_var"])
    assert last.copied == 3 and last.averaged == len(states[0]) - 3


def test_mismatched_checkpoints_exit_3_naming_the_tensors(tmp_path: Path, cli) -> None:
    save_file({"a": torch.ones(2), "b": torch.ones(3)}, str(tmp_path / "one.safetensors"))
    save_file({"a": torch.ones(2), "c": torch.ones(3)}, str(tmp_path / "two.safetensors"))
    save_file({"a": torch.ones(4), "b": torch.ones(3)}, str(tmp_path / "three.safetensors"))
    result = cli("average", tmp_path / "one.safetensors", tmp_path / "two.safetensors", tmp_path / "three.safetensors",
                 "-o", tmp_path / "out.safetensors")
    assert result.exit_code == 3
    message = " ".join(result.output.split())
    assert "missing from" in message and ": b" in message and "only in" in message and ": c" in message
    assert "a float32[2] vs float32[4]" in message
    assert not (tmp_path / "out.safetensors").exists()


def test_hf_folder_keeps_config_and_tokenizer_and_eval_shows_drift(zoo_dir: Path, tmp_path: Path, cli) -> None:
    bert = zoo_dir / "tiny-bert"
    tuned = shutil.copytree(bert, tmp_path / "tuned")
    state = load_file(tuned / "model.safetensors")
    state["classifier.weight"] = state["classifier.weight"] + 0.1
    save_file(state, str(tuned / "model.safetensors"), metadata={"format": "pt"})
    result = cli("average", bert, tuned, "-o", tmp_path / "soup", "--eval", "--json")
    assert result.exit_code == 0, result.output
    data = result.json()
    files = sorted(p.name for p in (tmp_path / "soup").iterdir())
    assert files == sorted(p.name for p in bert.iterdir())
    assert (tmp_path / "soup" / "tokenizer.json").read_bytes() == (bert / "tokenizer.json").read_bytes()
    assert [d["checkpoint"] for d in data["drift"]] == [str(bert), str(tuned)]
    assert all(d["max_abs_diff"] > 0 and d["problem"] is None for d in data["drift"])
    assert torch.allclose(load_file(tmp_path / "soup" / "model.safetensors")["classifier.weight"],
                          load_file(bert / "model.safetensors")["classifier.weight"] + 0.05)
    text = cli("average", bert, tuned, "-o", tmp_path / "soup", "--eval", "--force")
    assert "Drift of the average from each input" in text.stdout


def test_sharded_checkpoints_are_written_sharded(zoo_dir: Path, tmp_path: Path) -> None:
    state = load_file(zoo_dir / "tiny-bert" / "model.safetensors")
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[:20], "model-00002-of-00002.safetensors": names[20:]}
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        for file, members in shards.items():
            save_file({n: state[n] for n in members}, str(tmp_path / folder / file))
        index = {"metadata": {}, "weight_map": {n: f for f, members in shards.items() for n in members}}
        (tmp_path / folder / "model.safetensors.index.json").write_text(json.dumps(index))
    report = average([tmp_path / "a" / "model.safetensors.index.json", tmp_path / "b" / "model.safetensors.index.json"],
                     tmp_path / "out")
    assert report.output_kind == "sharded" and report.streamed
    written = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert written["weight_map"] == index["weight_map"]
    for file in shards:
        assert (tmp_path / "out" / file).read_bytes() == (tmp_path / "a" / file).read_bytes()


def test_outputs_are_never_overwritten_without_force(tmp_path: Path, cli) -> None:
    paths = small_checkpoints(tmp_path, count=2)
    (tmp_path / "out.safetensors").write_text("keep me")
    assert cli("average", *paths, "-o", tmp_path / "out.safetensors").exit_code == 5
    assert (tmp_path / "out.safetensors").read_text() == "keep me"
    assert cli("average", *paths, "-o", paths[0]).exit_code == 5  # never over an input, even with --force
    assert cli("average", *paths, "-o", paths[0], "--force").exit_code == 5
    assert cli("average", *paths, "-o", tmp_path / "out.safetensors", "--force").exit_code == 0


@pytest.mark.parametrize(("count", "weights", "ema", "message"), [
    (1, None, None, "at least two"),
    (2, (0.5, 0.3, 0.2), None, "3 values for 2"),
    (2, (1.0, -1.0), None, "non-negative"),
    (2, None, 1.0, "[0, 1)"),
    (2, (0.5, 0.5), 0.9, "cannot be combined"),
])
def test_bad_methods_are_usage_errors(count: int, weights: tuple[float, ...] | None, ema: float | None,
                                      message: str) -> None:
    with pytest.raises(UsageError, match=re.escape(message)):
        coefficients_for(count, weights, ema)


def test_builtin_models_must_be_saved_first(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="exists only in memory") as caught:
        average([Path("builtin:convnet"), Path("builtin:convnet")], tmp_path / "out")
    assert "mlops zoo save convnet" in str(caught.value.hint)


def test_hf_folder_with_torch_weights_is_written_with_torch_weights(zoo_dir: Path, tmp_path: Path, cli) -> None:
    bert = zoo_dir / "tiny-bert"
    folder = shutil.copytree(bert, tmp_path / "bin", ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save(load_file(bert / "model.safetensors"), folder / "pytorch_model.bin")
    report = average([folder, folder], tmp_path / "out")
    assert not report.streamed and report.output_kind == "hf-folder"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in folder.iterdir())
    assert cli("diff", bert, tmp_path / "out", "--expect-same").exit_code == 0
