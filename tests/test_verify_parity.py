"""`mlops verify-parity REFERENCE CANDIDATE`: PyTorch vs ONNX Runtime / TorchScript, ONNX vs ONNX, inputs
from shape sets, specs and files, tolerances and presets, padding, latency, and every trap of the issue:
a candidate traced at one shape, dropout left on, output count/name/shape mismatch, NaN/inf."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from mlops_cli.core.inputs import plan_inputs
from mlops_cli.core.loading import load_model
from mlops_cli.core.onnx_export import write_onnx

SHAPE_BAKED = '''
import torch


class Pooled(torch.nn.Module):
    """Reshapes with the batch size as a Python int: a trace records the number, not the dim."""

    def __init__(self, p=0.0):
        super().__init__()
        self.fc = torch.nn.Linear(8, 4)
        self.drop = torch.nn.Dropout(p)

    def forward(self, x):
        batch = int(x.shape[0])
        return self.drop(self.fc(x)).reshape(batch, -1)


def make(p=0.0):
    return Pooled(p)
'''


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("parity")


def legacy_onnx(reference: str, path: Path) -> Path:
    loaded = load_model(reference)
    plan = plan_inputs(loaded)
    write_onnx(loaded, path, plan.example, exporter="legacy", specs=plan.specs)
    return path


@pytest.fixture(scope="module")
def bert_onnx(out) -> Path:
    return legacy_onnx("builtin:tiny-bert", out / "bert.onnx")


@pytest.fixture(scope="module")
def gpt2_onnx(out) -> Path:
    return legacy_onnx("builtin:tiny-gpt2", out / "gpt2.onnx")


@pytest.fixture(scope="module")
def pooled(out) -> Path:
    """A weights file + architecture file whose module reshapes with a Python int batch size."""
    (out / "pooled.py").write_text(SHAPE_BAKED, encoding="utf-8")
    torch.manual_seed(0)
    from safetensors.torch import save_file

    save_file({f"fc.{k}": v for k, v in torch.nn.Linear(8, 4).state_dict().items()}, str(out / "pooled.safetensors"))
    return out


def trace(pooled: Path, name: str, *, train: bool, p: float = 0.0) -> Path:
    import importlib.util

    spec = importlib.util.spec_from_file_location("pooled_arch", pooled / "pooled.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from safetensors.torch import load_file

    model = module.make(p)
    model.load_state_dict(load_file(str(pooled / "pooled.safetensors")))
    model.train(train)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TracerWarning about int(x.shape[0]) is the point of this model
        traced = torch.jit.trace(model, torch.randn(2, 8), check_trace=False)
    traced.save(str(pooled / name))
    return pooled / name


def handmade_onnx(path: Path, outputs: dict[str, tuple[int, str | None]], in_features: int = 784,
                  reshape_to: tuple[int, ...] = (-1, 784)) -> Path:
    """x[batch,1,28,28] -> flatten -> one MatMul per output (optionally followed by an op such as Log)."""
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["flat"])]
    initializers = [numpy_helper.from_array(np.array(reshape_to, dtype=np.int64), "shape")]
    values = []
    for name, (width, post) in outputs.items():
        rng = np.random.default_rng(sum(map(ord, name)))  # the same weights for the same output name
        weight = rng.standard_normal((in_features, width)).astype(np.float32)
        initializers.append(numpy_helper.from_array(weight, f"w_{name}"))
        nodes.append(helper.make_node("MatMul", ["flat", f"w_{name}"], [f"{name}_mm" if post else name]))
        if post:
            nodes.append(helper.make_node(post, [f"{name}_mm"], [name]))
        values.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", width]))
    graph = helper.make_graph(nodes, "handmade",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1, 28, 28])], values,
                              initializers)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


def parity(cli, *args):
    result = cli("verify-parity", *args, "--json", "--repeats", "2")
    assert result.exit_code in (0, 6), result.stderr
    return result


def test_bert_vs_its_onnx_export_passes_with_stats_and_latency(cli, bert_onnx) -> None:
    result = parity(cli, "builtin:tiny-bert", bert_onnx)
    assert result.exit_code == 0
    report = result.json()
    assert report["passed"] and report["worst_output"] is None
    inner = report["parity"]
    assert inner["reference_backend"] == "torch" and inner["candidate_backend"] == "onnxruntime"
    assert [s["label"] for s in inner["shapes"]] == ["batch=2,sequence=16", "batch=1,sequence=8", "batch=3,sequence=32"]
    diff = inner["shapes"][0]["outputs"][0]
    assert diff["name"] == "logits"
    for stat in ("max_abs", "max_rel", "mean_abs", "p99_abs", "cosine", "top1_agreement", "min_atol_to_pass"):
        assert diff[stat] is not None
    shape = inner["shapes"][2]
    assert shape["reference_latency"]["repeats"] == 2 and shape["candidate_latency"]["median_ms"] > 0
    assert shape["speed_ratio"] > 0


def test_human_output_has_tables_and_verdict(cli, bert_onnx) -> None:
    result = cli("verify-parity", "builtin:tiny-bert", bert_onnx, "--repeats", "1")
    assert result.exit_code == 0
    for words in ("Parity check", "Per output and input set", "Latency", "PASS", "padded positions excluded"):
        assert words in result.stdout


def test_padding_is_excluded_by_default_and_included_on_request(cli, gpt2_onnx) -> None:
    excluded = parity(cli, "builtin:tiny-gpt2", gpt2_onnx, "--no-timing").json()["parity"]
    assert excluded["masked_positions_excluded"]
    assert excluded["shapes"][0]["outputs"][0]["masked_out"] > 0  # batch=2 rows are padded
    included = parity(cli, "builtin:tiny-gpt2", gpt2_onnx, "--no-timing", "--include-padding").json()["parity"]
    assert not included["masked_positions_excluded"]
    assert included["shapes"][0]["outputs"][0]["masked_out"] == 0
    assert included["shapes"][0]["reference_latency"] is None


def test_tolerances_presets_and_per_output_overrides(cli, bert_onnx) -> None:
    fp16 = parity(cli, "builtin:tiny-bert", bert_onnx, "--preset", "fp16", "--no-timing").json()
    assert fp16["preset"] == "fp16" and (fp16["parity"]["atol"], fp16["parity"]["rtol"]) == (1e-2, 1e-2)
    strict = parity(cli, "builtin:tiny-bert", bert_onnx, "--atol", "0", "--rtol", "0", "--atol", "logits=1e-3",
                    "--no-timing").json()
    assert strict["passed"] and strict["parity"]["shapes"][0]["outputs"][0]["atol"] == 1e-3
    failing = parity(cli, "builtin:tiny-bert", bert_onnx, "--atol", "logits=0", "--rtol", "0", "--no-timing")
    assert failing.exit_code == 6
    assert failing.json()["worst_output"].startswith("logits at ") and "worst: logits at" in failing.stderr


def test_samples_seed_and_input_specs(cli, out) -> None:
    onnx_path = legacy_onnx("builtin:convnet", out / "convnet.onnx")
    report = parity(cli, "builtin:convnet", onnx_path, "--samples", "2", "--seed", "7", "--no-timing",
                    "--input", "x:float32[batch=4,1,28,28]").json()
    assert report["passed"] and report["input_sets"] == 6
    assert [s["label"] for s in report["parity"]["shapes"]] == ["batch=4 #1", "batch=1 #1", "batch=5 #1",
                                                                "batch=4 #2", "batch=1 #2", "batch=5 #2"]
    assert report["input_source"] == "--input specs, 2 random draw(s), seed 7"


@pytest.mark.parametrize("suffix", ["npz", "safetensors"])
def test_real_inputs_from_a_file(cli, out, suffix) -> None:
    onnx_path = out / "convnet.onnx"
    if not onnx_path.exists():
        legacy_onnx("builtin:convnet", onnx_path)
    x = np.random.default_rng(3).standard_normal((5, 1, 28, 28)).astype(np.float32)
    inputs = out / f"inputs.{suffix}"
    if suffix == "npz":
        np.savez(inputs, x=x)
    else:
        from safetensors.numpy import save_file

        save_file({"x": x}, str(inputs))
    report = parity(cli, "builtin:convnet", onnx_path, "--inputs", inputs, "--no-timing").json()
    assert report["passed"] and report["input_source"] == f"file inputs.{suffix}"
    assert report["parity"]["shapes"][0]["input_shapes"] == {"x": [5, 1, 28, 28]}


def test_trap_candidate_traced_at_one_shape_breaks_at_another(cli, pooled) -> None:
    traced = trace(pooled, "traced.pt", train=False)
    result = parity(cli, pooled / "pooled.safetensors", traced, "--arch", f"{pooled / 'pooled.py'}:make",
                    "--trust-code", "--input", "x:float32[batch=2,8]", "--no-timing")
    assert result.exit_code == 6
    report = result.json()
    assert report["parity"]["candidate_backend"] == "torchscript"
    batch2, batch1, batch3 = report["parity"]["shapes"]
    assert batch2["passed"]  # the traced size
    # The trace replays `reshape(2, -1)`: no crash, silently wrong shapes at every other batch size.
    assert batch1["outputs"][0]["problem"] == "shape mismatch: reference (1, 4) vs candidate (2, 2)"
    assert batch3["outputs"][0]["problem"] == "shape mismatch: reference (3, 4) vs candidate (2, 6)"
    assert report["worst_output"] == "output at batch=1"
    assert "no tolerance makes this pass" in result.stderr and "--preset" not in result.stderr


def test_trap_dropout_left_on_is_called_non_deterministic(cli, pooled) -> None:
    noisy = trace(pooled, "noisy.pt", train=True, p=0.5)
    result = parity(cli, pooled / "pooled.safetensors", noisy, "--arch", f"{pooled / 'pooled.py'}:make",
                    "--trust-code", "--input", "x:float32[batch=2,8]", "--no-timing")
    assert result.exit_code == 6
    verdict = result.json()["verdict"]
    assert "candidate is non-deterministic" in verdict and "dropout" in verdict


def test_trap_output_shape_mismatch_shows_both_shapes(cli, out) -> None:
    five = handmade_onnx(out / "five.onnx", {"output": (5, None)})
    result = parity(cli, "builtin:convnet", five, "--no-timing")
    assert result.exit_code == 6
    assert "shape mismatch: reference (2, 10) vs candidate (2, 5)" in result.json()["verdict"]
    assert "(2, 10)" in result.stderr and "(2, 5)" in result.stderr


def test_trap_output_count_mismatch(cli, out) -> None:
    two = handmade_onnx(out / "two.onnx", {"output": (10, None), "extra": (3, None)})
    result = parity(cli, "builtin:convnet", two, "--no-timing")
    assert result.exit_code == 6
    verdict = result.json()["verdict"]
    assert "output count mismatch" in verdict and "output (2, 10)" in verdict and "extra (2, 3)" in verdict


def test_trap_output_name_mismatch_between_two_onnx_files(cli, out) -> None:
    reference = handmade_onnx(out / "names-ref.onnx", {"logits": (10, None), "embedding": (4, None)})
    reordered = handmade_onnx(out / "names-same.onnx", {"embedding": (4, None), "logits": (10, None)})
    renamed = handmade_onnx(out / "names-other.onnx", {"scores": (10, None), "embedding": (4, None)})
    assert parity(cli, reference, reordered, "--no-timing", "--input", "x:float32[batch=2,1,28,28]").exit_code == 0
    result = parity(cli, reference, renamed, "--no-timing", "--input", "x:float32[batch=2,1,28,28]")
    assert result.exit_code == 6
    assert "output names differ: reference has logits (2, 10), candidate has scores (2, 10)" in \
        result.json()["verdict"]


@pytest.mark.parametrize("side", ["candidate", "reference"])
def test_trap_nan_or_inf_on_either_side(cli, out, side) -> None:
    clean = handmade_onnx(out / "clean.onnx", {"output": (10, None)})
    broken = handmade_onnx(out / "log.onnx", {"output": (10, "Log")})  # log of negative numbers: NaN
    pair = (clean, broken) if side == "candidate" else (broken, clean)
    result = parity(cli, *pair, "--no-timing", "--input", "x:float32[batch=2,1,28,28]")
    assert result.exit_code == 6
    assert f"non-finite value(s) (NaN/inf) in the {side}" in result.json()["verdict"]


def test_errors_have_their_exit_codes(cli, out, bert_onnx, pooled) -> None:
    missing = cli("verify-parity", "builtin:tiny-bert", out / "nope.onnx")
    assert missing.exit_code == 3 and "no such file" in missing.stderr
    both = cli("verify-parity", "builtin:tiny-bert", bert_onnx, "--inputs", out / "x.npz", "--input", "x:float32[2]")
    assert both.exit_code == 2 and "cannot be combined" in both.stderr
    if not torch.cuda.is_available():
        cuda = cli("verify-parity", "builtin:tiny-bert", bert_onnx, "--device", "cuda")
        assert cuda.exit_code == 2 and "no CUDA GPU" in cuda.stderr
    traced = trace(pooled, "untrusted.pt", train=False)
    untrusted = cli("verify-parity", pooled / "pooled.safetensors", traced, "--arch", f"{pooled / 'pooled.py'}:make")
    assert untrusted.exit_code == 4 and "--trust-code" in untrusted.stderr


# ---------------------------------------------------------------- review fixes


def test_unknown_per_output_tolerance_is_a_usage_error_naming_the_outputs(cli, bert_onnx) -> None:
    result = cli("verify-parity", "builtin:tiny-bert", bert_onnx, "--atol", "logit=1", "--rtol", "probs=0.1",
                 "--json", "--no-timing")
    assert result.exit_code == 2, result.stderr
    assert "overrides for 'logit', 'probs' match no output" in result.stderr
    assert "the outputs are: logits" in result.stderr and result.stdout == ""
    known = parity(cli, "builtin:tiny-bert", bert_onnx, "--atol", "logits=1e-3", "--no-timing")
    assert known.exit_code == 0 and known.json()["parity"]["shapes"][0]["outputs"][0]["atol"] == 1e-3


def test_candidate_needing_inputs_the_reference_lacks_is_an_input_error(cli, bert_onnx) -> None:
    result = cli("verify-parity", "builtin:tiny-gpt2", bert_onnx, "--json", "--no-timing")
    assert result.exit_code == 3, result.stderr
    message = " ".join(result.stderr.split())
    assert "the models take different inputs" in message and "needs token_type_ids" in message
    assert "builtin:tiny-gpt2 takes input_ids, attention_mask;" in message
    assert "bert.onnx takes input_ids, attention_mask, token_type_ids" in message
    assert "--input" in message and "fixed shapes" not in message and result.stdout == ""


def test_repeats_0_skips_timing_like_no_timing(cli, bert_onnx) -> None:
    for flags in (("--repeats", "0"), ("--no-timing",)):
        result = cli("verify-parity", "builtin:tiny-bert", bert_onnx, "--json", *flags)
        assert result.exit_code == 0, result.stderr
        shapes = result.json()["parity"]["shapes"]
        assert all(s["reference_latency"] is None and s["candidate_latency"] is None for s in shapes)
    human = cli("verify-parity", "builtin:tiny-bert", bert_onnx, "--repeats", "0")
    assert human.exit_code == 0 and "PASS" in human.stdout
    assert cli("verify-parity", "builtin:tiny-bert", bert_onnx, "--repeats", "-1").exit_code == 2


def test_inputs_that_do_not_fit_the_reference_are_an_input_error(cli, tmp_path):
    """A reference that cannot run the inputs is exit 3 naming the reference, not a candidate FAIL (exit 6)."""
    import numpy as np

    inputs = tmp_path / "bad.npz"
    np.savez(inputs, x=np.zeros((2, 3), np.float32))
    result = cli("verify-parity", "builtin:convnet", "builtin:convnet", "--inputs", inputs, "--repeats", "0", "--json")
    assert result.exit_code == 3, result.stderr
    assert "the reference builtin:convnet fails on the inputs" in result.stderr and "x[2, 3]" in result.stderr
    assert result.stdout == ""


def test_real_texts_are_tokenized_with_the_models_tokenizer(cli):
    result = cli("verify-parity", "builtin:tiny-gpt2", "builtin:tiny-gpt2", "--text", "今天天气很好",
                 "--text", "export the model and verify it", "--repeats", "0", "--json")
    assert result.exit_code == 0, result.stderr
    report = result.json()
    assert report["input_source"] == "2 text(s), tokenizer of builtin:tiny-gpt2"
    shapes = report["parity"]["shapes"]
    assert len(shapes) == 1 and shapes[0]["input_shapes"]["input_ids"][0] == 2
    assert shapes[0]["outputs"][0]["masked_out"] > 0  # the shorter text is padded, and the padding excluded
    assert shapes[0]["label"].startswith("text:batch=2")
    clash = cli("verify-parity", "builtin:tiny-bert", "builtin:tiny-bert", "--text", "a", "--input",
                "input_ids:int64[batch,sequence]")
    assert clash.exit_code == 2 and "cannot be combined" in clash.stderr


def test_batch_size_and_seq_len_set_the_first_input_set(cli) -> None:
    """Issue #13.2: the user's sizes run first, from --batch-size/--seq-len or from the --input dims."""
    sized = parity(cli, "builtin:tiny-gpt2", "builtin:tiny-gpt2", "--batch-size", "1", "--seq-len", "12",
                   "--no-timing").json()
    labels = [s["label"] for s in sized["parity"]["shapes"]]
    assert labels == ["batch=1,sequence=12", "batch=1,sequence=6", "batch=2,sequence=24"]
    assert sized["parity"]["shapes"][0]["input_shapes"]["input_ids"] == [1, 12]
    spec = parity(cli, "builtin:tiny-gpt2", "builtin:tiny-gpt2", "--input", "input_ids:int64[batch=1,sequence=64]",
                  "--no-timing").json()
    assert spec["parity"]["shapes"][0]["input_shapes"] == {"input_ids": [1, 64]}
    assert spec["input_source"].startswith("--input specs")
    assert cli("verify-parity", "builtin:convnet", "builtin:convnet", "--seq-len", "8").exit_code == 2


