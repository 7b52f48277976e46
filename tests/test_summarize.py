"""`mlops summarize`: figures checked against hand-computed ones on the built-in models and their files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_flops import bert_macs, convnet_macs, gpt2_macs

from mlops_cli.core.contract import LoadOptions, ModelRef
from mlops_cli.services.summarize import SummarizeOptions
from mlops_cli.services.summarize import run as summarize


def run(reference: str, load: LoadOptions | None = None, **options: Any) -> Any:
    """Summarize with the service's options; input options (inputs, batch_size, seq_len, seed) as the command
    passes them, in one InputRequest."""
    from mlops_cli.core.inputs import InputRequest

    request = InputRequest(specs=tuple(options.pop("inputs", ())), batch_size=options.pop("batch_size", None),
                           seq_len=options.pop("seq_len", None), seed=options.pop("seed", 0))
    settings = SummarizeOptions(load=load or LoadOptions(), inputs=request, **{"repeats": 1, "warmup": 0, **options})
    return summarize(ModelRef.parse(reference), settings)


def layer(report: Any, path: str) -> Any:
    return next(row for row in report.layers if row.path == path)


@pytest.fixture(scope="module")
def torch_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The ConvNet as TorchScript (code-carrying) and as a torch.export program."""
    import torch

    from mlops_cli.core import zoo

    model = zoo.build("convnet")[0]
    folder = tmp_path_factory.mktemp("torch-files")
    example = torch.randn(3, 1, 28, 28)
    torch.jit.trace(model, example).save(str(folder / "convnet.ts"))
    torch.export.save(torch.export.export(model, (example,)), str(folder / "convnet.pt2"))
    return {"ts": folder / "convnet.ts", "pt2": folder / "convnet.pt2"}


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small ONNX graph (MatMul + Add + Relu) with a symbolic batch dim and its weight in external data."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    folder = tmp_path_factory.mktemp("onnx")
    weight = numpy_helper.from_array(np.arange(64 * 32, dtype=np.float32).reshape(64, 32) / 1000, "weight")
    bias = numpy_helper.from_array(np.zeros(32, np.float32), "bias")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "weight"], ["h"]), helper.make_node("Add", ["h", "bias"], ["z"]),
         helper.make_node("Relu", ["z"], ["y"])],
        "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 32])], [weight, bias])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="test")
    model.ir_version = 8
    path = folder / "mlp.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, location="mlp.weights", size_threshold=1024)
    return path


# ---------------------------------------------------------------- services


def test_tiny_bert_folder_figures(zoo_dir: Path) -> None:
    report = run(str(zoo_dir / "tiny-bert"), batch_size=3, seq_len=8, depth=4)
    import transformers

    config = transformers.AutoConfig.from_pretrained(zoo_dir / "tiny-bert")
    compute = report.compute
    assert report.model_class == "BertForSequenceClassification"
    assert report.inputs["input_ids"] == "int64[3, 8]"
    assert compute.batch_size == 3
    assert compute.macs == bert_macs(config, 3, 8)
    assert compute.macs_per_example == bert_macs(config, 3, 8) / 3
    assert compute.flops_per_example == 2 * compute.macs_per_example
    assert compute.attention_macs == config.num_hidden_layers * 2 * 3 * 8 * 8 * config.hidden_size
    hidden, inter = config.hidden_size, config.intermediate_size
    per_layer_params = 4 * (hidden * hidden + hidden) + 2 * hidden * inter + inter + hidden + 2 * 2 * hidden
    row = layer(report, "bert.encoder.layer.0")
    assert (row.type, row.depth, row.params, row.output_shapes[0]) == ("BertLayer", 4, per_layer_params, (3, 8, hidden))
    assert row.macs == (bert_macs(config, 3, 8) - 3 * hidden * (hidden + 2)) // 2
    assert not any(r.depth > 4 for r in report.layers)
    container = layer(report, "bert.encoder.layer")  # a ModuleList is never called: its layers' sum
    assert (container.calls, container.output_shapes) == (0, ())
    assert container.macs == layer(report, "bert.encoder").macs == 2 * row.macs
    params = report.parameters
    assert params.tied == () and params.total == params.unique == params.trainable
    assert params.memory_bytes == 4 * params.unique + 8 * params.buffers  # fp32 weights, int64 id buffers
    assert report.stored.tensor_bytes == 4 * params.unique and set(report.stored.files) == {"model.safetensors"}
    assert compute.activation_peak_bytes >= 2 * 3 * 8 * inter * 4 // 2  # at least the FFN activation
    assert report.timing.repeats == 1


