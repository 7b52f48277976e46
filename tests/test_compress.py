"""`mlops compress half` / `int8`: formats in and out, safety counts, key/dtype preservation, streaming."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from mlops_cli.core.contract import LoadOptions, ModelRef
from mlops_cli.services.compress import half
from mlops_cli.services.compress.keep import KeepRules
from mlops_cli.services.compress.stream import stream_convert

CONVNET_ARCH = ("--arch", "mlops_cli.core.zoo:ConvNet", "--input", "x:float32[batch=2,1,28,28]")


# ---------------------------------------------------------------- fixtures


def compress_half(source: str | Path, output: Path, load: LoadOptions | None = None, **options: Any) -> Any:
    """`half.run` on a path, as the command calls it."""
    return half.run(ModelRef.parse(str(source)),
                    half.HalfOptions(output=output, load=load or LoadOptions(), **options))


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny BERT, tiny GPT-2 and the ConvNet as ONNX files (legacy exporter: fast, dynamic batch/sequence)."""
    import warnings

    from mlops_cli.core.inputs import plan_inputs
    from mlops_cli.core.loading import load_model

    class NoCache(torch.nn.Module):
        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    root = tmp_path_factory.mktemp("onnx")
    for name in ("tiny-bert", "tiny-gpt2", "convnet"):
        loaded = load_model(f"builtin:{name}")
        example = {k: torch.from_numpy(v) for k, v in plan_inputs(loaded).example.tensors.items()}
        module = NoCache(loaded.module) if name == "tiny-gpt2" else loaded.module
        axes = {k: ({0: "batch", 1: "sequence"} if v.ndim == 2 else {0: "batch"}) for k, v in example.items()}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, tuple(example.values()), str(root / f"{name}.onnx"), input_names=list(example),
                              output_names=["logits"], dynamic_axes=axes, opset_version=17, dynamo=False)
    return root


def _convnet_with(tmp_path: Path, zoo_dir: Path, name: str, value: float, index: tuple[int, int] = (0, 0)) -> Path:
    """The ConvNet folder with one weight of fc.0 set to `value`."""
    folder = tmp_path / name
    shutil.copytree(zoo_dir / "convnet", folder)
    state = load_file(str(folder / "model.safetensors"))
    state["fc.0.weight"][index] = value
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


# ---------------------------------------------------------------- half: streaming safetensors


def test_streamed_file_is_what_save_file_writes(tmp_path: Path) -> None:
    """Header, order and offsets match safetensors' own writer; integer/bool tensors and kept norms untouched."""
    torch.manual_seed(0)
    tensors = {"layer.weight": torch.randn(7, 5), "layer.bias": torch.randn(5), "norm.weight": torch.randn(3),
               "position_ids": torch.arange(11), "mask": torch.rand(3) > 0.5, "half": torch.randn(3).half(),
               "odd": torch.randn(3).bfloat16(), "empty": torch.zeros(0)}
    source = tmp_path / "in.safetensors"
    save_file(tensors, str(source), metadata={"format": "pt"})
    safety = stream_convert(source, tmp_path / "out.safetensors", "float16", KeepRules.build([], True))

    expected = {k: (v.half() if v.dtype in (torch.float32, torch.bfloat16) and k != "norm.weight" else v)
                for k, v in tensors.items()}
    save_file(expected, str(tmp_path / "expected.safetensors"), metadata={"format": "pt"})
    assert (tmp_path / "out.safetensors").read_bytes() == (tmp_path / "expected.safetensors").read_bytes()
    by_name = {t.name: t for t in safety}
    assert by_name["norm.weight"].reason.startswith("kept") and not by_name["norm.weight"].converted
    assert by_name["position_ids"].output_dtype == "int64" and not by_name["position_ids"].converted
    assert by_name["odd"].converted and by_name["odd"].source_dtype == "bfloat16"


def test_streaming_peak_memory_stays_near_one_tensor(tmp_path: Path) -> None:
    """A 48 MiB file of 4 MiB tensors converts with a peak RSS rise of a few tensors, not the file size."""
    status = Path("/proc/self/status")
    clear_refs = Path("/proc/self/clear_refs")
    if not status.exists() or not clear_refs.exists():
        pytest.skip("needs Linux /proc to reset and read the peak RSS")
    source = tmp_path / "big.safetensors"
    save_file({f"w{i}": torch.randn(1024, 1024) for i in range(12)}, str(source))  # 12 x 4 MiB
    warm_up = tmp_path / "small.safetensors"  # first calls load torch kernels: not the conversion's memory
    save_file({"w": torch.randn(64, 64)}, str(warm_up))
    stream_convert(warm_up, tmp_path / "small16.safetensors", "float16", KeepRules.build([], False))
    size_mib = source.stat().st_size / 2**20

    def rss_kib(field: str) -> int:
        line = next(li for li in status.read_text().splitlines() if li.startswith(field))
        return int(line.split()[1])

    try:
        clear_refs.write_text("5")  # reset VmHWM (peak RSS) to the current RSS
    except OSError:
        pytest.skip("cannot reset the peak RSS here")
    baseline = rss_kib("VmRSS:")
    stream_convert(source, tmp_path / "out.safetensors", "float16", KeepRules.build([], False))
    peak_rise_mib = (rss_kib("VmHWM:") - baseline) / 1024
    assert size_mib > 47
    assert peak_rise_mib < 12, f"peak RSS rose {peak_rise_mib:.1f} MiB converting a {size_mib:.0f} MiB file"
    assert load_file(str(tmp_path / "out.safetensors"))["w3"].dtype == torch.float16


# ---------------------------------------------------------------- half: safety counts