def test_loader_warnings_of_both_sides_are_in_the_report(tmp_path) -> None:
    from mlops_cli.core.contract import ModelRef
    from mlops_cli.services.verify_parity import VerifyOptions, run

    sides = []
    for name in ("ref", "cand"):
        folder = tmp_path / name
        load_model("builtin:tiny-gpt2").module.save_pretrained(folder)
        (folder / "tokenizer.json").write_text("{broken", encoding="utf-8")
        sides.append(ModelRef.parse(str(folder)))
    report = run(sides[0], VerifyOptions(candidate=sides[1], repeats=0, evaluation=None))  # no perplexity note
    assert report.passed
    assert [w.split(" could not")[0] for w in report.warnings] == [
        f"the tokenizer in {tmp_path / 'ref'}", f"the tokenizer in {tmp_path / 'cand'}"]


# ---------------------------------------------------------------- issue #13.1: presets from what was produced

SCALED_HEAD = '''
import torch


def make(scale=50.0):
    """A classification head whose logits are in the tens, like a trained model's."""
    torch.manual_seed(0)
    head = torch.nn.Linear(64, 32)
    with torch.no_grad():
        head.weight.mul_(scale)
        head.bias.mul_(scale)
    return head
'''


@pytest.fixture(scope="module")
def scaled(out) -> Path:
    """The scaled head as fp32 weights, as fp16 weights, and tampered (one row zeroed); one architecture file."""
    from safetensors.torch import save_file

    folder = out / "scaled"
    folder.mkdir()
    (folder / "head.py").write_text(SCALED_HEAD, encoding="utf-8")
    namespace: dict = {}
    exec(SCALED_HEAD, namespace)  # the test's own architecture
    state = namespace["make"]().state_dict()
    save_file(state, str(folder / "fp32.safetensors"))
    save_file({k: v.half() for k, v in state.items()}, str(folder / "fp16.safetensors"))
    tampered = {k: v.clone() for k, v in state.items()}
    tampered["weight"][3] = 0.0
    save_file(tampered, str(folder / "tampered.safetensors"))
    return folder


