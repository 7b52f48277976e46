"""The CLI shell: inspect and zoo commands, --json, exit codes, error style, debug tracebacks, job files."""

from __future__ import annotations

import json

import pytest
import torch


def test_zoo_list_json(cli) -> None:
    result = cli("zoo", "list", "--json")
    assert result.exit_code == 0
    references = [m["reference"] for m in result.json()["models"]]
    assert {"builtin:tiny-bert", "builtin:tiny-gpt2", "builtin:convnet", "builtin:lenet"} <= set(references)


def test_zoo_save_then_inspect_hf_folder(cli, tmp_path) -> None:
    folder = tmp_path / "bert"
    saved = cli("zoo", "save", "tiny-bert", folder, "--json")
    assert saved.exit_code == 0, saved.stderr
    assert "model.safetensors" in saved.json()["files"]
    again = cli("zoo", "save", "tiny-bert", folder)
    assert again.exit_code == 5 and "--force" in again.stderr
    report = cli("inspect", folder, "--json").json()
    assert report["format"] == "hf-folder"
    assert report["config"]["model_type"] == "bert"
    assert report["element_count"] == saved.json()["parameters"]
    assert report["dtypes"][0]["dtype"] == "float32"


def test_inspect_training_checkpoint(cli, tmp_path) -> None:
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.ones(1, 4)).sum().backward()
    optimizer.step()
    path = tmp_path / "ckpt.pth"
    torch.save({"model_state_dict": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 7}, path)
    result = cli("inspect", path, "--json")
    assert result.exit_code == 0, result.stderr
    report = result.json()
    assert report["format"] == "torch-zip"
    assert report["state_key"] == "model_state_dict"
    assert report["tensor_count"] == 2 and report["element_count"] == 15
    assert report["checkpoint_entries"]["epoch"] == "7"
    assert report["checkpoint_entries"]["optimizer"].startswith("optimizer state: 2 parameter states")
    human = cli("inspect", path)
    assert "Training checkpoint entries" in human.stdout and "model_state_dict" in human.stdout


def test_inspect_onnx_and_torchscript_without_loading(cli, tmp_path) -> None:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), tmp_path / "m.onnx")
    report = cli("inspect", tmp_path / "m.onnx", "--json").json()
    assert report["graph"]["inputs"] == {"x": "float32[batch, 3]"}
    assert report["graph"]["opset"] == {"ai.onnx": 18} and report["graph"]["ops"] == {"Relu": 1}
    torch.jit.save(torch.jit.script(torch.nn.Linear(3, 2)), tmp_path / "ts.pt")
    report = cli("inspect", tmp_path / "ts.pt", "--json").json()
    assert report["format"] == "torchscript"
    assert any("--trust-code" in line for line in report["notes"])


def test_errors_are_one_message_and_a_hint(cli, tmp_path) -> None:
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    result = cli("inspect", empty)
    assert result.exit_code == 3
    assert result.stdout == ""
    assert result.stderr.startswith("error: ") and "hint: " in result.stderr
    assert "Traceback" not in result.stderr


