"""ONNX files over 2 GB keep their weights in `<name>.data` beside the graph: the commands that read ONNX files
(verify-parity, summarize, compress half, compress int8) read them, and those that write ONNX files write them
the same way, atomically. The 2 GB path is exercised through a lowered `EXTERNAL_DATA_THRESHOLD` on tiny GPT-2:
its export is the only slow step, done once for the module.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from mlops_cli.core import onnx_export

LOW_THRESHOLD = 1000  # bytes: every weight matrix of tiny GPT-2 is bigger


def locations(path: Path) -> set[str]:
    """The external-data locations the graph records (empty for a self-contained file)."""
    model = onnx.load(str(path), load_external_data=False)
    return {entry.value for init in model.graph.initializer if init.data_location == onnx.TensorProto.EXTERNAL
            for entry in init.external_data if entry.key == "location"}


def leftovers(folder: Path) -> list[str]:
    """Temporaries of an atomic write (`.NAME.mlops-PID-*.tmp`) that should be gone once a command returns."""
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


@pytest.fixture(scope="module")
def ext(cli, tmp_path_factory) -> Path:
    """tiny GPT-2 exported with the threshold lowered: g.onnx and its weights in g.onnx.data."""
    folder = tmp_path_factory.mktemp("ext")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", LOW_THRESHOLD)
        result = cli("export", "onnx", "builtin:tiny-gpt2", "-o", folder / "g.onnx", "--no-kv-cache",
                     "--optimize", "none", "--repeats", "0", "--json")
    assert result.exit_code == 0, result.stderr
    assert result.json()["external_data"]
    return folder / "g.onnx"


@pytest.fixture(scope="module")
def single(ext, tmp_path_factory) -> Path:
    """The same graph as one self-contained file."""
    path = tmp_path_factory.mktemp("single") / "g.onnx"
    onnx.save(onnx.load(str(ext)), str(path))
    return path


def test_export_writes_one_data_file_with_a_relative_location(ext) -> None:
    assert sorted(p.name for p in ext.parent.iterdir()) == ["g.onnx", "g.onnx.data"]
    assert locations(ext) == {"g.onnx.data"}
    assert ext.stat().st_size < 100_000 < (ext.parent / "g.onnx.data").stat().st_size


def test_verify_parity_reads_external_data(cli, ext) -> None:
    result = cli("verify-parity", "builtin:tiny-gpt2", ext, "--repeats", "0", "--json")
    assert result.exit_code == 0, result.stderr
    assert result.json()["passed"]


def test_summarize_counts_the_data_file(cli, ext) -> None:
    result = cli("summarize", ext, "--repeats", "0", "--json")
    assert result.exit_code == 0, result.stderr
    report = result.json()
    data = (ext.parent / "g.onnx.data").stat().st_size
    assert report["onnx"]["external_data"] == {"g.onnx.data": data}
    assert report["stored"]["file_bytes"] == ext.stat().st_size + data
    assert report["parameters"]["total"] > 0


def test_compress_half_keeps_external_data_and_writes_atomically(cli, ext, tmp_path) -> None:
    out = tmp_path / "half.onnx"
    result = cli("compress", "half", ext, "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    report = result.json()
    assert report["written"] and report["drift"]["passed"]
    assert locations(out) == {"half.onnx.data"} and not leftovers(tmp_path)
    halves = [numpy_helper.to_array(i).dtype for i in onnx.load(str(out)).graph.initializer if i.dims]
    assert np.dtype(np.float16) in halves
    assert report["size"]["files_ratio"] < 0.8  # both sides' sizes count their .data files


def test_compress_int8_keeps_external_data(cli, ext, tmp_path) -> None:
    out = tmp_path / "q.onnx"
    result = cli("compress", "int8", ext, "-o", out, "--repeats", "0", "--json")
    assert result.exit_code == 0, result.stderr
    report = result.json()
    assert report["passed"] and locations(out) == {"q.onnx.data"} and not leftovers(tmp_path)
    assert report["bytes_after"] == out.stat().st_size + (tmp_path / "q.onnx.data").stat().st_size


def test_outputs_over_the_threshold_go_to_external_data(cli, single, tmp_path, monkeypatch) -> None:
    """A self-contained source whose output passes the threshold: the output gets a .data file anyway."""
    assert not locations(single)
    below = cli("compress", "half", single, "-o", tmp_path / "one.onnx", "--no-check", "--json")
    assert below.exit_code == 0, below.stderr
    assert not locations(tmp_path / "one.onnx") and not (tmp_path / "one.onnx.data").exists()
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", LOW_THRESHOLD)
    above = cli("compress", "half", single, "-o", tmp_path / "two.onnx", "--no-check", "--json")
    assert above.exit_code == 0, above.stderr
    assert locations(tmp_path / "two.onnx") == {"two.onnx.data"}


def test_a_foreign_data_file_beside_the_output_is_never_replaced_without_force(cli, ext, tmp_path) -> None:
    out = tmp_path / "half.onnx"
    foreign = tmp_path / "half.onnx.data"
    foreign.write_bytes(b"someone else's weights")
    refused = cli("compress", "half", ext, "-o", out, "--no-check")
    assert refused.exit_code == 5 and "half.onnx.data already exists" in refused.stderr
    assert foreign.read_bytes() == b"someone else's weights" and not out.exists()
    refused_int8 = cli("compress", "int8", ext, "-o", out, "--no-check")
    assert refused_int8.exit_code == 5 and foreign.read_bytes() == b"someone else's weights"
    forced = cli("compress", "half", ext, "-o", out, "--no-check", "--force")
    assert forced.exit_code == 0, forced.stderr
    assert locations(out) == {"half.onnx.data"} and foreign.stat().st_size > 1000


def test_a_failed_write_leaves_neither_file(cli, ext, tmp_path, monkeypatch) -> None:
    original = onnx_export.save_model_proto

    def write_then_fail(model, path, external):
        original(model, path, external)
        assert onnx_export.data_file(path).exists()  # both files were written in the scratch folder
        raise OSError("disk full")

    monkeypatch.setattr(onnx_export, "save_model_proto", write_then_fail)
    result = cli("compress", "half", ext, "-o", tmp_path / "half.onnx", "--no-check")
    assert result.exit_code != 0
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def escaping(ext, tmp_path_factory) -> dict[str, Path]:
    """Copies of the graph whose weights point outside its folder: `../g.onnx.data`, and an absolute path
    (to the real .data file, inside the folder: absolute locations are refused wherever they point)."""
    root = tmp_path_factory.mktemp("escaping")
    models = {}
    for label, location in (("parent", "../g.onnx.data"), ("absolute", None)):
        folder = root / label
        folder.mkdir()
        shutil.copy(ext.parent / "g.onnx.data", folder / "g.onnx.data")
        shutil.copy(ext.parent / "g.onnx.data", root / "g.onnx.data")
        model = onnx.load(str(ext), load_external_data=False)
        for init in model.graph.initializer:
            for entry in init.external_data:
                if entry.key == "location":
                    entry.value = location or str(folder / "g.onnx.data")
        onnx.save(model, str(folder / "g.onnx"))
        models[label] = folder / "g.onnx"
    return models


@pytest.mark.parametrize("label", ["parent", "absolute"])
@pytest.mark.parametrize("command", [
    ("verify-parity", "builtin:tiny-gpt2", "{model}"),
    ("summarize", "{model}"),
    ("compress", "half", "{model}", "-o", "{out}"),
    ("compress", "half", "{model}", "-o", "{out}", "--no-check", "--no-default-keep"),  # no model is loaded
    ("compress", "int8", "{model}", "-o", "{out}"),
], ids=["verify-parity", "summarize", "half", "half-no-check", "int8"])
def test_data_outside_the_model_folder_is_refused(cli, escaping, tmp_path, command, label) -> None:
    model = escaping[label]
    result = cli(*(arg.format(model=model, out=tmp_path / "out.onnx") for arg in command))
    assert result.exit_code == 4, result.stderr
    said = "an absolute path" if label == "absolute" else "outside the model folder"
    message = " ".join(result.stderr.split())  # the console wraps long lines
    assert said in message and "relative path inside" in message
    assert list(tmp_path.iterdir()) == []


def test_saving_declares_the_operator_domains_the_nodes_use(tmp_path) -> None:
    """ONNX Runtime's fusions add com.microsoft nodes without importing the domain; onnx's shape inference (run
    by the float16 converter and the int8 quantiser) rejects such a file."""
    graph = helper.make_graph(
        [helper.make_node("FastGelu", ["x"], ["y"], domain="com.microsoft")], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx_export.save_model_proto(model, tmp_path / "fused.onnx", external=False)
    saved = onnx.load(str(tmp_path / "fused.onnx"))
    assert {(o.domain, o.version) for o in saved.opset_import} == {("", 18), ("com.microsoft", 1)}
    onnx.shape_inference.infer_shapes(saved)  # no "No opset import for domain com.microsoft"


@pytest.fixture(scope="module")
def fused(ext, tmp_path_factory) -> Path:
    """tiny GPT-2 after ONNX Runtime's transformer fusions (what `export onnx --optimize fusion` keeps when it is
    faster): contrib ops (com.microsoft) whose outputs onnx's own shape inference cannot type."""
    from onnxruntime.transformers.optimizer import optimize_model

    path = tmp_path_factory.mktemp("fused") / "fused.onnx"
    optimized = optimize_model(str(ext), model_type="gpt2", num_heads=2, hidden_size=32, opt_level=0)
    optimized.save_model_to_file(str(path))
    assert any(node.domain == "com.microsoft" for node in onnx.load(str(path)).graph.node)
    return path


