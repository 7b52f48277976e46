"""`mlops export onnx`: the model matrix (HF encoder, causal LM, vision, CNNs from weights + --arch), names,
dynamic dims, verification at other shapes, exporters and fallback, opsets, external data, optimisation,
exit codes, and the job files in configs/.

Dynamo exports take seconds each: every file is exported once per module and shared by the tests.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from mlops_cli.core import onnx_export
from mlops_cli.core.contract import ModelRef
from mlops_cli.core.inputs import plan_inputs
from mlops_cli.core.loading import load_model
from mlops_cli.core.parity import Tolerances
from mlops_cli.services import export_onnx as service

BRANCHY = '''
import torch


class Branchy(torch.nn.Module):
    """Computes something else unless the batch is 2: exporting at batch 2 bakes that branch in."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        if x.shape[0] == 2:
            return self.fc(x)
        return self.fc(x) * 2


def make():
    return Branchy()
'''


def export(cli, *args):
    result = cli("export", "onnx", *args, "--json", "--repeats", "1")
    assert result.exit_code in (0, 6), result.stderr
    return result


@pytest.fixture(scope="module", autouse=True)
def pass_cache(tmp_path_factory):
    """Optimisation-pass measurements are remembered across exports: this module's go to its own folder."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLOPS_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("onnx")


@pytest.fixture(scope="module")
def bert(cli, out):
    return export(cli, "builtin:tiny-bert", "-o", out / "bert.onnx").json()


@pytest.fixture(scope="module")
def bert_dynamo(cli, out):
    """tiny BERT when the legacy exporter fails: `auto` falls back to dynamo (one dynamo export for the module)."""
    with pytest.MonkeyPatch.context() as patch:
        def broken(*args, **kwargs):
            raise RuntimeError("legacy exporter broken for this test")

        patch.setattr(onnx_export, "_export_legacy", broken)
        return export(cli, "builtin:tiny-bert", "-o", out / "bert-dynamo.onnx").json()


@pytest.fixture(scope="module")
def gpt2(cli, out, zoo_dir):
    return export(cli, zoo_dir / "tiny-gpt2", "-o", out / "gpt2.onnx", "--no-kv-cache").json()


@pytest.fixture(scope="module")
def branchy(tmp_path_factory) -> Path:
    import torch
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("branchy")
    (folder / "branchy.py").write_text(BRANCHY, encoding="utf-8")
    torch.manual_seed(0)
    weights = {f"fc.{k}": v for k, v in torch.nn.Linear(8, 4).state_dict().items()}
    save_file(weights, str(folder / "weights.safetensors"))
    return folder


def dims(report, kind="inputs"):
    return {value["name"]: value["dims"] for value in report[kind]}


@pytest.mark.slow
def test_bert_export_has_model_names_and_shared_dynamic_dims(bert) -> None:
    # auto on a Hugging Face model: the legacy exporter first (fast, the graph ONNX Runtime fuses), kept as it verifies
    assert bert["passed"] and bert["exporter_used"] == "legacy" and bert["fallback_reason"] is None
    assert dims(bert) == {"input_ids": ["batch", "sequence"], "attention_mask": ["batch", "sequence"],
                          "token_type_ids": ["batch", "sequence"]}
    assert dims(bert, "outputs") == {"logits": ["batch", 2]}
    assert bert["opset"] == 20 and bert["checker"].startswith("passed")
    assert bert["external_data"] is False and list(bert["files"]) == ["bert.onnx"]
    assert set(bert["stages"]) == {"load", "export", "check", "verify", "optimize", "write"}
    # --optimize auto: ONNX Runtime's transformer fusions, timed against the plain graph; kept only if faster
    (fusion,) = bert["optimize_passes"]
    assert fusion["name"] == "transformer-fusion" and fusion["latency_before_ms"] > 0
    assert fusion["accepted"] == (fusion["latency_before_ms"] >= 1.02 * fusion["latency_after_ms"])
    assert bert["nodes"] == (fusion["nodes_after"] if fusion["accepted"] else fusion["nodes_before"])


@pytest.mark.slow
def test_auto_falls_back_to_dynamo_when_the_legacy_graph_fails(bert_dynamo) -> None:
    assert bert_dynamo["passed"] and bert_dynamo["exporter_used"] == "dynamo"
    assert bert_dynamo["fallback_reason"] == "ONNX export failed (legacy failed: legacy exporter broken for this test)"
    assert any(w.startswith("legacy exporter failed, used the dynamo exporter: ONNX export failed")
               for w in bert_dynamo["warnings"])
    assert dims(bert_dynamo, "outputs") == {"logits": ["batch", 2]}


@pytest.mark.slow
def test_bert_export_is_verified_at_shapes_other_than_the_example(bert) -> None:
    verification = bert["verification"]
    labels = [shape["input_shapes"]["input_ids"] for shape in verification["shapes"]]
    assert labels == [[2, 16], [1, 8], [3, 32]]  # the example first, then other batch and sequence sizes
    assert all(shape["passed"] and shape["outputs"][0]["name"] == "logits" for shape in verification["shapes"])
    assert verification["candidate_backend"] == "onnxruntime" and verification["reference_backend"] == "torch"
    assert all(shape["speed_ratio"] > 0 for shape in verification["shapes"])


@pytest.mark.slow
def test_causal_lm_exports_logits_without_cache(gpt2) -> None:
    assert gpt2["passed"], gpt2["verdict"]
    assert dims(gpt2) == {"input_ids": ["batch", "sequence"], "attention_mask": ["batch", "sequence"]}
    assert list(dims(gpt2, "outputs")) == ["logits"]  # no past_key_values
    assert dims(gpt2, "outputs")["logits"][:2] == ["batch", "sequence"]
    shapes = gpt2["verification"]["shapes"]
    assert shapes[2]["outputs"][0]["masked_out"] > 0  # padded positions excluded


@pytest.mark.slow
def test_vision_model_and_cnn_from_weights_and_arch(cli, out, zoo_dir) -> None:
    vit = export(cli, "builtin:tiny-vit", "-o", out / "vit.onnx").json()
    assert vit["passed"] and dims(vit) == {"pixel_values": ["batch", 3, 32, 32]}
    convnet = export(cli, zoo_dir / "convnet" / "model.safetensors", "--arch", "mlops_cli.core.zoo:ConvNet",
                     "-o", out / "convnet.onnx").json()
    assert convnet["passed"] and dims(convnet) == {"x": ["batch", 1, 28, 28]}
    assert dims(convnet, "outputs") == {"output": ["batch", 10]}
    assert [s["input_shapes"]["x"][0] for s in convnet["verification"]["shapes"]] == [2, 1, 3]


def test_legacy_exporter_on_a_weights_folder_with_opset_18(cli, out, zoo_dir) -> None:
    report = export(cli, zoo_dir / "lenet", "-o", out / "lenet18.onnx", "--exporter", "legacy", "--opset", "18").json()
    assert report["passed"] and report["exporter_used"] == "legacy"
    assert report["opset"] == 18 and onnx.load(str(out / "lenet18.onnx")).opset_import[0].version == 18
    assert dims(report) == {"x": ["batch", 1, 32, 32]}


def test_human_output_shows_tables_and_stage_times(cli, out) -> None:
    result = cli("export", "onnx", "builtin:convnet", "-o", out / "human.onnx", "--exporter", "legacy",
                 "--repeats", "1")
    assert result.exit_code == 0, result.stderr
    for words in ("ONNX export: builtin:convnet", "Graph inputs and outputs", "Verification:", "Time per stage",
                  "PASS"):
        assert words in result.stdout


@pytest.mark.slow
def test_static_export_breaks_at_other_shapes_and_verify_parity_says_so(cli, out) -> None:
    static = export(cli, "builtin:convnet", "-o", out / "static.onnx", "--static").json()
    assert static["passed"] and static["dynamic_dims"] == []
    assert dims(static) == {"x": [2, 1, 28, 28]}
    assert any("static export" in note for note in static["notes"])
    result = cli("verify-parity", "builtin:convnet", out / "static.onnx", "--json", "--repeats", "1")
    assert result.exit_code == 6
    report = result.json()
    assert "candidate failed at batch=1" in report["verdict"] and "fixed shapes" in report["verdict"]
    assert report["worst_output"] == "(all outputs) at batch=1"


@pytest.mark.slow
def test_auto_falls_back_to_legacy_and_failed_verification_keeps_the_file(cli, out, branchy) -> None:
    target = out / "branchy.onnx"
    result = export(cli, branchy / "weights.safetensors", "--arch", f"{branchy / 'branchy.py'}:make",
                    "--input", "x:float32[batch=2,8]", "-o", target)
    assert result.exit_code == 6
    report = result.json()  # the JSON report is still printed for CI
    assert report["exporter_used"] == "legacy"
    assert "dynamo fixed x[0] (batch) = 2" in report["fallback_reason"]
    assert not report["passed"] and "output at batch=" in report["verdict"]
    assert target.is_file() and "kept for inspection" in result.stderr
    assert any("used the legacy exporter" in warning for warning in report["warnings"])


def test_explicit_dynamo_reports_dims_it_had_to_fix(cli, out, branchy) -> None:
    result = export(cli, branchy / "weights.safetensors", "--arch", f"{branchy / 'branchy.py'}:make",
                    "--input", "x:float32[batch=2,8]", "-o", out / "branchy-dynamo.onnx", "--exporter", "dynamo")
    assert result.exit_code == 6
    report = result.json()
    assert report["exporter_used"] == "dynamo" and dims(report) == {"x": [2, 8]}
    assert any("fixed dims asked to be dynamic: x[0] (batch) = 2" in w for w in report["warnings"])


def test_external_data_and_no_stale_data_on_re_export(cli, out) -> None:
    target = out / "ext.onnx"
    first = export(cli, "builtin:convnet", "-o", target, "--exporter", "legacy", "--external-data").json()
    assert first["passed"] and first["external_data"]
    assert set(first["files"]) == {"ext.onnx", "ext.onnx.data"}
    assert (out / "ext.onnx.data").stat().st_size > 800_000 > target.stat().st_size
    again = export(cli, "builtin:convnet", "-o", target, "--exporter", "legacy", "--force").json()
    assert again["passed"] and not again["external_data"]
    assert not (out / "ext.onnx.data").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".ext.onnx")]  # no temporary leftovers


def test_weights_over_the_threshold_go_to_external_data(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", 1000)
    loaded = load_model("builtin:lenet")
    plan = plan_inputs(loaded)
    result = onnx_export.write_onnx(loaded, tmp_path / "big.onnx", plan.example, exporter="legacy", specs=plan.specs)
    assert result.external_data and Path(result.data_file).name == "big.onnx.data"
    assert onnx_export.graph_info(tmp_path / "big.onnx").inputs[0].dims == ("batch", 1, 32, 32)


def test_legacy_export_names_the_dynamic_output_dims(tmp_path) -> None:
    loaded = load_model("builtin:convnet")
    plan = plan_inputs(loaded)
    result = onnx_export.write_onnx(loaded, tmp_path / "c.onnx", plan.example, exporter="legacy", specs=plan.specs)
    assert result.input_names == ("x",) and result.output_names == ("output",)
    assert result.dynamic_axes == {"x": {0: "batch"}} and result.exporter_used == "legacy"
    info = onnx_export.graph_info(tmp_path / "c.onnx")
    assert info.inputs[0].dims == ("batch", 1, 28, 28) and info.outputs[0].dims == ("batch", 10)


def test_optimize_reports_node_counts_and_keeps_verified_faster_passes(cli, out, monkeypatch) -> None:
    monkeypatch.setattr(service, "_latencies", lambda before, after, example: (2.0, 1.0))  # every pass 2x faster
    report = export(cli, "builtin:convnet", "-o", out / "opt.onnx", "--exporter", "legacy", "--optimize", "all").json()
    assert report["passed"]
    passes = {p["name"]: p for p in report["optimize_passes"]}
    assert set(passes) == {"onnxslim", "onnxruntime"}  # no transformer fusion for a plain CNN
    assert all(p["accepted"] and p["reason"].startswith("kept: faster, 2.00x") for p in passes.values())
    assert passes["onnxruntime"]["nodes_after"] < passes["onnxruntime"]["nodes_before"]
    assert report["nodes"] == passes["onnxruntime"]["nodes_after"]
    assert "optimize" in report["stages"]


def test_a_pass_that_is_not_faster_is_reported_and_not_applied(cli, out, monkeypatch) -> None:
    monkeypatch.setattr(service, "_latencies", lambda before, after, example: (1.0, 1.01))
    report = export(cli, "builtin:convnet", "-o", out / "slow.onnx", "--exporter", "legacy", "--optimize", "ort").json()
    assert report["passed"]
    (ort,) = report["optimize_passes"]
    assert not ort["accepted"] and ort["reason"].startswith("not kept: no faster, 0.99x at batch=2")
    assert ort["nodes_after"] < ort["nodes_before"] == report["nodes"]  # smaller, yet the plain graph was kept
    assert (ort["latency_before_ms"], ort["latency_after_ms"]) == (1.0, 1.01)


def test_a_pass_that_changes_the_outputs_is_rejected(tmp_path, monkeypatch) -> None:
    def corrupting_pass(source: Path, destination: Path) -> None:
        model = onnx.load(str(source))
        for initializer in model.graph.initializer:
            if initializer.dims and len(initializer.dims) == 1:  # a bias
                values = onnx.numpy_helper.to_array(initializer) + 1.0
                initializer.CopyFrom(onnx.numpy_helper.from_array(values.astype(np.float32), initializer.name))
        onnx.save(model, str(destination))

    monkeypatch.setattr(service, "_slim", corrupting_pass)
    monkeypatch.setattr(service, "_latencies", lambda before, after, example: (2.0, 1.0))
    options = service.ExportOnnxOptions(output=tmp_path / "lenet.onnx", exporter="legacy", optimize="slim", repeats=1,
                                        tolerances=Tolerances())
    report = service.run(ModelRef.parse("builtin:lenet"), options)
    assert report.passed  # the broken pass was dropped, the plain export kept
    (slim,) = report.optimize_passes
    assert not slim.accepted and slim.reason.startswith("rejected, changes the outputs")
    assert report.verification.passed


def test_the_models_outputs_are_computed_once_for_all_verifications(tmp_path, monkeypatch) -> None:
    from mlops_cli.core import runtimes

    calls: list[int] = []
    real_runner_for = runtimes.runner_for

    def counting_runner_for(loaded, device="cpu"):
        runner = real_runner_for(loaded, device)
        forward = runner.call
        runner.call = lambda inputs: calls.append(1) or forward(inputs)
        return runner

    monkeypatch.setattr(runtimes, "runner_for", counting_runner_for)
    monkeypatch.setattr(service, "_latencies", lambda before, after, example: (2.0, 1.0))
    options = service.ExportOnnxOptions(output=tmp_path / "lenet.onnx", exporter="legacy", optimize="all")
    report = service.run(ModelRef.parse("builtin:lenet"), options)
    assert report.passed and [p.accepted for p in report.optimize_passes] == [True, True]  # 3 verifications
    assert len(calls) == len(report.verification.shapes) + 2  # each set once, plus the determinism check's two runs


def test_a_pass_measured_no_faster_is_not_rerun_for_the_same_architecture(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("MLOPS_CACHE_DIR", str(tmp_path / "cache"))
    timed: list[str] = []

    def slower(before, after, example):
        timed.append(after.name)
        return (1.0, 1.5)

    monkeypatch.setattr(service, "_latencies", slower)
    model = ModelRef.parse("builtin:tiny-bert")
    first = service.run(model, service.ExportOnnxOptions(output=tmp_path / "first.onnx"))
    again = service.run(model, service.ExportOnnxOptions(output=tmp_path / "again.onnx"))
    (measured,), (recalled,) = first.optimize_passes, again.optimize_passes
    assert first.passed and again.passed and len(timed) == 1  # the second export did not run the pass
    assert not measured.accepted and measured.reason.startswith("not kept: no faster, 0.67x")
    assert not recalled.accepted and "measured on an earlier export of this architecture" in recalled.reason
    assert (recalled.latency_before_ms, recalled.latency_after_ms) == (1.0, 1.5)
    explicit = service.run(model, service.ExportOnnxOptions(output=tmp_path / "explicit.onnx", optimize="fusion"))
    assert len(timed) == 2 and not explicit.optimize_passes[0].accepted  # asked for by name: measured again


def test_output_rules_exit_5(cli, out, zoo_dir) -> None:
    existing = out / "exists.onnx"
    existing.write_bytes(b"keep me")
    result = cli("export", "onnx", "builtin:convnet", "-o", existing)
    assert result.exit_code == 5 and "--force" in result.stderr
    assert existing.read_bytes() == b"keep me"
    into_input = cli("export", "onnx", zoo_dir / "convnet", "-o", zoo_dir / "convnet" / "model.onnx")
    assert into_input.exit_code == 5 and "overwrite the input" in into_input.stderr
    folder = cli("export", "onnx", "builtin:convnet", "-o", out, "--force")
    assert folder.exit_code == 5 and "is a folder" in folder.stderr


def test_usage_errors_exit_2(cli, out) -> None:
    assert cli("export", "onnx", "builtin:convnet", "-o", out / "x.onnx", "--opset", "11").exit_code == 2
    assert cli("export", "onnx", "builtin:convnet", "-o", out / "x.onnx", "--exporter", "magic").exit_code == 2
    legacy21 = cli("export", "onnx", "builtin:convnet", "-o", out / "x.onnx", "--exporter", "legacy", "--opset", "21")
    assert legacy21.exit_code == 2 and "opset <= 20" in legacy21.stderr
    no_verify = cli("export", "onnx", "builtin:convnet", "-o", out / "x.onnx", "--no-verify", "--optimize", "slim")
    assert no_verify.exit_code == 2 and "--optimize needs verification" in no_verify.stderr
    fusion = cli("export", "onnx", "builtin:convnet", "-o", out / "x.onnx", "--optimize", "fusion")
    assert fusion.exit_code == 2 and "transformer fusions do not know builtin:convnet" in fusion.stderr
    assert not (out / "x.onnx").exists()


def test_onnx_input_is_refused(cli, out) -> None:
    graph = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "g",
                                   [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 3])],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 3])])
    onnx.save(onnx.helper.make_model(graph), str(out / "relu.onnx"))
    result = cli("export", "onnx", out / "relu.onnx", "-o", out / "again.onnx")
    assert result.exit_code == 2 and "already an ONNX model" in result.stderr


def test_no_verify_skips_the_parity_check(cli, out) -> None:
    report = export(cli, "builtin:convnet", "-o", out / "nv.onnx", "--exporter", "legacy", "--no-verify").json()
    assert report["passed"] and report["verification"] is None and "not verified" in report["verdict"]


# ---------------------------------------------------------------- job files


@pytest.mark.parametrize("job_file", sorted(Path(__file__).parent.parent.joinpath("configs").glob("*.*")),
                         ids=lambda p: p.name)
def test_every_job_file_names_real_commands_and_options(job_file) -> None:
    """Through the resolver `--config` uses: a key naming no command or option raises UsageError."""
    import typer.main

    from mlops_cli.app import app, load_job_file, resolve_job_keys

    data = load_job_file(job_file)
    assert data, f"{job_file} is empty"
    assert resolve_job_keys(typer.main.get_command(app), data)


def test_ci_job_file_drives_export_and_verify_parity(cli, out) -> None:
    config = Path(__file__).parent.parent / "configs" / "ci-export.yaml"
    exported = cli("--config", config, "export", "onnx", "builtin:convnet", "-o", out / "ci.onnx", "--json",
                   "--exporter", "legacy")  # the command line wins over the job file
    assert exported.exit_code == 0, exported.stderr
    report = exported.json()
    assert report["opset"] == 20 and report["optimize_passes"]  # optimize: slim comes from the job file
    assert report["exporter_used"] == "legacy"
    checked = cli("--config", config, "verify-parity", "builtin:convnet", out / "ci.onnx", "--json")
    assert checked.exit_code == 0, checked.stderr
    parity = checked.json()
    assert parity["input_sets"] == 6  # samples: 2 from the job file, 3 shape sets each
    assert parity["parity"]["shapes"][0]["reference_latency"]["repeats"] == 5


@pytest.fixture(scope="module")
def convnet_archives(out) -> tuple[Path, Path]:
    """The built-in ConvNet as a TorchScript trace and as a torch.export program with a dynamic batch."""
    import torch

    from mlops_cli.core import zoo

    model, _ = zoo.build("convnet")
    example = torch.randn(2, 1, 28, 28)
    torch.jit.trace(model, example).save(str(out / "convnet.ts.pt"))
    program = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, str(out / "convnet.pt2"))
    return out / "convnet.ts.pt", out / "convnet.pt2"


def test_torchscript_archive_exports_with_the_legacy_exporter(cli, out, convnet_archives) -> None:
    traced, _ = convnet_archives
    spec = ("--input", "x:float32[batch=2,1,28,28]")
    report = export(cli, traced, "--trust-code", *spec, "-o", out / "from-ts.onnx").json()
    assert report["passed"] and report["exporter_used"] == "legacy" and report["fallback_reason"] is None
    assert dims(report) == {"x": ["batch", 1, 28, 28]}
    refused = cli("export", "onnx", traced, "--trust-code", *spec, "-o", out / "x.onnx", "--exporter", "dynamo")
    assert refused.exit_code == 2 and "legacy exporter" in refused.stderr


@pytest.mark.slow
def test_torch_export_program_exports_with_dynamo(cli, out, convnet_archives) -> None:
    _, program = convnet_archives
    spec = ("--input", "x:float32[batch=2,1,28,28]")
    report = export(cli, program, *spec, "-o", out / "from-pt2.onnx").json()
    assert report["passed"] and report["exporter_used"] == "dynamo"
    assert dims(report) == {"x": ["batch", 1, 28, 28]}
    refused = cli("export", "onnx", program, *spec, "-o", out / "x.onnx", "--exporter", "legacy")
    assert refused.exit_code == 2 and "dynamo exporter" in refused.stderr
    parity = cli("verify-parity", "builtin:convnet", program, "--json", "--no-timing")
    assert parity.exit_code == 0, parity.stderr
    assert parity.json()["parity"]["candidate_backend"] == "torch.export"


def test_a_graph_the_checker_rejects_fails_without_verification(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(service, "run_checker", lambda path: "failed: Field 'type' of 'value_info' is required")
    options = service.ExportOnnxOptions(output=tmp_path / "lenet.onnx", exporter="legacy", repeats=1)
    report = service.run(ModelRef.parse("builtin:lenet"), options)
    assert not report.passed and report.verification is None
    assert report.verdict == "onnx.checker rejected lenet.onnx: Field 'type' of 'value_info' is required"
    assert (tmp_path / "lenet.onnx").is_file()  # kept for inspection


# ---------------------------------------------------------------- review fixes


def _metadata(path: Path) -> dict[str, int]:
    """How many metadata entries of each kind an ONNX file carries."""
    model = onnx.load(str(path))
    graph = model.graph
    values = [*graph.input, *graph.output, *graph.value_info, *graph.initializer]
    return {"node": sum(len(node.metadata_props) for node in graph.node),
            "graph": sum(prop.key.startswith("pkg.torch.") for prop in graph.metadata_props),
            "value": sum(len(value.metadata_props) for value in values),
            "doc": sum(bool(node.doc_string) for node in graph.node)}


@pytest.mark.slow
def test_dynamo_export_carries_no_stack_traces_or_local_paths(bert_dynamo, out) -> None:
    bert = bert_dynamo
    data = (out / "bert-dynamo.onnx").read_bytes()
    repo = str(Path(onnx_export.__file__).resolve().parents[2]).encode()
    assert repo not in data and b"stack_trace" not in data and b"pkg.torch" not in data
    assert _metadata(out / "bert-dynamo.onnx") == {"node": 0, "graph": 0, "value": 0, "doc": 0}
    assert bert["passed"] and bert["files"]["bert-dynamo.onnx"] < 300_000  # 528 KB with the exporter's metadata
    assert dims(bert) == {"input_ids": ["batch", "sequence"], "attention_mask": ["batch", "sequence"],
                          "token_type_ids": ["batch", "sequence"]}
    assert onnx.load(str(out / "bert-dynamo.onnx")).opset_import[0].version == 20


@pytest.mark.slow
def test_dynamo_export_is_byte_identical_and_keep_metadata_keeps_it(tmp_path) -> None:
    loaded = load_model("builtin:lenet")
    example = plan_inputs(loaded).example
    first, second, kept = (onnx_export.write_onnx(loaded, tmp_path / name, example, exporter="dynamo",
                                                  keep_metadata=name == "kept.onnx")
                           for name in ("first.onnx", "second.onnx", "kept.onnx"))
    assert first.exporter_used == second.exporter_used == kept.exporter_used == "dynamo"
    assert (tmp_path / "first.onnx").read_bytes() == (tmp_path / "second.onnx").read_bytes()
    stripped, full = _metadata(tmp_path / "first.onnx"), _metadata(tmp_path / "kept.onnx")
    assert stripped == {"node": 0, "graph": 0, "value": 0, "doc": 0}
    assert full["node"] > 0 and full["graph"] > 0
    assert b"stack_trace" in (tmp_path / "kept.onnx").read_bytes()
    assert onnx_export.graph_info(tmp_path / "first.onnx") == onnx_export.graph_info(tmp_path / "kept.onnx")


def test_unknown_per_output_tolerance_is_a_usage_error(cli, out) -> None:
    target = out / "override.onnx"
    result = cli("export", "onnx", "builtin:convnet", "-o", target, "--exporter", "legacy", "--repeats", "1",
                 "--atol", "logits=1e-3", "--json")
    assert result.exit_code == 2, result.stderr
    assert "'logits'" in result.stderr and "the outputs are: output" in result.stderr
    assert result.stdout == "" and not target.exists()


def test_leftover_data_file_beside_a_new_output_needs_force(cli, out) -> None:
    target, data = out / "fresh.onnx", out / "fresh.onnx.data"
    data.write_bytes(b"someone else's weights")
    refused = cli("export", "onnx", "builtin:convnet", "-o", target, "--exporter", "legacy", "--repeats", "1")
    assert refused.exit_code == 5 and "fresh.onnx.data" in refused.stderr and "--force" in refused.stderr
    assert data.read_bytes() == b"someone else's weights" and not target.exists()
    forced = cli("export", "onnx", "builtin:convnet", "-o", target, "--exporter", "legacy", "--repeats", "1",
                 "--force")
    assert forced.exit_code == 0, forced.stderr
    assert target.is_file() and not data.exists()  # one-file export: the stale .data is gone


def test_timing_is_off_by_default(cli, out) -> None:
    result = cli("export", "onnx", "builtin:convnet", "-o", out / "untimed.onnx", "--exporter", "legacy", "--json")
    assert result.exit_code == 0, result.stderr
    shapes = result.json()["verification"]["shapes"]
    assert shapes and all(s["passed"] and s["reference_latency"] is None and s["speed_ratio"] is None
                          for s in shapes)
    negative = cli("export", "onnx", "builtin:convnet", "-o", out / "neg.onnx", "--repeats", "-1")
    assert negative.exit_code == 2


def test_dynamo_export_with_a_batch_1_example_keeps_the_batch_dynamic(cli, out) -> None:
    report = export(cli, "builtin:convnet", "-o", out / "b1.onnx", "--exporter", "dynamo", "--batch-size", "1").json()
    assert report["passed"] and report["exporter_used"] == "dynamo" and not report["warnings"]
    assert dims(report)["x"][0] == "batch" and report["export_sizes"] == {"batch": 2}
    assert [s["input_shapes"]["x"][0] for s in report["verification"]["shapes"]] == [1, 2]