def head_parity(cli, scaled, candidate, *extra):
    return parity(cli, scaled / "fp32.safetensors", scaled / candidate, "--arch", f"{scaled / 'head.py'}:make",
                  "--input", "x:float32[batch=4,64]", "--no-timing", *extra)


def test_auto_preset_recognises_fp16_weights_and_passes(cli, scaled) -> None:
    result = head_parity(cli, scaled, "fp16.safetensors")
    assert result.exit_code == 0, result.stdout
    report = result.json()
    assert report["preset"] == "fp16" and "has weights rounded to float16" in report["preset_source"]
    assert report["parity"]["preset"] == "fp16"
    criteria = {(c["output"], c["criterion"]["name"]): c["criterion"] for c in report["parity"]["criteria"]}
    assert criteria["output", "cosine"]["threshold"] == 0.9999 and criteria["output", "cosine"]["passed"]
    assert criteria["output", "top-1"]["value"] == 1.0
    strict = head_parity(cli, scaled, "fp16.safetensors", "--preset", "fp32")
    assert strict.exit_code == 6 and strict.json()["preset_source"] == "--preset"


def test_a_tampered_weight_fails_under_auto_naming_the_criterion(cli, scaled) -> None:
    result = head_parity(cli, scaled, "tampered.safetensors")
    assert result.exit_code == 6
    report = result.json()
    assert report["preset"] == "fp32" and report["preset_source"] == "auto: float32 weights"
    assert "max |diff|" in report["verdict"] and "exceeds atol" in report["verdict"]
    failed = {c["criterion"]["name"] for c in report["parity"]["criteria"] if not c["criterion"]["passed"]}
    assert "element-wise" in failed and "cosine" in failed
    human = cli("verify-parity", scaled / "fp32.safetensors", scaled / "tampered.safetensors", "--arch",
                f"{scaled / 'head.py'}:make", "--input", "x:float32[batch=4,64]", "--no-timing", "--preset", "int8")
    assert human.exit_code == 6
    for words in ("Criteria", "atol needed", "cosine", ">= 0.99", "FAIL: element-wise", "preset int8"):
        assert words in human.stdout, words