def test_tiny_gpt2_ties_lm_head_to_wte(zoo_dir: Path) -> None:
    report = run(str(zoo_dir / "tiny-gpt2"), batch_size=2, seq_len=12, depth=1)
    import transformers

    config = transformers.AutoConfig.from_pretrained(zoo_dir / "tiny-gpt2")
    params = report.parameters
    assert params.tied == (("transformer.wte.weight", "lm_head.weight"),)
    assert params.total - params.unique == config.vocab_size * config.n_embd  # counted twice by name, once unique
    assert report.stored.tensor_bytes == 4 * params.unique  # the file stores the tied tensor once
    assert report.compute.macs == gpt2_macs(config, 2, 12)
    assert layer(report, "lm_head").macs == 2 * 12 * config.n_embd * config.vocab_size
    assert any("lm_head.weight" in line for line in report.notes)


def test_convnet_folder_layers_and_depth(zoo_dir: Path) -> None:
    report = run(str(zoo_dir / "convnet"), batch_size=1, depth=2)
    assert report.compute.macs == report.compute.macs_per_example == convnet_macs(1)
    conv = layer(report, "conv1.0")
    assert (conv.type, conv.output_shapes, conv.params, conv.macs) == ("Conv2d", ((1, 16, 28, 28),), 160,
                                                                       16 * 28 * 28 * 9)
    assert layer(report, "conv2").output_shapes == ((1, 32, 7, 7),)
    assert layer(report, "").macs == convnet_macs(1) and layer(report, "").params == report.parameters.unique
    shallow = run(str(zoo_dir / "convnet"), depth=1, repeats=0)
    assert [r.path for r in shallow.layers] == ["", "conv1", "conv2", "fc", "out"]
    assert shallow.timing is None


def test_torchscript_and_exported_program(torch_files: dict[str, Path]) -> None:
    from mlops_cli.core.errors import UnsafeInputError

    with pytest.raises(UnsafeInputError):
        run(str(torch_files["ts"]))
    blind = run(str(torch_files["ts"]), LoadOptions(trust_code=True))
    assert blind.compute is None and blind.timing is None  # no input description: what can be known
    assert blind.parameters.unique == 214_538 and blind.model_class == "ConvNet"
    assert any("--input" in line for line in blind.notes)
    assert blind.layers and all(row.macs is None and row.output_shapes == () for row in blind.layers)
    scripted = run(str(torch_files["ts"]), LoadOptions(trust_code=True), inputs=("x:float32[batch=2,1,28,28]",))
    assert scripted.compute.macs == convnet_macs(2) and scripted.timing is not None
    exported = run(str(torch_files["pt2"]))  # inputs read from the program's placeholders
    assert exported.inputs == {"x": "float32[3, 1, 28, 28]"}
    assert exported.compute.macs == convnet_macs(3) and exported.parameters.unique == 214_538


def test_onnx_graph_facts(onnx_file: Path) -> None:
    report = run(str(onnx_file), batch_size=5)
    graph = report.onnx
    assert graph.opset == {"ai.onnx": 17} and graph.nodes == 3
    assert graph.ops == {"MatMul": 1, "Add": 1, "Relu": 1}
    assert graph.inputs == {"x": "float32[batch, 64]"} and graph.outputs == {"y": "float32[batch, 32]"}
    assert graph.initializers == 2 and graph.initializer_bytes == (64 * 32 + 32) * 4
    assert graph.external_data == {"mlp.weights": 64 * 32 * 4}  # the small bias stays inline
    assert report.stored.file_bytes == onnx_file.stat().st_size + 64 * 32 * 4
    assert report.parameters.total == 64 * 32 + 32
    assert report.inputs == {"x": "float32[5, 64]"} and report.timing.repeats == 1
    assert report.compute is None and report.layers == ()