def test_debug_shows_traceback(cli, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("MLOPS_DEBUG", "1")
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    result = cli("inspect", empty)
    assert result.exit_code == 3 and "Traceback" in result.stderr


def test_internal_error_is_exit_1_with_report_hint(cli, monkeypatch, tmp_path) -> None:
    import mlops_cli.services.inspect as service

    monkeypatch.setattr(service, "inspect_path", lambda path: 1 / 0)
    result = cli("inspect", tmp_path)
    assert result.exit_code == 1
    assert "internal error: ZeroDivisionError" in result.stderr and "MLOPS_DEBUG=1" in result.stderr


def test_ctrl_c_exits_130(cli, monkeypatch, tmp_path) -> None:
    import mlops_cli.services.zoo as service

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(service, "save_model", interrupted)
    result = cli("zoo", "save", "convnet", tmp_path / "out")
    assert result.exit_code == 130
    assert not (tmp_path / "out").exists()


def test_usage_error_exit_2(cli) -> None:
    result = cli("inspect")
    assert result.exit_code == 2
    result = cli("zoo", "save", "resnet9000", "/tmp/never-written")
    assert result.exit_code == 2 and "unknown built-in model" in result.stderr


@pytest.mark.parametrize("suffix", [".yaml", ".toml"])
def test_job_file_sets_option_defaults(cli, tmp_path, suffix) -> None:
    job = tmp_path / f"job{suffix}"
    job.write_text("zoo:\n  save:\n    force: true\n" if suffix == ".yaml" else "[zoo.save]\nforce = true\n")
    target = tmp_path / "convnet"
    target.mkdir()
    assert cli("zoo", "save", "convnet", target).exit_code == 5
    result = cli("--config", job, "zoo", "save", "convnet", target, "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["name"] == "convnet"


def test_bad_job_file_is_exit_3(cli, tmp_path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text("- just\n- a list\n")
    result = cli("--config", job, "zoo", "list")
    assert result.exit_code == 3 and "must map command names" in result.stderr


def test_job_file_typos_are_usage_errors(cli, tmp_path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text("zoo:\n  save:\n    forse: true\n")
    result = cli("--config", job, "zoo", "list")
    assert result.exit_code == 2 and "'zoo.save' has no option 'forse'" in result.stderr
    job.write_text("zooo:\n  list: {}\n")
    result = cli("--config", job, "zoo", "list")
    assert result.exit_code == 2 and "'zooo' is not a command" in result.stderr
    job.write_text("zoo:\n  save:\n    name: convnet\n")  # an argument, not an option
    result = cli("--config", job, "zoo", "list")
    assert result.exit_code == 2 and "has no option 'name'" in result.stderr
    job.write_text("zoo:\n  save: [1]\n")
    result = cli("--config", job, "zoo", "list")
    assert result.exit_code == 2 and "must map option names to values" in result.stderr


def test_job_file_accepts_command_line_option_names(cli, tmp_path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text("zoo:\n  list:\n    json: true\n")
    result = cli("--config", job, "zoo", "list")
    assert result.exit_code == 0
    assert result.json()["models"]


def test_paths_with_brackets_are_not_read_as_markup(cli, zoo_dir, tmp_path) -> None:
    import shutil

    for name in ("run[1]", "cv[/bold]"):
        folder = tmp_path / name
        shutil.copytree(zoo_dir / "convnet", folder)
        result = cli("inspect", folder / "model.safetensors")
        assert result.exit_code == 0, result.stderr
        assert f"Checkpoint:{folder / 'model.safetensors'}" in "".join(result.stdout.split())  # titles wrap


def test_tied_tensors_are_counted_once(cli, tmp_path) -> None:
    """torch.save stores GPT-2's lm_head/wte once; the byte total must not count it twice."""
    from mlops_cli.core import zoo

    model, _ = zoo.build("tiny-gpt2")
    path = tmp_path / "gpt2.pt"
    torch.save(model.state_dict(), path)
    report = cli("inspect", path, "--json").json()
    tied = {t["name"]: t["tied_to"] for t in report["largest"] if t["tied_to"]}
    assert tied == {"lm_head.weight": "transformer.wte.weight"}
    assert report["tensor_bytes"] < report["file_bytes"]
    assert report["tensor_bytes"] == sum(p.numel() * 4 for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers())


def test_help_paragraphs_are_reflowed_and_lists_kept() -> None:
    """Typer keeps the line breaks of a docstring's later paragraphs: source lines wrapped at 120 columns broke
    raggedly on a 100-column terminal ("... the plain\\n graph) is\\n exported ..."). Prose is joined now."""
    from mlops_cli.app import _reflowed

    doc = """First line
    goes on.

    A later paragraph
    wrapped in the source.

    - a list item
    - another

    Example: mlops zoo list"""
    assert _reflowed(doc) == ("First line goes on.\n\nA later paragraph wrapped in the source.\n\n"
                              "- a list item\n- another\n\nExample: mlops zoo list")