@pytest.mark.parametrize("kind", ["half", "int8"])
def test_compress_handles_a_fused_graph(cli, fused, tmp_path, kind) -> None:
    """Before: half wrote a graph mixing float32 and float16 around the fused ops, which ONNX Runtime refused
    after it was written (exit 3, the file left behind); int8 stopped on an untyped contrib-op output (exit 1)."""
    out = tmp_path / f"{kind}.onnx"
    result = cli("compress", kind, fused, "-o", out, "--json")
    assert result.exit_code == 0, result.output
    assert result.json()["passed"] is True


def test_a_graph_onnx_runtime_refuses_is_never_written(tmp_path) -> None:
    """atomic_onnx loads what was written before moving it into place: a broken graph leaves nothing."""
    from mlops_cli.core.errors import InputError

    mixed = helper.make_graph(  # float32 + float16: no Add kernel takes both
        [helper.make_node("Add", ["x", "h"], ["y"])], "mixed",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])], [helper.make_tensor_value_info(
            "y", onnx.TensorProto.FLOAT, [2])],
        [numpy_helper.from_array(np.ones(2, np.float16), "h")])
    model = helper.make_model(mixed, opset_imports=[helper.make_opsetid("", 17)])
    out = tmp_path / "broken.onnx"
    with pytest.raises(InputError, match="does not load in ONNX Runtime"), onnx_export.atomic_onnx(out) as written:
        onnx.save(model, str(written))
    assert not out.exists() and leftovers(tmp_path) == [] and list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def fused_ext(fused, tmp_path_factory) -> Path:
    """The fused graph with every initializer, shape constants included, in fused.onnx.data."""
    path = tmp_path_factory.mktemp("fused-ext") / "fused.onnx"
    onnx.save_model(onnx.load(str(fused)), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="fused.onnx.data", size_threshold=0)
    assert locations(path) == {"fused.onnx.data"}
    return path