# ---------------------------------------------------------------- command


def test_command_json_and_tables(cli: Any) -> None:
    result = cli("summarize", "builtin:convnet", "--batch-size", "1", "--repeats", "2", "--warmup", "0", "--json")
    assert result.exit_code == 0, result.output
    data = result.json()
    assert data["compute"]["macs"] == convnet_macs(1)
    assert data["parameters"]["unique"] == 214_538
    assert data["timing"]["repeats"] == 2 and data["timing"]["median_ms"] > 0
    assert data["stored"] is None and data["layers"][0]["path"] == ""
    tables = cli("summarize", "builtin:tiny-gpt2", "--repeats", "1", "--warmup", "0", "--depth", "1")
    assert tables.exit_code == 0, tables.output
    for words in ("Parameters", "Tied weights", "transformer.wte.weight = lm_head.weight", "Layers (depth 1",
                  "lm_head", "MACs per example (batch 2)", "attention MACs", "activations, peak alive",
                  "forward time, torch on cpu"):
        assert words in tables.stdout


def test_command_onnx_tables(cli: Any, onnx_file: Path) -> None:
    result = cli("summarize", onnx_file, "--repeats", "1", "--warmup", "0")
    assert result.exit_code == 0, result.output
    for words in ("ONNX graph", "float32[batch, 64]", "MatMul", "External data files", "mlp.weights",
                  "forward time, ONNX Runtime"):
        assert words in result.stdout


@pytest.mark.parametrize(("args", "code", "words"), [
    (("builtin:convnet", "--seq-len", "8"), 2, "no sequence dim"),
    (("builtin:tiny-bert", "--seq-len", "4096"), 2, "longer than the model's 128 positions"),
    (("builtin:convnet", "--input", "x:float32"), 2, "is not of the form"),
    (("builtin:convnet", "--depth", "-1"), 2, None),
    (("no/such/model",), 3, "no such file"),
    (("builtin:nope",), 2, "unknown built-in model"),
])
def test_command_errors(cli: Any, args: tuple[str, ...], code: int, words: str | None) -> None:
    result = cli("summarize", *args, "--repeats", "0")
    assert result.exit_code == code, result.output
    if words:
        assert words in result.stderr


def test_wrong_input_shape_is_reported_not_a_crash(cli: Any) -> None:
    """A --input that the model cannot take: the forward's own error, as an input error."""
    result = cli("summarize", "builtin:convnet", "--input", "x:float32[batch=1,3,28,28]", "--repeats", "0")
    assert result.exit_code == 3, result.output
    assert "forward pass failed" in result.stderr


# ---------------------------------------------------------------- dynamically quantised (compress int8) models


def test_int8_convnet_counts_packed_weights_and_their_macs(cli: Any, zoo_dir: Path, tmp_path: Path) -> None:
    """`compress int8` keeps Linear weights in packed params (outside parameters()): they are counted as qint8,
    their MACs added, and the whole equals the float model's figures."""
    int8 = tmp_path / "convnet-int8"
    made = cli("compress", "int8", zoo_dir / "convnet", "-o", int8)
    assert made.exit_code == 0, made.stderr
    report = run(str(int8), batch_size=1)
    linear_weights = 1568 * 128 + 128 * 64 + 64 * 10
    linear_biases = 128 + 64 + 10
    conv = 16 * 9 + 16 + 32 * 16 * 9 + 32
    assert report.parameters.unique == report.parameters.total == 214_538 == linear_weights + linear_biases + conv
    assert report.parameters.trainable == conv  # packed int8 weights are not trainable
    qint8 = next(d for d in report.parameters.by_dtype if d.dtype == "qint8")
    assert (qint8.tensors, qint8.elements) == (3, linear_weights)
    assert linear_weights < qint8.nbytes < linear_weights + 4_000  # 1 byte each + per-channel scales/zero points
    assert report.compute.macs == convnet_macs(1)
    assert report.compute.by_op["quantized.linear_dynamic"] == linear_weights
    fc0 = layer(report, "fc.0")
    assert (fc0.params, fc0.macs) == (1568 * 128 + 128, 1568 * 128)
    assert layer(report, "fc").macs == 1568 * 128 + 128 * 64
    assert not any(row.path.endswith("_packed_params") for row in report.layers)
    assert 0 < report.stored.tensor_bytes <= report.stored.file_bytes
    assert any("dynamically quantised" in line for line in report.notes)
    result = cli("summarize", int8, "--repeats", "1", "--warmup", "0")
    assert result.exit_code == 0, result.stderr
    assert "qint8" in result.stdout and "dynamically quantised" in " ".join(result.stdout.split())