def test_explicit_tolerances_are_used_as_given(cli, scaled) -> None:
    report = head_parity(cli, scaled, "fp16.safetensors", "--atol", "1", "--rtol", "0").json()
    assert report["passed"] and report["parity"]["preset"] is None
    assert report["tolerances"].startswith("|diff| <= atol 1 + rtol 0 x |ref| (as given")
    assert [c["criterion"]["name"] for c in report["parity"]["criteria"]] == ["element-wise"]


def test_precision_of_onnx_graphs(out, bert_onnx) -> None:
    from mlops_cli.core.precision import onnx_precision

    assert onnx_precision(bert_onnx) == ("fp32", "float32 weights")
    weight = numpy_helper.from_array(np.ones((4, 4), np.float16), "w")
    half = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "half",
                             [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, 4])],
                             [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [1, 4])], [weight])
    onnx.save(helper.make_model(half), str(out / "half.onnx"))
    assert onnx_precision(out / "half.onnx") == ("fp16", "float16 weights in the graph")
    scale = numpy_helper.from_array(np.array(0.1, np.float32), "scale")
    quant = helper.make_graph([helper.make_node("QuantizeLinear", ["x", "scale"], ["q"]),
                               helper.make_node("DequantizeLinear", ["q", "scale"], ["y"])], "qdq",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [scale])
    onnx.save(helper.make_model(quant), str(out / "qdq.onnx"))
    assert onnx_precision(out / "qdq.onnx") == ("int8", "quantisation operators (DequantizeLinear, QuantizeLinear)")