def test_weight_of_1e5_overflows_fp16_and_fails(cli, zoo_dir: Path, tmp_path: Path) -> None:
    source = _convnet_with(tmp_path, zoo_dir, "big", 1e5)
    result = cli("compress", "half", source / "model.safetensors", "-o", tmp_path / "out.safetensors",
                 *CONVNET_ARCH, "--json")
    assert result.exit_code == 6, result.stderr
    report = result.json()
    assert not report["written"] and not (tmp_path / "out.safetensors").exists()
    assert report["totals"]["overflow"] == 1
    assert report["totals"]["tensors_with_overflow"] == ["fc.0.weight"]
    row = next(t for t in report["tensors"] if t["name"] == "fc.0.weight")
    assert row["overflow"] == 1 and row["max_abs"] == pytest.approx(1e5)
    assert "overflow" in result.stderr and "--allow-overflow" in result.stderr


def test_bf16_holds_1e5_and_allow_overflow_writes_inf(cli, zoo_dir: Path, tmp_path: Path) -> None:
    source = _convnet_with(tmp_path, zoo_dir, "big", 1e5)
    bf16 = cli("compress", "half", source, "-o", tmp_path / "bf16", "--dtype", "bf16", "--json")
    assert bf16.exit_code == 0, bf16.stderr
    assert bf16.json()["totals"]["overflow"] == 0  # bf16 has float32's range
    assert load_file(str(tmp_path / "bf16" / "model.safetensors"))["fc.0.weight"].dtype == torch.bfloat16

    allowed = cli("compress", "half", source, "-o", tmp_path / "fp16", "--allow-overflow", "--no-check", "--json")
    assert allowed.exit_code == 0, allowed.stderr
    assert allowed.json()["totals"]["overflow"] == 1
    assert torch.isinf(load_file(str(tmp_path / "fp16" / "model.safetensors"))["fc.0.weight"][0, 0])


def test_per_layer_names_the_first_layer_that_breaks(cli, zoo_dir: Path, tmp_path: Path) -> None:
    source = _convnet_with(tmp_path, zoo_dir, "big", 1e5)
    result = cli("compress", "half", source, "-o", tmp_path / "out", "--allow-overflow", "--per-layer", "--json")
    assert result.exit_code == 6  # written, but the inf weight wrecks the outputs: drift fails
    report = result.json()
    assert report["written"] and not report["drift"]["passed"]
    layers = report["per_layer"]
    assert layers["first_jump"] == "fc.0" and "inf/NaN" in layers["jump_reason"]
    assert [layer["name"] for layer in layers["layers"]][:2] == ["conv1.0", "conv1.1"]


def test_per_layer_flags_activations_beyond_fp16_range() -> None:
    """The LayerNorm story: weights fit fp16 but a pre-norm activation exceeds 65504, so real fp16 compute
    overflows there even though fp16-rounded weights computed in fp32 look fine."""
    import copy

    from mlops_cli.services.compress.drift import compare_layers

    torch.manual_seed(0)
    reference = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8), torch.nn.LayerNorm(8)).eval()
    with torch.no_grad():
        reference[1].weight.mul_(5000.0)  # at most ~1800: fits fp16; its outputs do not
    candidate = copy.deepcopy(reference)
    with torch.no_grad():
        for parameter in candidate.parameters():
            parameter.copy_(parameter.half().float())
    x = torch.randn(2, 8) * 100
    report = compare_layers(reference, candidate, lambda: reference(x), lambda: candidate(x), "x", "float16")
    assert report.first_jump == "1" and "overflows" in (report.jump_reason or "")
    assert [layer.name for layer in report.layers] == ["0", "1", "2"]
    assert report.layers[1].reference_max_abs > 65504 and report.layers[1].beyond_range
    assert not report.layers[0].beyond_range and not report.layers[2].beyond_range


def test_underflow_and_subnormal_are_counted(zoo_dir: Path, tmp_path: Path) -> None:
    source = _convnet_with(tmp_path, zoo_dir, "tiny", 1e-9)
    state = load_file(str(source / "model.safetensors"))
    state["out.weight"][0, :3] = torch.tensor([1e-6, -2e-6, 3e-7])
    save_file(state, str(source / "model.safetensors"))
    report = compress_half(str(source), tmp_path / "out", check=False)
    by_name = {t.name: t for t in report.tensors}
    assert by_name["fc.0.weight"].underflow >= 1  # 1e-9 flushes to zero in fp16
    assert by_name["out.weight"].subnormal >= 3
    assert report.passed and report.totals.overflow == 0


# ---------------------------------------------------------------- half: formats in and out


def test_hf_folder_stays_a_folder_with_norms_kept(cli, zoo_dir: Path, tmp_path: Path) -> None:
    import json

    result = cli("compress", "half", zoo_dir / "tiny-bert", "-o", tmp_path / "bert16", "--json")
    assert result.exit_code == 0, result.stderr
    report = result.json()
    out = tmp_path / "bert16"
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"  # see the round-trip test below
    assert report["config_dtype"] == "float32"
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(report["files_copied"])
    assert (out / "tokenizer.json").read_bytes() == (zoo_dir / "tiny-bert" / "tokenizer.json").read_bytes()
    state = load_file(str(out / "model.safetensors"))
    assert state["bert.embeddings.LayerNorm.weight"].dtype == torch.float32  # default keep: norms
    assert state["bert.encoder.layer.0.attention.self.query.weight"].dtype == torch.float16
    assert report["size"]["converted_ratio"] == 0.5 and report["streamed"]
    assert report["drift"]["passed"] and "computed in float32" in report["drift_mode"]