def test_int8_gpt2_folder_matches_the_float_model(cli: Any, zoo_dir: Path, tmp_path: Path) -> None:
    """An HF folder quantised by `compress int8` (GPT-2's Conv1D became quantised Linear): same parameters and
    MACs as the float folder, tied embedding still named, stored tensors read from its model.int8.pt."""
    int8 = tmp_path / "gpt2-int8"
    made = cli("compress", "int8", zoo_dir / "tiny-gpt2", "-o", int8, "--no-check")  # drift: not the point here
    assert made.exit_code == 0, made.stderr
    quantised, float_model = run(str(int8)), run(str(zoo_dir / "tiny-gpt2"))
    assert quantised.parameters.unique == float_model.parameters.unique
    assert quantised.compute.macs == float_model.compute.macs
    assert ("transformer.wte.weight", "lm_head.weight") in quantised.parameters.tied
    assert quantised.stored.files == {"model.int8.pt": (int8 / "model.int8.pt").stat().st_size}
    assert quantised.parameters.memory_bytes < float_model.parameters.memory_bytes


# ---------------------------------------------------------------- warnings travel in the report


def test_loader_warnings_are_in_the_report_and_shown_once(cli: Any, zoo_dir: Path, tmp_path: Path) -> None:
    """A tokenizer that fails to load does not stop a summary: the loader's warning is in report.warnings, in the
    JSON object with --json, and on stderr (once) otherwise."""
    import shutil

    folder = tmp_path / "broken-tokenizer"
    shutil.copytree(zoo_dir / "tiny-bert", folder)
    (folder / "tokenizer.json").write_text("{not json", encoding="utf-8")
    report = run(str(folder), repeats=0)
    assert len(report.warnings) == 1 and "tokenizer" in report.warnings[0]
    as_json = cli("summarize", folder, "--repeats", "0", "--json")
    assert as_json.exit_code == 0, as_json.stderr
    assert as_json.json()["warnings"] == list(report.warnings) and "warning" not in as_json.stderr
    tables = cli("summarize", folder, "--repeats", "0")
    assert tables.exit_code == 0 and tables.stderr.count("warning: ") == 1
    assert "warning" not in tables.stdout


def test_a_torchscript_model_that_rejects_the_inputs_is_an_input_error(cli, tmp_path) -> None:
    """Found by the conformance matrix (silero-vad): TorchScript's own error type was reported as a bug (exit 1)."""
    import torch

    class Picky(torch.nn.Module):
        def forward(self, x: torch.Tensor, sr: torch.Tensor) -> torch.Tensor:
            if int(sr) not in (8000, 16000):
                raise ValueError("Supported sampling rates: [8000, 16000]")
            return x * 2

    path = tmp_path / "picky.pt"
    torch.jit.script(Picky()).save(str(path))
    result = cli("summarize", path, "--trust-code", "--repeats", "0", "--input", "x:float32[batch=1,4]",
                 "--input", "sr:int64[]")
    assert result.exit_code == 3, result.output
    assert "Supported sampling rates" in result.stderr