def test_parity_table_numbers_are_short_and_declared_numeric(cli, scaled) -> None:
    """Issue #13.7: numeric cells are short, in columns declared numeric (which the render layer never wraps)."""
    from rich.table import Table

    from mlops_cli.core.contract import ModelRef
    from mlops_cli.core.inputs import InputRequest
    from mlops_cli.core.loading import LoadOptions
    from mlops_cli.core.parity import ToleranceRequest
    from mlops_cli.render.parity import CRITERIA_COLUMNS, PARITY_COLUMNS, criteria_rows, parity_rows, parity_tables
    from mlops_cli.services.verify_parity import VerifyOptions, run

    load = LoadOptions(arch=f"{scaled / 'head.py'}:make")
    report = run(ModelRef.parse(str(scaled / "fp32.safetensors")), VerifyOptions(
        candidate=ModelRef.parse(str(scaled / "tampered.safetensors")), load=load, repeats=0,
        inputs=InputRequest(specs=("x:float32[batch=4,64]",)), tolerances=ToleranceRequest(preset="fp16")))
    assert not report.passed
    numeric_parity = [str(row[i]) for row in parity_rows(report.parity) for i in range(2, 9)]
    numeric_criteria = [str(row[i]) for row in criteria_rows(report.parity) for i in (3, 4)]
    assert numeric_parity and numeric_criteria
    assert all(len(cell) <= 11 for cell in numeric_parity + numeric_criteria), numeric_parity + numeric_criteria
    assert {">= 0.9999", ">= 99.0%"} <= set(numeric_criteria)
    tables = [t for t in parity_tables(report.parity) if isinstance(t, Table)]
    numeric = {str(c.header) for t in tables for c in t.columns if c.justify == "right"}
    assert {*PARITY_COLUMNS[2:9], *CRITERIA_COLUMNS[3:5]} <= numeric