def test_sharded_folder_updates_index_and_copies_other_pickles(zoo_dir: Path, tmp_path: Path) -> None:
    """Shards convert one by one, the index's total_size follows, training_args.bin is copied untouched."""
    import json

    from mlops_cli.core.loading import load_model

    folder = tmp_path / "sharded"
    loaded = load_model(str(zoo_dir / "tiny-bert"))
    loaded.module.save_pretrained(folder, max_shard_size="100KB")
    loaded.tokenizer.save_pretrained(folder)
    torch.save({"learning_rate": 3e-5}, folder / "training_args.bin")
    assert len(list(folder.glob("*.safetensors"))) > 1

    report = compress_half(str(folder), tmp_path / "out")
    assert report.passed and report.drift is not None and report.drift.passed
    out = tmp_path / "out"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shard_bytes = sum(t.numel() * t.element_size() for shard in out.glob("*.safetensors")
                      for t in load_file(str(shard)).values())
    assert index["metadata"]["total_size"] == shard_bytes
    assert (out / "training_args.bin").read_bytes() == (folder / "training_args.bin").read_bytes()
    assert all(":" in t.name for t in report.tensors)  # names carry their shard


EFFICIENTNET_STYLE = """import torch.nn as nn


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self._depthwise_conv = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self._bn1 = nn.BatchNorm2d(8)

    def forward(self, x):
        return self._bn1(self._depthwise_conv(x)).relu()


class Net(nn.Module):
    \"\"\"EfficientNet's naming (lukemelas/EfficientNet-PyTorch): _conv_stem, _bn0, _blocks.N._bn1.\"\"\"

    def __init__(self):
        super().__init__()
        self._conv_stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self._bn0 = nn.BatchNorm2d(8)
        self._blocks = nn.ModuleList([Block(), Block()])
        self._fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self._bn0(self._conv_stem(x)).relu()
        for block in self._blocks:
            x = block(x)
        return self._fc(x.mean((2, 3)))
"""


def test_batchnorm_is_kept_by_module_type_whatever_its_name(cli, tmp_path: Path) -> None:
    """EfficientNet's `_bn0` / `_blocks.N._bn1` escape every name pattern: with --arch the module type decides,
    so every BatchNorm tensor stays float32 (the name defaults kept none of them). Without --arch only names
    can decide, and the report says so."""
    (tmp_path / "effnet.py").write_text(EFFICIENTNET_STYLE)
    torch.manual_seed(0)
    model = _load_arch(tmp_path / "effnet.py").Net().eval()
    save_file(model.state_dict(), str(tmp_path / "effnet.safetensors"))
    bn_floats = {name for name in model.state_dict() if "_bn" in name and "num_batches" not in name}
    assert len(bn_floats) == 12

    result = cli("compress", "half", tmp_path / "effnet.safetensors", "-o", tmp_path / "out.safetensors",
                 "--arch", f"{tmp_path / 'effnet.py'}:Net", "--input", "x:float32[batch=2,3,8,8]", "--json")
    assert result.exit_code == 0, result.stderr
    report = result.json()
    kept = {t["name"]: t for t in report["tensors"] if t["kept_by"]}
    assert set(kept) == bn_floats
    assert {t["kept_by"] for t in kept.values()} == {"module type"}
    assert kept["_bn0.running_var"]["reason"] == "kept: BatchNorm2d module"
    assert report["totals"]["kept_by_module_type"] == 12 and report["totals"]["kept_by_name"] == 0
    assert "by type" in report["keep_rule"] and report["drift"]["passed"]
    written = load_file(str(tmp_path / "out.safetensors"))
    assert all(written[name].dtype == torch.float32 for name in bn_floats)
    assert written["_blocks.1._depthwise_conv.weight"].dtype == torch.float16
    assert written["_bn0.num_batches_tracked"].dtype == torch.int64

    bare = cli("compress", "half", tmp_path / "effnet.safetensors", "-o", tmp_path / "bare.safetensors", "--json")
    assert bare.exit_code == 0, bare.stderr
    assert bare.json()["totals"]["kept_tensors"] == 0 and "by name" in bare.json()["keep_rule"]


