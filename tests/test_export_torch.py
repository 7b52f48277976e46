"""`mlops export jit` and `mlops export pt2`: artefacts for the zoo models, verified at several shapes; a model
whose Python control flow depends on a shape is caught; outputs are atomic; the examples run the archive."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest

from mlops_cli.core.contract import ModelRef
from mlops_cli.core.errors import UnsafeInputError, UsageError
from mlops_cli.core.formats import Format, detect_format
from mlops_cli.core.inputs import InputRequest, plan_inputs
from mlops_cli.core.loading import LoadOptions, load_model
from mlops_cli.core.parity import check_parity
from mlops_cli.core.runtimes import runner_for
from mlops_cli.services.export_torch import TorchExportOptions, find_cxx_compiler, run

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
FAST = ("--repeats", "0", "-q")  # no latency timing in tests (speed goals live in benchmarks/)

# Models whose forward has shape-dependent Python control flow: a trace (or torch.export) freezes the branch
# taken at the export shape. Plus one branching on VALUES (torch.export refuses it) and a plain one.
CONTROL_FLOW_MODELS = textwrap.dedent('''
    import torch
    from torch import nn


    class BatchBranch(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 3)

        def forward(self, x):
            y = self.linear(x)
            if x.shape[0] > 2:  # Python branch on the batch size
                y = y * 2
            return y


    class SequenceLoop(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 3)

        def forward(self, x):
            total = x[:, 0]
            for i in range(1, x.size(1)):  # Python loop over the sequence length
                total = total + x[:, i]
            return self.linear(total)


    class ValueBranch(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 3)

        def forward(self, x):
            y = self.linear(x)
            if y.sum() > 0:
                return y
            return -y


    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 3)

        def forward(self, x):
            return torch.relu(self.linear(x))
''')
SPECS = {"BatchBranch": "x:float32[batch=2,4]", "SequenceLoop": "x:float32[batch=2,sequence=5,4]",
         "ValueBranch": "x:float32[batch=2,4]", "Tiny": "x:float32[batch=2,4]"}


@pytest.fixture(scope="module")
def arch_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """control_flow.py with the models above, and seeded weights for each as NAME.safetensors."""
    import torch
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("control-flow")
    (folder / "control_flow.py").write_text(CONTROL_FLOW_MODELS)
    spec = importlib.util.spec_from_file_location("control_flow_models", folder / "control_flow.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name in SPECS:
        torch.manual_seed(0)
        save_file(getattr(module, name)().state_dict(), str(folder / f"{name}.safetensors"))
    return folder


def arch_args(arch_dir: Path, name: str) -> list[str]:
    return [str(arch_dir / f"{name}.safetensors"), "--arch", f"{arch_dir / 'control_flow.py'}:{name}",
            "--input", SPECS[name]]


@pytest.fixture(scope="module")
def bert_jit(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    """tiny BERT traced once for the tests that read the archive."""
    path = tmp_path_factory.mktemp("bert-jit") / "bert.pt"
    return path, run(ModelRef.parse("builtin:tiny-bert"), TorchExportOptions(output=path, repeats=1))


# ---------------------------------------------------------------- the zoo models, both ways


def test_jit_tiny_bert_takes_positional_inputs_and_returns_named_outputs(bert_jit):
    import torch

    path, report = bert_jit
    assert report.passed and report.artefacts[0].written
    assert [(i.position, i.name) for i in report.inputs] == [(0, "input_ids"), (1, "attention_mask"),
                                                             (2, "token_type_ids")]
    assert report.outputs == ("logits",) and report.output_structure == "dict"
    assert detect_format(path) == Format.TORCHSCRIPT
    assert report.artefacts[0].file_bytes == path.stat().st_size
    assert {"load", "trace", "save", "reload", "verify"} <= set(report.stages)
    # Verified at the export shape and at other batch and sequence sizes, and timed (repeats=1).
    labels = [shape.label for shape in report.artefacts[0].parity.shapes]
    assert labels[0] == "batch=2,sequence=16 (export shape)"
    assert labels[1:] == ["batch=1,sequence=8", "batch=3,sequence=32"]
    assert all(shape.candidate_latency is not None for shape in report.artefacts[0].parity.shapes)
    # The archive documents its interface, and runs positionally at a new shape, returning a dict.
    with zipfile.ZipFile(path) as archive:
        metadata = json.loads(archive.read(next(n for n in archive.namelist() if n.endswith("extra/mlops.json"))))
    assert [i["name"] for i in metadata["inputs"]] == ["input_ids", "attention_mask", "token_type_ids"]
    assert metadata["outputs"] == ["logits"]
    module = torch.jit.load(str(path))
    output = module(torch.ones(3, 7, dtype=torch.long), torch.ones(3, 7, dtype=torch.long),
                    torch.zeros(3, 7, dtype=torch.long))
    assert isinstance(output, dict) and output["logits"].shape == (3, 2)


@pytest.mark.parametrize("name", ["tiny-gpt2", "convnet", "lenet"])
def test_jit_zoo_models_verify_at_several_shapes(cli, tmp_path, name):
    result = cli("export", "jit", f"builtin:{name}", "-o", tmp_path / "model.pt", "--json", *FAST)
    assert result.exit_code == 0, result.stderr
    report = result.json()
    assert report["passed"] and report["artefacts"][0]["written"]
    shapes = report["artefacts"][0]["parity"]["shapes"]
    assert len(shapes) >= 3 and len({s["label"] for s in shapes}) == len(shapes)
    assert {s["input_shapes"][report["inputs"][0]["name"]][0] for s in shapes} >= {1, 2, 3}  # several batch sizes
    assert report["outputs"] == (["logits"] if name == "tiny-gpt2" else ["output"])
    assert detect_format(tmp_path / "model.pt") == Format.TORCHSCRIPT


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-gpt2", "convnet", "lenet"])
def test_pt2_zoo_models_keep_dynamic_dims_and_verify(cli, tmp_path, name):
    result = cli("export", "pt2", f"builtin:{name}", "-o", tmp_path / "model.pt2", "--json", *FAST)
    assert result.exit_code == 0, result.stderr
    report = result.json()
    assert report["passed"] and report["exporter"] == "torch.export"
    assert detect_format(tmp_path / "model.pt2") == Format.EXPORTED_PROGRAM
    dims = {(d["input"], d["name"]): d for d in report["dynamic_dims"]}
    first = report["inputs"][0]["name"]
    assert dims[(first, "batch")]["dynamic"]
    if name.startswith("tiny-"):
        assert dims[(first, "sequence")]["dynamic"]
        labels = {s["label"] for s in report["artefacts"][0]["parity"]["shapes"]}
        assert labels == {"batch=2,sequence=16 (export shape)", "batch=1,sequence=8", "batch=3,sequence=32"}
    assert {"torch.export", "save", "reload", "verify"} <= set(report["stages"])


def test_artefacts_load_back_through_the_model_reference_rules(bert_jit, cli):
    path, _ = bert_jit
    with pytest.raises(UnsafeInputError):
        load_model(str(path))  # TorchScript carries code: refused without --trust-code
    reference = load_model("builtin:tiny-bert")
    candidate = load_model(str(path), LoadOptions(trust_code=True))
    report = check_parity(runner_for(reference), runner_for(candidate), list(plan_inputs(reference).sets),
                          time_runs=False)
    assert report.passed, report.verdict
    from mlops_cli.app import app

    if "verify-parity" in [command.name for command in app.registered_commands]:  # written by another engineer
        result = cli("verify-parity", "builtin:tiny-bert", path, "--trust-code", "--no-timing", "--json")
        assert result.exit_code == 0, result.stderr
        assert cli("verify-parity", "builtin:tiny-bert", path, "--no-timing").exit_code == 4


# ---------------------------------------------------------------- shape-dependent control flow is caught


def test_trace_with_batch_branch_fails_naming_the_shape(cli, arch_dir, tmp_path):
    output = tmp_path / "branch.pt"
    result = cli("export", "jit", *arch_args(arch_dir, "BatchBranch"), "-o", output, "--json", "--discard-failed",
                 *FAST)
    assert result.exit_code == 6, result.stderr
    report = result.json()
    shapes = {s["label"]: s["passed"] for s in report["artefacts"][0]["parity"]["shapes"]}
    assert shapes == {"batch=2 (export shape)": True, "batch=1": True, "batch=3": False}
    assert "batch=3" in report["verdict"] and "batch=3" in result.stderr
    lines = CONTROL_FLOW_MODELS.splitlines()
    branch_line = 1 + next(i for i, line in enumerate(lines) if "if x.shape[0] > 2" in line)
    assert any(f"control_flow.py:{branch_line}" in w for w in report["tracer_warnings"])
    assert not output.exists() and list(tmp_path.iterdir()) == []  # nothing half-written, no temp file left


def test_trace_and_export_of_a_sequence_loop_fail_at_other_lengths(arch_dir, tmp_path):
    weights, _, arch, _, spec = arch_args(arch_dir, "SequenceLoop")
    common = {"load": LoadOptions(arch=arch), "inputs": InputRequest(specs=(spec,)), "repeats": 0,
              "keep_failed": False}
    traced = run(ModelRef.parse(weights), TorchExportOptions(output=tmp_path / "loop.pt", **common))
    assert not traced.passed and "sequence=" in traced.verdict and "(export shape)" not in traced.verdict
    exported = run(ModelRef.parse(weights), TorchExportOptions(output=tmp_path / "loop.pt2", mode="export", **common))
    assert not exported.passed and "sequence=" in exported.verdict
    fixed = [d for d in exported.dynamic_dims if not d.dynamic]
    assert [(d.name, d.export_size) for d in fixed] == [("sequence", 5)]
    assert any("fixed x[1] (sequence) at 5" in n for n in exported.notes)
    assert list(tmp_path.iterdir()) == []


def test_script_mode_keeps_the_control_flow(cli, arch_dir, tmp_path):
    result = cli("export", "jit", *arch_args(arch_dir, "BatchBranch"), "-o", tmp_path / "s.pt", "--mode", "script",
                 "--json", *FAST)
    assert result.exit_code == 0, result.stderr
    assert result.json()["mode"] == "script" and result.json()["passed"]


def test_a_failing_artefact_is_kept_by_default_like_export_onnx(cli, arch_dir, tmp_path):
    output = tmp_path / "branch.pt2"
    result = cli("export", "pt2", *arch_args(arch_dir, "BatchBranch"), "-o", output, *FAST)
    assert result.exit_code == 6
    assert output.exists() and detect_format(output) == Format.EXPORTED_PROGRAM
    assert "Guard failed" in result.stdout or "Guard failed" in result.stderr


def test_value_dependent_branch_cannot_be_exported(cli, arch_dir, tmp_path):
    result = cli("export", "pt2", *arch_args(arch_dir, "ValueBranch"), "-o", tmp_path / "v.pt2", *FAST)
    assert result.exit_code == 3
    assert "torch.export failed" in result.stderr and "control_flow.py:" in result.stderr
    assert "torch.cond" in result.stderr


def test_script_mode_on_a_hugging_face_model_suggests_trace(cli, tmp_path):
    result = cli("export", "jit", "builtin:tiny-bert", "-o", tmp_path / "s.pt", "--mode", "script", *FAST)
    assert result.exit_code == 3
    assert "torch.jit.script" in result.stderr and "--mode trace" in result.stderr
    assert not (tmp_path / "s.pt").exists()


# ---------------------------------------------------------------- output handling and user-facing output


def test_existing_output_is_exit_5_before_any_work(cli, tmp_path):
    output = tmp_path / "model.pt"
    output.write_bytes(b"keep me")
    for command in ("jit", "pt2"):
        result = cli("export", command, "builtin:convnet", "-o", output, *FAST)
        assert result.exit_code == 5 and "--force" in result.stderr
    assert output.read_bytes() == b"keep me"
    assert cli("export", "jit", "builtin:convnet", "-o", output, "--force", *FAST).exit_code == 0
    assert detect_format(output) == Format.TORCHSCRIPT


def test_inputs_the_model_cannot_take_are_an_input_error(cli, tmp_path):
    result = cli("export", "pt2", "builtin:convnet", "-o", tmp_path / "c.pt2", "--input", "x:float32[batch=2,3,28,28]",
                 *FAST)
    assert result.exit_code == 3
    assert "fails on the example inputs (x[2, 3, 28, 28])" in result.stderr and "--input" in result.stderr


def test_deprecation_note_is_one_line_and_torch_warnings_stay_out(cli, tmp_path):
    result = cli("export", "jit", "builtin:convnet", "-o", tmp_path / "c.pt", "--repeats", "0")
    assert result.exit_code == 0
    assert "export pt2" in result.stderr and result.stderr.count("deprecated") == 1
    assert "Warning" not in result.stdout + result.stderr  # no DeprecationWarning/TracerWarning dumps
    assert "wrote" in result.stdout and "Stages" in result.stdout and "Verification" in result.stdout
    quiet = cli("export", "jit", "builtin:convnet", "-o", tmp_path / "q.pt", *FAST)
    assert quiet.exit_code == 0 and "deprecated" not in quiet.stderr


def test_aoti_options_are_checked_before_work(cli, tmp_path, monkeypatch):
    result = cli("export", "pt2", "builtin:convnet", "-o", tmp_path / "m.pt2", "--aoti-output", tmp_path / "a.pt2")
    assert result.exit_code == 2 and "--aoti" in result.stderr
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(UsageError, match="C\\+\\+ compiler"):
        find_cxx_compiler()


@pytest.mark.slow
@pytest.mark.skipif(not shutil.which("c++") and not shutil.which("g++"), reason="AOTInductor needs a C++ compiler")
def test_aoti_package_is_compiled_and_verified(cli, arch_dir, tmp_path):
    output = tmp_path / "tiny.pt2"
    result = cli("export", "pt2", *arch_args(arch_dir, "Tiny"), "-o", output, "--aoti", "--json", *FAST)
    assert result.exit_code == 0, result.stderr
    report = result.json()
    package = tmp_path / "tiny.aoti.pt2"
    assert [(a["format"], a["written"]) for a in report["artefacts"]] == [("torch-export-pt2", True),
                                                                          ("aoti-package", True)]
    assert report["artefacts"][1]["parity"]["candidate_backend"] == "aotinductor"
    assert len(report["artefacts"][1]["parity"]["shapes"]) == 3 and "AOTInductor compile" in report["stages"]
    assert detect_format(package) == Format.AOTI_PACKAGE
    from mlops_cli.services.export_torch import aoti_runner

    outputs = aoti_runner(package, "tiny", ["x"])({"x": np.ones((5, 4), dtype=np.float32)})
    assert outputs["output"].shape == (5, 3)


# ---------------------------------------------------------------- examples/


def test_python_example_runs_the_archive_at_a_new_shape(bert_jit, capsys):
    import torch

    path, _ = bert_jit
    spec = importlib.util.spec_from_file_location("run_torchscript_example", EXAMPLES / "run_torchscript.py")
    assert spec and spec.loader
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    assert example.main([str(path), "--batch", "3", "--sequence", "8"]) == 0
    printed = capsys.readouterr().out
    assert "input  input_ids: int64 [3, 8]" in printed and "output logits: float32 [3, 2]" in printed
    module, interface = example.load_archive(str(path))
    tensors = example.make_inputs(interface, {"batch": 3, "sequence": 8})
    eager = load_model("builtin:tiny-bert").module
    with torch.inference_mode():
        expected = eager(**dict(zip(["input_ids", "attention_mask", "token_type_ids"], tensors, strict=True))).logits
    torch.testing.assert_close(example.run(module, tensors)["logits"], expected)


def _cpp_toolchain_problem() -> str | None:
    if not shutil.which("cmake"):
        return "cmake is not installed"
    if not (shutil.which("c++") or shutil.which("g++")):
        return "no C++ compiler"
    import torch

    if not (Path(torch.utils.cmake_prefix_path) / "Torch" / "TorchConfig.cmake").is_file():
        return "this torch wheel ships no libtorch CMake config"
    return None


@pytest.mark.slow
def test_cpp_example_runs_the_archive(bert_jit, cli, tmp_path):
    """Build examples/torchscript_cpp against the wheel's libtorch and compare its outputs with Python's."""
    problem = _cpp_toolchain_problem()
    if problem:
        pytest.skip(f"C++ example not built: {problem}")
    import torch

    build = tmp_path / "build"
    configure = subprocess.run(["cmake", "-S", EXAMPLES / "torchscript_cpp", "-B", build,
                                f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}", "-DCMAKE_BUILD_TYPE=Release"],
                               capture_output=True, text=True)
    if configure.returncode != 0:
        pytest.skip(f"C++ example not built: cmake configure failed: {configure.stderr.strip()[-300:]}")
    compiled = subprocess.run(["cmake", "--build", build, "--parallel", str(os.cpu_count() or 1)],
                              capture_output=True, text=True)
    assert compiled.returncode == 0, compiled.stdout[-2000:] + compiled.stderr[-2000:]
    binary = build / "run_torchscript"

    bert, _ = bert_jit
    ran = subprocess.run([binary, bert, "2x8:int64", "2x8:int64", "2x8:int64"], capture_output=True, text=True)
    assert ran.returncode == 0, ran.stderr
    ones = torch.ones(2, 8, dtype=torch.long)
    expected = torch.jit.load(str(bert))(ones, ones, ones)["logits"].double().sum().item()
    line = next(line for line in ran.stdout.splitlines() if line.startswith("logits: shape=[2, 2]"))
    assert float(line.split("sum=")[1].split()[0]) == pytest.approx(expected, abs=1e-5)

    convnet = tmp_path / "convnet.pt"
    assert cli("export", "jit", "builtin:convnet", "-o", convnet, *FAST).exit_code == 0
    ran = subprocess.run([binary, convnet, "3x1x28x28:float32"], capture_output=True, text=True)
    assert ran.returncode == 0, ran.stderr
    torch.manual_seed(0)  # the C++ runner fills float inputs with torch::randn after manual_seed(0)
    expected = torch.jit.load(str(convnet))(torch.randn(3, 1, 28, 28)).double().sum().item()
    line = next(line for line in ran.stdout.splitlines() if line.startswith("output: shape=[3, 10]"))
    assert float(line.split("sum=")[1].split()[0]) == pytest.approx(expected, abs=1e-4)


# ---------------------------------------------------------------- size-1 examples (issue #13.5)


@pytest.mark.parametrize("inputs", [("--batch-size", "1"), ("--input", "x:float32[batch=1,1,28,28]")],
                         ids=["batch-size", "input-spec"])
def test_pt2_with_a_batch_1_example_keeps_the_batch_dynamic(cli, tmp_path, inputs):
    """torch.export fixes size-1 dims: the example is raised to 2, and the program verified at 1 and above."""
    result = cli("export", "pt2", "builtin:convnet", "-o", tmp_path / "c.pt2", *inputs, "--json", *FAST)
    assert result.exit_code == 0, result.stderr
    report = result.json()
    (batch,) = report["dynamic_dims"]
    assert batch["dynamic"] and batch["export_size"] == 2 and report["export_sizes"] == {"batch": 2}
    sizes = [s["input_shapes"]["x"][0] for s in report["artefacts"][0]["parity"]["shapes"]]
    assert 1 in sizes and max(sizes) > 1 and all(s["passed"] for s in report["artefacts"][0]["parity"]["shapes"])
    assert any("exported at batch=2, not batch=1" in note for note in report["notes"])