@pytest.fixture(scope="module")
def llama(out) -> Path:
    """A real architecture (Llama, tiny config) whose logits are in the tens: as saved, in fp16, and tampered."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def build() -> LlamaForCausalLM:
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0)
        model = LlamaForCausalLM(config).eval()
        with torch.no_grad():
            model.lm_head.weight.mul_(50)
        return model

    build().save_pretrained(out / "llama")
    build().half().save_pretrained(out / "llama-fp16")
    tampered = build()
    with torch.no_grad():
        tampered.lm_head.weight[7] = 0.0
    tampered.save_pretrained(out / "llama-tampered")
    return out


def test_llm_fp16_copy_passes_under_auto_and_a_tampered_head_fails(cli, llama) -> None:
    half = parity(cli, llama / "llama", llama / "llama-fp16", "--no-timing")
    assert half.exit_code == 0, half.json()["verdict"]
    report = half.json()
    assert report["preset"] == "fp16" and report["preset_source"].endswith("has float16 weights")
    criteria = {c["criterion"]["name"]: c["criterion"] for c in report["parity"]["criteria"]}
    assert set(criteria) == {"element-wise", "cosine", "top-1", "next token"}
    assert criteria["next token"]["value"] == 1.0 and criteria["next token"]["threshold"] == 0.99
    assert parity(cli, llama / "llama", llama / "llama-fp16", "--no-timing", "--preset", "fp32").exit_code == 6
    tampered = parity(cli, llama / "llama", llama / "llama-tampered", "--no-timing")
    assert tampered.exit_code == 6
    assert tampered.json()["preset_source"] == "auto: float32 weights"
    assert "logits at batch=" in tampered.json()["verdict"] and "exceeds atol" in tampered.json()["verdict"]