def _load_arch(path: Path) -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"test_arch_{path.stem}", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_hf_rmsnorm_classes_are_kept_by_module_type(tmp_path: Path) -> None:
    """A transformers family whose norms are its own classes (LlamaRMSNorm): kept by type, nothing else kept."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=64, max_position_embeddings=32)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    report = compress_half(tmp_path / "llama", tmp_path / "out", check=False)
    kept = {t.name: t.reason for t in report.tensors if t.kept_by}
    assert set(kept) == {"model.norm.weight"} | {f"model.layers.{i}.{norm}.weight" for i in range(2)
                                                 for norm in ("input_layernorm", "post_attention_layernorm")}
    assert set(kept.values()) == {"kept: LlamaRMSNorm module"}
    assert report.totals.kept_by_module_type == 5 and report.totals.converted_tensors > 5


def test_kept_norms_stay_float32_through_plain_transformers(zoo_dir: Path, tmp_path: Path) -> None:
    """`from_pretrained(folder)` casts every tensor to config.json's dtype (transformers 5 keeps per-tensor
    dtypes only for classes listing _keep_in_fp32_modules). With dtype float16 the kept LayerNorms came back
    float16; the output's config says float32 now, so they stay float32 and the converted weights load as the
    fp16 values they hold (what the drift check measured)."""
    from transformers import AutoModelForSequenceClassification

    report = compress_half(zoo_dir / "tiny-bert", tmp_path / "bert16", check=False)
    assert report.config_dtype == "float32" and any("_keep_in_fp32_modules" in note for note in report.notes)
    stored = load_file(str(tmp_path / "bert16" / "model.safetensors"))
    assert stored["bert.encoder.layer.0.attention.self.query.weight"].dtype == torch.float16

    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "bert16")
    layer = model.bert.encoder.layer[0]
    assert model.bert.embeddings.LayerNorm.weight.dtype == torch.float32
    assert layer.output.LayerNorm.weight.dtype == torch.float32
    query = layer.attention.self.query.weight
    assert torch.equal(query, stored["bert.encoder.layer.0.attention.self.query.weight"].float())
    half_model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "bert16", dtype=torch.float16)
    assert half_model.bert.embeddings.LayerNorm.weight.dtype == torch.float16  # what asking for fp16 gives

    unkept = compress_half(zoo_dir / "tiny-bert", tmp_path / "all16", check=False, default_keep=False)
    assert unkept.config_dtype == "float16"  # nothing kept: the folder reloads as float16
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "all16")
    assert reloaded.bert.embeddings.LayerNorm.weight.dtype == torch.float16


def test_gpt2_folder_bf16_without_default_keep(cli, zoo_dir: Path, tmp_path: Path) -> None:
    result = cli("compress", "half", zoo_dir / "tiny-gpt2", "-o", tmp_path / "gpt", "--dtype", "bf16",
                 "--no-default-keep", "--keep-fp32", r"wpe", "--json")
    assert result.exit_code == 0, result.stderr
    state = load_file(str(tmp_path / "gpt" / "model.safetensors"))
    assert state["transformer.h.0.ln_1.weight"].dtype == torch.bfloat16
    assert state["transformer.wpe.weight"].dtype == torch.float32
    assert result.json()["keep_patterns"] == ["wpe"]


def test_training_checkpoint_keeps_keys_and_integer_dtypes(zoo_dir: Path, tmp_path: Path) -> None:
    """Other entries untouched (optimizer moments stay fp32), integer buffers keep their dtype, bytes reproducible."""
    state = dict(load_file(str(zoo_dir / "convnet" / "model.safetensors")))
    state |= {"bn.num_batches_tracked": torch.tensor(7), "position_ids": torch.arange(5), "mask": torch.ones(4) > 0}
    optimizer = {"state": {0: {"exp_avg": torch.randn(3)}}, "param_groups": [{"lr": 0.1, "params": [0]}]}
    torch.save({"net": state, "optimizer": optimizer, "epoch": 3}, tmp_path / "ckpt.pt")

    outputs = []
    for name in ("a.pt", "b.pt"):
        report = compress_half(str(tmp_path / "ckpt.pt"), tmp_path / name)
        assert report.passed and report.output_format == "torch-zip"
        assert sorted(report.checkpoint_keys_kept) == ["epoch", "optimizer"]
        assert any("drift not measured" in line for line in report.notes)  # no --arch: weights only
        outputs.append((tmp_path / name).read_bytes())
    assert outputs[0] == outputs[1]  # reproducible bytes

    written = torch.load(tmp_path / "a.pt", weights_only=True)
    assert written["epoch"] == 3 and written["optimizer"]["param_groups"] == optimizer["param_groups"]
    assert torch.equal(written["optimizer"]["state"][0]["exp_avg"], optimizer["state"][0]["exp_avg"])
    net = written["net"]
    assert net["fc.0.weight"].dtype == torch.float16
    assert net["bn.num_batches_tracked"].dtype == torch.int64 and net["position_ids"].dtype == torch.int64
    assert net["mask"].dtype == torch.bool and torch.equal(net["position_ids"], torch.arange(5))
    assert torch.equal(net["fc.0.weight"], state["fc.0.weight"].half())


def test_checkpoint_with_arch_measures_drift(cli, zoo_dir: Path, tmp_path: Path) -> None:
    state = load_file(str(zoo_dir / "convnet" / "model.safetensors"))
    torch.save({"model": state, "epoch": 1}, tmp_path / "ckpt.pt")
    result = cli("compress", "half", tmp_path / "ckpt.pt", "-o", tmp_path / "half.pt", *CONVNET_ARCH, "--json")
    assert result.exit_code == 0, result.stderr
    report = result.json()
    assert report["drift"]["passed"] and report["checkpoint_keys_kept"] == ["epoch"]


def test_onnx_fp16_reports_clamping_and_keeps_io_types(cli, onnx_dir: Path, tmp_path: Path) -> None:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_dir / "convnet.onnx"))
    weight = next(init for init in model.graph.initializer if init.name == "fc.0.weight")
    values = numpy_helper.to_array(weight).copy()
    values[0, 0] = 1e5
    weight.CopyFrom(numpy_helper.from_array(values, "fc.0.weight"))
    onnx.save(model, str(tmp_path / "big.onnx"))

    refused = cli("compress", "half", tmp_path / "big.onnx", "-o", tmp_path / "out.onnx", "--json")
    assert refused.exit_code == 6 and not (tmp_path / "out.onnx").exists()
    assert refused.json()["totals"]["tensors_with_overflow"] == ["fc.0.weight"]
    assert "clamped" in refused.json()["overflow_action"]

    allowed = cli("compress", "half", tmp_path / "big.onnx", "-o", tmp_path / "out.onnx", "--allow-overflow",
                  "--no-check", "--json")
    assert allowed.exit_code == 0, allowed.stderr
    written = onnx.load(str(tmp_path / "out.onnx"))
    clamped = next(numpy_helper.to_array(i) for i in written.graph.initializer if i.name == "fc.0.weight")
    assert clamped.dtype == np.float16 and float(clamped[0, 0]) == 65504.0
    assert written.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # --keep-io-types


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-gpt2"])
def test_onnx_text_models_fp16(cli, onnx_dir: Path, tmp_path: Path, name: str) -> None:
    result = cli("compress", "half", onnx_dir / f"{name}.onnx", "-o", tmp_path / "out.onnx", "--no-keep-io-types",
                 "--json")
    assert result.exit_code == 0, result.stderr
    report = result.json()
    assert report["output_format"] == "onnx" and report["drift"]["passed"]
    assert report["size"]["converted_ratio"] == 0.5 and report["size"]["files_ratio"] < 0.8
    import onnx

    assert onnx.load(str(tmp_path / "out.onnx")).graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16


@pytest.mark.parametrize(("args", "code", "words"), [
    (("builtin:convnet", "-o", "{tmp}/x"), 3, "zoo save"),
    (("{onnx}/convnet.onnx", "-o", "{tmp}/x.onnx", "--dtype", "bf16"), 2, "bf16"),
    (("{onnx}/convnet.onnx", "-o", "{tmp}/x.onnx", "--per-layer"), 2, "--per-layer"),
    (("{zoo}/convnet", "-o", "{tmp}/x", "--keep-fp32", "(unclosed"), 2, "regular expression"),
    (("{zoo}/convnet", "-o", "{zoo}/convnet/inside"), 5, "overwrite the input"),
])
def test_half_errors(cli, zoo_dir: Path, onnx_dir: Path, tmp_path: Path, args: tuple[str, ...], code: int,
                     words: str) -> None:
    filled = [a.format(tmp=tmp_path, onnx=onnx_dir, zoo=zoo_dir) for a in args]
    result = cli("compress", "half", *filled)
    assert result.exit_code == code, result.stderr
    assert words in result.stderr


def test_existing_output_needs_force(cli, zoo_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    result = cli("compress", "half", zoo_dir / "convnet", "-o", tmp_path / "out", "--no-check")
    assert result.exit_code == 5 and "--force" in result.stderr
    assert cli("compress", "half", zoo_dir / "convnet", "-o", tmp_path / "out", "--no-check", "--force").exit_code == 0


def test_half_tables_render(cli, zoo_dir: Path, tmp_path: Path) -> None:
    result = cli("compress", "half", zoo_dir / "convnet", "-o", tmp_path / "out", "--per-layer")
    assert result.exit_code == 0, result.stderr
    for words in ("Size", "Cast safety (float16)", "Drift:", "Per-layer drift", "PASS", "0.500x"):
        assert words in result.stdout


# ---------------------------------------------------------------- int8


def test_int8_onnx_reports_quantised_op_types(cli, onnx_dir: Path, tmp_path: Path) -> None:
    plain = cli("compress", "int8", onnx_dir / "tiny-bert.onnx", "-o", tmp_path / "a.onnx", "--repeats", "2", "--json")
    assert plain.exit_code == 0, plain.stderr
    kinds = {k["kind"]: k for k in plain.json()["kinds"]}
    assert kinds["MatMul"]["quantized"] == kinds["MatMul"]["with_weights"] > 0
    assert kinds["Gather"]["quantized"] == 0 and "--quantize-embeddings" in kinds["Gather"]["note"]
    report = plain.json()
    assert report["drift"]["passed"] and report["bytes_after"] < report["bytes_before"]
    assert len(report["latency"]) == 3 and report["latency"][0]["before"]["repeats"] == 2

    embeddings = cli("compress", "int8", onnx_dir / "tiny-bert.onnx", "-o", tmp_path / "b.onnx",
                     "--quantize-embeddings", "--no-check", "--json")
    assert embeddings.exit_code == 0, embeddings.stderr
    gather = next(k for k in embeddings.json()["kinds"] if k["kind"] == "Gather")
    assert gather["quantized"] == gather["with_weights"] == 3


@pytest.mark.parametrize("name", ["tiny-gpt2", "convnet"])
def test_int8_onnx_gpt2_and_cnn_within_tolerance(cli, onnx_dir: Path, tmp_path: Path, name: str) -> None:
    result = cli("compress", "int8", onnx_dir / f"{name}.onnx", "-o", tmp_path / "q.onnx", "--repeats", "2", "--json")
    assert result.exit_code == 0, result.stderr
    report = result.json()
    assert "7-bit" in report["weights"] and report["size_ratio"] < 0.8
    assert sum(k["quantized"] for k in report["kinds"]) >= 3


def test_int8_torch_gpt2_folder_round_trips(cli, zoo_dir: Path, tmp_path: Path) -> None:
    import copy

    from mlops_cli.core.formats import torch_load_weights
    from mlops_cli.core.int8_state import load_int8_state
    from mlops_cli.core.loading import load_model

    result = cli("compress", "int8", zoo_dir / "tiny-gpt2", "-o", tmp_path / "q", "--repeats", "2", "--json")
    assert result.exit_code == 0, result.stderr
    report = result.json()
    kinds = {k["kind"]: k for k in report["kinds"]}
    assert kinds["Conv1D"]["quantized"] == 8  # GPT-2's attention/MLP layers, as Linear
    assert any("tied" in why for _, why in report["skipped"])  # lm_head shares wte's weight
    assert {"model.int8.pt", "quantization.json", "config.json", "tokenizer.json"} <= {
        p.name for p in (tmp_path / "q").iterdir()}
    assert not list((tmp_path / "q").glob("*.safetensors"))

    original = load_model(str(zoo_dir / "tiny-gpt2"))
    rebuilt = load_int8_state(copy.deepcopy(original.module), torch_load_weights(tmp_path / "q" / "model.int8.pt"))
    ids = torch.randint(5, 200, (1, 8))
    with torch.inference_mode():
        expected = original.module(input_ids=ids).logits
        drift = (rebuilt(input_ids=ids).logits - expected).abs().max()
    assert 0 < float(drift) < 0.1 * float(expected.abs().max())  # int8: within 10% of the logits' magnitude


def test_int8_torch_checkpoint_keeps_entries(cli, zoo_dir: Path, tmp_path: Path) -> None:
    state = load_file(str(zoo_dir / "convnet" / "model.safetensors"))
    torch.save({"net": state, "epoch": 4}, tmp_path / "ckpt.pt")
    result = cli("compress", "int8", tmp_path / "ckpt.pt", "-o", tmp_path / "q.pt", *CONVNET_ARCH, "--repeats", "2",
                 "--json")
    assert result.exit_code == 0, result.stderr
    written = torch.load(tmp_path / "q.pt", weights_only=True)
    assert written["epoch"] == 4 and any("_packed_params" in key for key in written["net"])
    assert result.json()["size_ratio"] < 0.35  # the ConvNet's weights are mostly in its Linear layers


def test_int8_folder_leaves_float_weights_of_other_formats_out(zoo_dir: Path, tmp_path: Path) -> None:
    """Beside model.int8.pt, a Flax or ONNX copy of the float weights would carry the float model along: left out
    and named; a training pickle that is not weights (training_args.bin) is copied."""
    from mlops_cli.services.compress import int8

    folder = tmp_path / "bert"
    shutil.copytree(zoo_dir / "tiny-bert", folder)
    (folder / "flax_model.msgpack").write_bytes(b"float weights")
    torch.save({"learning_rate": 3e-5}, folder / "training_args.bin")
    report = int8.run(ModelRef.parse(str(folder)), int8.Int8Options(output=tmp_path / "q", check=False))
    written = {path.name for path in (tmp_path / "q").iterdir()}
    assert "flax_model.msgpack" not in written and {"training_args.bin", "model.int8.pt"} <= written
    assert any("flax_model.msgpack" in note for note in report.notes)


@pytest.mark.slow
def test_int8_tiny_bert_folder_and_tolerance_failure(cli, zoo_dir: Path, tmp_path: Path) -> None:
    ok = cli("compress", "int8", zoo_dir / "tiny-bert", "-o", tmp_path / "q", "--repeats", "2")
    assert ok.exit_code == 0, ok.stderr
    for words in ("Quantised layers by type", "Latency on this CPU", "Size on disk", "PASS"):
        assert words in ok.stdout
    strict = cli("compress", "int8", zoo_dir / "tiny-bert", "-o", tmp_path / "q2", "--repeats", "1", "--atol", "1e-9",
                 "--rtol", "0", "--json")
    assert strict.exit_code == 6
    assert "drift beyond tolerance" in strict.json()["verdict"]


# ---------------------------------------------------------------- refusals made before any work


def _flat(text: str) -> str:
    """stderr (or a table's text) with its line wrapping and cell borders undone, so long lines can be matched."""
    return " ".join(text.replace("│", " ").split())


def _plain_convnet_state(zoo_dir: Path, path: Path) -> Path:
    torch.save(load_file(str(zoo_dir / "convnet" / "model.safetensors")), path)
    return path


@pytest.fixture(scope="module")
def int8_models(zoo_dir: Path, onnx_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """`compress int8` outputs of every kind: mlops weights folder, HF folder, torch state_dict, ONNX."""
    from mlops_cli.services.compress import int8

    root = tmp_path_factory.mktemp("int8")
    plain = _plain_convnet_state(zoo_dir, root / "convnet.pth")
    convnet = LoadOptions(arch="mlops_cli.core.zoo:ConvNet")
    for source, output, load in ((zoo_dir / "convnet", "folder", LoadOptions()), (zoo_dir / "tiny-bert", "hf", None),
                                 (plain, "state.pth", convnet), (onnx_dir / "convnet.onnx", "graph.onnx", None)):
        int8.run(ModelRef.parse(str(source)), int8.Int8Options(output=root / output, load=load or LoadOptions(),
                                                               check=False))
    return {"folder": root / "folder", "hf": root / "hf", "state": root / "state.pth", "onnx": root / "graph.onnx"}


@pytest.mark.parametrize(("kind", "evidence"), [
    ("folder", "quantization: dynamic-int8"), ("hf", "quantization.json"), ("state", "packed int8 layers such as fc.0"),
    ("onnx", "MatMulInteger"),
])
@pytest.mark.parametrize("command", ["half", "int8"])
def test_int8_input_is_refused(cli, int8_models: dict[str, Path], tmp_path: Path, kind: str, evidence: str,
                               command: str) -> None:
    """`compress int8 c -o c8 && compress half c8 ...` crashed (exit 1): now exit 3 with a hint, nothing written."""
    source = int8_models[kind]
    output = tmp_path / ("out.onnx" if kind == "onnx" else "out.pth" if kind == "state" else "out")
    arch = ("--arch", "mlops_cli.core.zoo:ConvNet") if kind == "state" else ()
    result = cli("compress", command, source, "-o", output, *arch)
    assert result.exit_code == 3, result.stderr
    message = _flat(result.stderr)
    assert "already quantised" in message and evidence in message
    assert "compress the float checkpoint" in message
    assert not output.exists()


def test_unknown_inputs_fail_before_anything_is_written(cli, tmp_path: Path) -> None:
    """A plain state_dict of a model whose inputs mlops cannot tell: exit 2 and no output, for half and int8."""
    (tmp_path / "arch.py").write_text("import torch\n\n\ndef Net():\n"
                                      "    return torch.nn.Sequential(torch.nn.Linear(4, 3))\n")
    torch.save(torch.nn.Sequential(torch.nn.Linear(4, 3)).state_dict(), tmp_path / "lin.pth")
    arch = ("--arch", f"{tmp_path / 'arch.py'}:Net")
    for command in ("half", "int8"):
        output = tmp_path / f"{command}.pth"
        result = cli("compress", command, tmp_path / "lin.pth", "-o", output, *arch)
        assert result.exit_code == 2, result.stderr
        assert "cannot tell what inputs" in result.stderr and "--no-check" in _flat(result.stderr)
        assert not output.exists()
    unchecked = cli("compress", "half", tmp_path / "lin.pth", "-o", tmp_path / "half.pth", *arch, "--no-check")
    assert unchecked.exit_code == 0, unchecked.stderr
    assert torch.load(tmp_path / "half.pth", weights_only=True)["0.weight"].dtype == torch.float16


def test_zoo_arch_supplies_its_inputs(cli, zoo_dir: Path, tmp_path: Path) -> None:
    """`--arch mlops_cli.core.zoo:ConvNet` without --input: the zoo entry's inputs measure the drift."""
    plain = _plain_convnet_state(zoo_dir, tmp_path / "ckpt.pth")
    fp16 = cli("compress", "half", plain, "-o", tmp_path / "half.pth", "--arch", "mlops_cli.core.zoo:ConvNet", "--json")
    assert fp16.exit_code == 0, fp16.stderr
    report = fp16.json()
    assert report["drift"]["passed"]
    assert [shape["input_shapes"]["x"] for shape in report["drift"]["shapes"]] == [[2, 1, 28, 28], [1, 1, 28, 28],
                                                                                [3, 1, 28, 28]]
    int8 = cli("compress", "int8", plain, "-o", tmp_path / "q.pth", "--arch", "mlops_cli.core.zoo:ConvNet", "--repeats",
               "1", "--json")
    assert int8.exit_code == 0, int8.stderr
    assert int8.json()["drift"]["passed"]


# ---------------------------------------------------------------- mask fills (sentinels) are not overflow


def test_mask_fills_saturate_instead_of_overflowing(tmp_path: Path) -> None:
    """+-finfo(float32).max (HF's attention-mask fill) becomes +-65504 (bf16: its own max), counted apart;
    source inf stays inf; a real 1e5 still overflows fp16."""
    fill = torch.finfo(torch.float32).max
    masks = {"mask_bias": torch.tensor([-fill, 0.5, fill, -fill]), "inf_mask": torch.tensor([float("-inf"), -fill])}
    save_file(masks, str(tmp_path / "masks.safetensors"))
    torch.save(masks, tmp_path / "masks.pth")
    for source in ("masks.safetensors", "masks.pth"):  # streamed path and in-memory path
        output = tmp_path / f"out-{source}"
        report = compress_half(str(tmp_path / source), output)
        assert report.passed and report.written, report.verdict
        assert report.totals.overflow == 0 and report.totals.sentinel == 4
        assert any("4 sentinel value(s) ±3.4e38 (attention-mask fills) saturated to ±65504" in n for n in report.notes)
        written = load_file(str(output)) if source.endswith(".safetensors") else torch.load(output, weights_only=True)
        assert written["mask_bias"].tolist() == [-65504.0, 0.5, 65504.0, -65504.0]
        assert written["inf_mask"].tolist() == [float("-inf"), -65504.0]
        assert {t.name: t.nonfinite_source for t in report.tensors}["inf_mask"] == 1

    bf16 = compress_half(str(tmp_path / "masks.safetensors"), tmp_path / "bf16.safetensors", dtype="bf16")
    values = load_file(str(tmp_path / "bf16.safetensors"))["mask_bias"]
    assert bf16.totals.overflow == 0 and bf16.totals.sentinel == 4
    assert values[0].item() == -torch.finfo(torch.bfloat16).max and torch.isfinite(values).all()

    save_file({"mask_bias": torch.tensor([-fill, 1e5])}, str(tmp_path / "real.safetensors"))
    real = compress_half(str(tmp_path / "real.safetensors"), tmp_path / "real16.safetensors")
    assert not real.passed and not real.written and real.totals.overflow == 1 and real.totals.sentinel == 1


def test_onnx_attention_mask_fill_is_not_overflow(cli, tmp_path: Path) -> None:
    """An exported graph holding finfo(float32).min as its mask fill converts (exit 0), the fill becomes -65504,
    and the fp16 graph passes verify-parity --preset fp16 against the original."""
    import warnings

    import onnx
    from onnx import numpy_helper

    class MaskedAttention(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.query = torch.nn.Linear(8, 8)

        def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            scores = self.query(x) @ x.transpose(1, 2)
            scores = scores + (1.0 - attention_mask[:, None, :].float()) * torch.finfo(torch.float32).min
            return scores.softmax(-1) @ x

    torch.manual_seed(0)
    example = (torch.randn(2, 5, 8), torch.ones(2, 5, dtype=torch.int64))
    axes = {0: "batch", 1: "sequence"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(MaskedAttention().eval(), example, str(tmp_path / "attn.onnx"),
                          input_names=["x", "attention_mask"], output_names=["y"], opset_version=17, dynamo=False,
                          dynamic_axes={"x": axes, "attention_mask": axes})
    result = cli("compress", "half", tmp_path / "attn.onnx", "-o", tmp_path / "attn16.onnx", "--json")
    assert result.exit_code == 0, result.stderr
    report = result.json()
    assert report["totals"]["overflow"] == 0 and report["totals"]["sentinel"] == 1 and report["drift"]["passed"]
    assert any("saturated to ±65504" in line for line in report["notes"])
    (name,) = report["totals"]["tensors_with_sentinel"]
    graph = onnx.load(str(tmp_path / "attn16.onnx")).graph
    stored = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    stored |= {f"Constant:{n.output[0]}": numpy_helper.to_array(n.attribute[0].t) for n in graph.node
               if n.op_type == "Constant" and n.attribute and n.attribute[0].HasField("t")}
    assert float(stored[name]) == -65504.0
    parity = cli("verify-parity", tmp_path / "attn.onnx", tmp_path / "attn16.onnx", "--preset", "fp16", "--no-timing",
                 "--json")
    assert parity.exit_code == 0, parity.stderr


# ---------------------------------------------------------------- exit 6 says what to do


def test_validation_failures_carry_a_hint(cli, zoo_dir: Path, onnx_dir: Path, tmp_path: Path) -> None:
    source = _convnet_with(tmp_path, zoo_dir, "big", 1e5)
    refused = cli("compress", "half", source, "-o", tmp_path / "a")
    assert refused.exit_code == 6
    hint = _flat(refused.stderr).partition("hint:")[2]
    assert r"--keep-fp32 '^fc\.0\.weight$'" in hint and "--dtype bf16" in hint and "--allow-overflow" in hint
    kept = cli("compress", "half", source, "-o", tmp_path / "b", "--keep-fp32", r"^fc\.0\.weight$", "--json")
    assert kept.exit_code == 0 and kept.json()["totals"]["overflow"] == 0  # the hint's advice works

    strict = cli("compress", "half", zoo_dir / "convnet", "-o", tmp_path / "c", "--atol", "1e-9", "--rtol", "0")
    assert strict.exit_code == 6
    hint = _flat(strict.stderr).partition("hint:")[2]
    assert "--atol/--rtol (now atol 1e-09, rtol 0)" in hint and "--keep-fp32" in hint and "--per-layer" in hint

    int8 = cli("compress", "int8", onnx_dir / "convnet.onnx", "-o", tmp_path / "q.onnx", "--atol", "1e-9", "--rtol",
               "0", "--repeats", "1")
    assert int8.exit_code == 6
    hint = _flat(int8.stderr).partition("hint:")[2]
    assert "--atol/--rtol (now atol 1e-09, rtol 0)" in hint and "--exclude" in hint


def test_failed_check_says_the_output_was_kept(cli, zoo_dir: Path, onnx_dir: Path, tmp_path: Path) -> None:
    """Exit 6 after writing: the tables and the hint say the output stays, where, and that a re-run needs --force
    (the looser re-run otherwise stops on exit 5)."""
    strict = ("--atol", "1e-9", "--rtol", "0")
    failed = cli("compress", "half", zoo_dir / "convnet", "-o", tmp_path / "out", *strict)
    assert failed.exit_code == 6 and (tmp_path / "out").is_dir()
    tables = _flat(failed.stdout)
    assert f"kept at {tmp_path / 'out'} although the check failed" in tables and "--force" in tables
    hint = _flat(failed.stderr).partition("hint:")[2]
    assert f"The output was kept at {tmp_path / 'out'}" in hint and "needs --force to replace it" in hint
    assert cli("compress", "half", zoo_dir / "convnet", "-o", tmp_path / "out").exit_code == 5
    assert cli("compress", "half", zoo_dir / "convnet", "-o", tmp_path / "out", "--force").exit_code == 0

    int8 = cli("compress", "int8", onnx_dir / "convnet.onnx", "-o", tmp_path / "q.onnx", *strict, "--repeats", "0")
    assert int8.exit_code == 6 and (tmp_path / "q.onnx").is_file()
    assert "although the check failed" in _flat(int8.stdout)
    assert f"The output was kept at {tmp_path / 'q.onnx'}" in _flat(int8.stderr)

    refused = cli("compress", "half", _convnet_with(tmp_path, zoo_dir, "big", 1e5), "-o", tmp_path / "big16")
    assert refused.exit_code == 6 and not (tmp_path / "big16").exists()
    assert "NOT written" in refused.stdout and "kept at" not in _flat(refused.stderr)


def test_drift_check_uses_the_produced_precisions_preset(cli, zoo_dir: Path, onnx_dir: Path, tmp_path: Path) -> None:
    """half checks with the fp16/bf16 preset, int8 with int8's, named in the report; --preset picks another."""
    from mlops_cli.core.compare import PRESETS

    for dtype in ("fp16", "bf16"):
        result = cli("compress", "half", zoo_dir / "convnet", "-o", tmp_path / dtype, "--dtype", dtype, "--json")
        assert result.exit_code == 0, result.stderr
        report = result.json()
        assert report["preset"] == f"{dtype} (auto)"
        assert (report["drift"]["atol"], report["drift"]["rtol"]) == PRESETS[dtype]
        assert f"preset {dtype} (auto)" in report["verdict"]
    chosen = cli("compress", "half", zoo_dir / "convnet", "-o", tmp_path / "fp32", "--preset", "fp32", "--json")
    assert chosen.json()["preset"] == "fp32 (--preset)" and chosen.json()["drift"]["atol"] == PRESETS["fp32"][0]

    int8 = cli("compress", "int8", onnx_dir / "convnet.onnx", "-o", tmp_path / "q.onnx", "--repeats", "0")
    assert int8.exit_code == 0, int8.stderr
    assert "preset int8 (auto)" in _flat(int8.stdout)
    overridden = cli("compress", "int8", onnx_dir / "convnet.onnx", "-o", tmp_path / "q2.onnx", "--repeats", "0",
                     "--atol", "0.5", "--json")
    report = overridden.json()
    assert report["preset"] == "int8 (auto), --atol/--rtol over it" and report["latency"] == []
    assert (report["drift"]["atol"], report["drift"]["rtol"]) == (0.5, PRESETS["int8"][1])


def test_loader_warnings_reach_the_report(cli, zoo_dir: Path, tmp_path: Path) -> None:
    """A tokenizer that fails to load is a loader warning: in the JSON report's warnings, on stderr otherwise."""
    folder = tmp_path / "bert"
    shutil.copytree(zoo_dir / "tiny-bert", folder)
    (folder / "tokenizer.json").write_text("{not json")
    result = cli("compress", "half", folder, "-o", tmp_path / "out", "--json")
    assert result.exit_code == 0, result.stderr
    warnings = result.json()["warnings"]  # the original's, and the copy's (its tokenizer is the same file)
    assert [w.startswith(f"the tokenizer in {path} could not be loaded") for w in warnings for path in
            (folder, tmp_path / "out")].count(True) == 2
    tables = cli("compress", "half", folder, "-o", tmp_path / "out2")
    assert "warning: the tokenizer" in _flat(tables.stderr)