def test_compress_half_of_a_fused_graph_with_external_data_from_another_folder(cli, fused_ext, tmp_path,
                                                                                monkeypatch) -> None:
    """Before: ONNX Runtime's symbolic inference read the external initializers relative to the current folder
    (exit 1 from anywhere but the model's folder)."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = cli("compress", "half", fused_ext, "-o", tmp_path / "half.onnx", "--json")
    assert result.exit_code == 0, result.output
    assert result.json()["passed"] is True


def test_compress_int8_of_a_fused_graph_that_does_not_import_its_domain(cli, fused, tmp_path) -> None:
    """Before: quantize_dynamic read the file itself, whose com.microsoft nodes onnx's shape inference refused
    without the domain's import (exit 1), and left `fused-inferred.onnx` beside the input."""
    model = onnx.load(str(fused))
    kept = [entry for entry in model.opset_import if entry.domain != "com.microsoft"]
    del model.opset_import[:]
    model.opset_import.extend(kept)
    source = tmp_path / "in" / "fused.onnx"
    source.parent.mkdir()
    onnx.save(model, str(source))
    result = cli("compress", "int8", source, "-o", tmp_path / "int8.onnx", "--json")
    assert result.exit_code == 0, result.output
    assert result.json()["passed"] is True
    assert sorted(p.name for p in source.parent.iterdir()) == ["fused.onnx"]


def test_the_kv_cache_export_and_its_int4_follow_the_one_threshold(cli, tmp_path, monkeypatch) -> None:
    """Before: the KV-cache export (and seq2seq, int4) had their own 2 GiB threshold, and int4 wrote one file
    even when its source kept its weights in a .data file."""
    with monkeypatch.context() as lowered:
        lowered.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", LOW_THRESHOLD)
        kv = cli("export", "onnx", "builtin:tiny-gpt2", "-o", tmp_path / "kv.onnx", "--engine", "torch", "--json")
    assert kv.exit_code == 0, kv.output
    assert kv.json()["external_data"] and locations(tmp_path / "kv.onnx") == {"kv.onnx.data"}
    int4 = cli("compress", "int4", tmp_path / "kv.onnx", "-o", tmp_path / "int4.onnx", "--no-eval", "--json")
    assert int4.exit_code == 0, int4.output
    assert locations(tmp_path / "int4.onnx") == {"int4.onnx.data"}
    assert leftovers(tmp_path) == []
