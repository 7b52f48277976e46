"""`--device-map`, `--max-memory`, `--offload-folder` and `--tp-plan` (docs/scaling.md).

On this CPU-only machine `--device-map auto --max-memory cpu=SIZE` with SIZE below the model's size makes
accelerate keep the first layers on CPU and offload the rest to disk: every command must run such a model where
it is (never `.to(device)` it), or gather it on CPU when it needs every weight at once (export, int8, pruning).
The models are tiny Llama and GPT-2 configs with random weights and the bundled BPE tokenizer.
"""

from __future__ import annotations

import gc
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from mlops_cli.core.contract import LoadOptions
from mlops_cli.core.errors import ResourceError, UsageError
from mlops_cli.core.loading import load_model, parse_device_map, parse_max_memory
from mlops_cli.core.runtimes import (
    device_map_of,
    gather_on_cpu,
    input_device,
    run_device,
    runner_for,
    same_device,
)

SPLIT = "cpu=600KB"  # the Llama below is ~1 MB: embeddings and a layer fit in memory, the rest goes to disk
PLACED = ("--device-map", "auto", "--max-memory", SPLIT)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny Llama (untied, 4 layers) and a tiny GPT-2 (tied embeddings), both with the bundled tokenizer."""
    import transformers

    from mlops_cli.core.zoo import gpt2_tokenizer

    root = tmp_path_factory.mktemp("placed")
    tokenizer = gpt2_tokenizer()
    vocab = len(tokenizer)
    torch.manual_seed(0)
    configs = {
        "llama": transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                                          num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                          max_position_embeddings=128, bos_token_id=None, eos_token_id=None),
        "gpt2": transformers.GPT2Config(vocab_size=vocab, n_embd=64, n_layer=4, n_head=4, n_positions=128,
                                        bos_token_id=None, eos_token_id=None),
    }
    folders = {}
    for name, config in configs.items():
        folder = root / name
        transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        folders[name] = folder
    return folders


def _inputs() -> dict[str, np.ndarray]:
    ids = np.arange(1, 13, dtype=np.int64).reshape(2, 6)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


# ---------------------------------------------------------------- parsing and refusals (exit 2)


def test_max_memory_parses_gpu_indexes_cpu_and_units() -> None:
    assert parse_max_memory("0=20GiB, cuda:1=1.5GB,cpu=60GiB") == {0: 20 * 2**30, 1: 1_500_000_000, "cpu": 60 * 2**30}
    assert parse_max_memory("cpu=4096") == {"cpu": 4096}
    assert parse_max_memory(None) is None
    assert parse_device_map("Auto") == "auto" and parse_device_map("cuda:1") == "cuda:1"


@pytest.mark.parametrize("text", ["cpu", "cpu=lots", "gpu0=1GB", "0=1XB", "=1GB", ","])
def test_bad_max_memory_is_a_usage_error_with_an_example(text: str) -> None:
    with pytest.raises(UsageError) as caught:
        parse_max_memory(text)
    assert "--max-memory 0=20GiB,cpu=60GiB" in (caught.value.hint or "")


def test_bad_placement_options_exit_2_naming_why(cli, models: dict[str, Path], tmp_path: Path) -> None:
    llama = models["llama"]
    cases = [
        (("summarize", llama, "--max-memory", "cpu=lots"), "Example: --device-map auto"),
        (("generate", llama, "-p", "hi", "--device-map", "everywhere"), "not a placement"),
        (("summarize", "builtin:tiny-gpt2", "--device-map", "auto"), "mlops zoo save"),
        (("estimate", llama, "--device-map", "auto"), "reads no weights"),
        (("summarize", llama, "--tp-plan", "auto"), "torchrun"),
        (("summarize", llama, "--tp-plan", "auto", "--device-map", "auto"), "pick one"),
        (("summarize", models["gpt2"], "--tp-plan", "auto"), "no tensor-parallel plan for GPT2Config"),
        (("summarize", llama, "--device-map", "cpu", "--max-memory", "cpu=1GB"), "puts the whole model on one"),
        (("summarize", llama, "--device-map", "cpu", "--device", "cuda"), "contradicts the placement options"),
        (("generate", llama, "-p", "hi", "--device-map", "cpu", "--device", "cuda"), "contradicts the placement"),
        (("summarize", llama, "--offload-folder", tmp_path), "alone it does nothing"),
        (("estimate", llama, "--offload-folder", tmp_path), "reads no weights"),
        (("summarize", llama, *PLACED, "--offload-folder", llama / "config.json"), "config.json is a file"),
    ]
    if not torch.cuda.is_available():
        cases.append((("summarize", llama, "--max-memory", "0=1GB,cpu=1GB"), "no CUDA GPU is visible"))
    for args, message in cases:
        result = cli(*args)
        assert result.exit_code == 2, (args, result.output)
        assert message in " ".join(result.output.split()), (args, result.output)


def test_a_second_model_is_placed_only_when_accelerate_can_place_it(models: dict[str, Path], tmp_path: Path) -> None:
    """verify-parity's and bench --against's other model: an int8 folder of `compress int8` loads unplaced."""
    import shutil

    from mlops_cli.core.loading import placement_for

    int8 = tmp_path / "int8"
    shutil.copytree(models["llama"], int8)
    (int8 / "quantization.json").write_text("{}")
    placed = LoadOptions(device_map="auto", max_memory={"cpu": 600_000})
    assert placement_for(str(models["llama"]), placed) == placed
    assert placement_for(str(int8), placed) == LoadOptions()


def test_placement_of_a_weights_file_is_refused(tmp_path: Path) -> None:
    from mlops_cli.core.zoo import ConvNet

    weights = tmp_path / "convnet.pt"
    torch.save(ConvNet().state_dict(), weights)
    with pytest.raises(UsageError, match="not a Hugging Face model folder"):
        load_model(str(weights), LoadOptions(arch="mlops_cli.core.zoo:ConvNet", device_map="auto"))


# ---------------------------------------------------------------- loading and running a placed model


def test_a_single_device_map_is_kept_even_where_auto_means_cuda(models: dict[str, Path],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """accelerate dispatches nothing for a one-device map: the model looks ordinary, yet `--device auto` (CUDA on
    a GPU machine) must not move it, and `--device cuda` contradicts it."""
    placed = load_model(str(models["llama"]), LoadOptions(device_map="cpu"))
    assert device_map_of(placed.module) is None and placed.placed
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine, as far as --device auto knows
    assert run_device(placed, "auto") == "cpu"
    assert runner_for(placed, "auto")(_inputs())["logits"].shape == (2, 6, placed.config.vocab_size)
    with pytest.raises(UsageError, match="contradicts"):
        run_device(placed, "cuda")
    gather_on_cpu(placed, "export")
    assert not placed.placed and run_device(placed, "auto") == "cpu"  # gathered: auto keeps it on CPU
    assert run_device(placed, "cpu") == "cpu"


def test_devices_are_compared_as_devices() -> None:
    assert same_device("cuda", "cuda:0") and same_device("cuda:0", "cuda") and same_device("cuda:1", "cuda:1")
    assert not same_device("cuda:1", "cuda:0") and not same_device("cpu", "cuda:0")


def test_disk_offloaded_model_computes_what_the_whole_model_computes(models: dict[str, Path]) -> None:
    whole = load_model(str(models["llama"]))
    placed = load_model(str(models["llama"]), LoadOptions(max_memory=parse_max_memory(SPLIT)))  # implies auto
    where = set((device_map_of(placed.module) or {}).values())
    assert where == {"cpu", "disk"}
    assert any("offloaded to disk" in w for w in placed.warnings)
    assert input_device(placed.module) == "cpu"
    expected = runner_for(whole, "cpu")(_inputs())["logits"]
    runner = runner_for(placed, "cpu")
    np.testing.assert_array_equal(runner(_inputs())["logits"], expected)
    assert device_map_of(placed.module) is not None  # still placed: the runner did not move it


def test_the_private_offload_folder_goes_with_the_model(models: dict[str, Path], tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    placed = load_model(str(models["llama"]), LoadOptions(device_map="auto", max_memory={"cpu": 600_000}))
    assert [p.name.startswith("mlops-offload-") for p in tmp_path.iterdir()] == [True]
    del placed
    gc.collect()
    assert list(tmp_path.iterdir()) == []


def test_a_failed_placed_load_leaves_no_offload_folder(models: dict[str, Path], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import json
    import shutil

    from mlops_cli.core.errors import InputError

    broken = tmp_path / "broken"
    shutil.copytree(models["llama"], broken)
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))  # weights are 128 wide
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    with pytest.raises(InputError, match=r"do not (fit|match)"):
        load_model(str(broken), LoadOptions(device_map="auto", max_memory={"cpu": 600_000}))
    gc.collect()
    assert list(scratch.iterdir()) == []


def test_gathering_on_cpu_restores_every_weight_and_the_tie(models: dict[str, Path]) -> None:
    whole = load_model(str(models["gpt2"]))
    placed = load_model(str(models["gpt2"]), LoadOptions(device_map="auto", max_memory={"cpu": 100_000}))
    assert device_map_of(placed.module) is not None
    gather_on_cpu(placed, "export")
    module = placed.module
    assert device_map_of(module) is None and not hasattr(module.get_input_embeddings(), "_hf_hook")
    assert module.lm_head.weight is module.get_input_embeddings().weight
    expected = whole.module.state_dict()
    assert all(torch.equal(tensor, expected[name]) for name, tensor in module.state_dict().items())
    assert any(w.startswith("export needs the whole model") for w in placed.warnings)
    assert not any("read back on every forward pass" in w for w in placed.warnings)


def test_gathering_what_does_not_fit_is_refused(models: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    import psutil

    placed = load_model(str(models["gpt2"]), LoadOptions(device_map="auto", max_memory={"cpu": 100_000}))
    monkeypatch.setattr(psutil, "virtual_memory", lambda: type("Memory", (), {"available": 1000})())
    with pytest.raises(ResourceError, match="do not fit"):
        gather_on_cpu(placed, "export")


# ---------------------------------------------------------------- commands on a placed model


def _cli_json(cli: Any, *args: Any) -> dict[str, Any]:
    result = cli(*args, "--json")
    assert result.exit_code == 0, result.output
    return result.json()


def test_generate_placed_gives_the_same_tokens(cli, models: dict[str, Path]) -> None:
    args = ("generate", models["llama"], "-p", "The model is", "--max-new-tokens", "6", "--fixed-length",
            "--warmup", "0")
    plain = _cli_json(cli, *args)
    placed = _cli_json(cli, *args, *PLACED)
    assert placed["results"][0]["outputs"][0]["new_token_ids"] == plain["results"][0]["outputs"][0]["new_token_ids"]
    assert placed["device"] == "cpu" and any("placed the model on: cpu, disk" in n for n in placed["notes"])
    assert placed["device_map"]["model.embed_tokens"] == "cpu" and placed["device_map"]["lm_head"] == "disk"
    assert plain["device_map"] is None


def test_verify_parity_of_two_placed_sides_says_each_thing_once(cli, models: dict[str, Path]) -> None:
    report = _cli_json(cli, "verify-parity", models["llama"], models["llama"], "--no-eval", *PLACED)
    offloaded = [w for w in report["warnings"] if "offloaded to disk" in w]
    assert report["passed"] is True and len(offloaded) == 1, report["warnings"]


def test_summarize_placed_counts_what_the_whole_model_counts(cli, models: dict[str, Path]) -> None:
    args = ("summarize", models["llama"], "--repeats", "0")
    plain = _cli_json(cli, *args)
    placed = _cli_json(cli, *args, *PLACED)
    assert placed["parameters"] == plain["parameters"]
    assert placed["compute"]["macs"] == plain["compute"]["macs"]
    assert any("placed the model on: cpu, disk" in n for n in placed["notes"])
    assert set(placed["device_map"].values()) == {"cpu", "disk"}


@pytest.mark.slow
def test_export_onnx_of_a_placed_model_gathers_it_and_verifies(cli, models: dict[str, Path], tmp_path: Path) -> None:
    report = _cli_json(cli, "export", "onnx", models["llama"], "-o", tmp_path / "m.onnx", "--no-kv-cache",
                       "--exporter", "legacy", "--optimize", "none", *PLACED)
    assert report["passed"] is True
    assert any("gathered on CPU" in w for w in report["warnings"])
    onnx_vs_placed = _cli_json(cli, "verify-parity", models["llama"], tmp_path / "m.onnx", *PLACED)
    assert onnx_vs_placed["passed"] is True  # the ONNX candidate is loaded as it is, the reference placed


def test_prune_of_a_placed_model_gathers_it_and_keeps_it_on_cpu(cli, models: dict[str, Path], tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A model that needed a device map will not fit one GPU: `--device auto` keeps it on CPU once gathered."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine, as far as --device auto knows
    report = _cli_json(cli, "prune", models["gpt2"], "-o", tmp_path / "pruned", "--amount", "0.3",
                       "--device-map", "auto", "--max-memory", "cpu=100KB")
    assert any("pruning needs the whole model" in w for w in report["warnings"])
    assert report["device"] == "cpu"


def test_cuda_out_of_memory_is_a_resource_error() -> None:
    from mlops_cli.app import exit_code_for

    code, message, hint = exit_code_for(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert (code, message) == (7, "out of GPU memory: CUDA out of memory. Tried to allocate 2 GiB")
    assert "--device cpu" in (hint or "")


# ---------------------------------------------------------------- tensor parallelism (torchrun, gloo on CPU)


@pytest.mark.slow
def test_generate_under_torchrun_with_tp_plan_gives_the_same_tokens(cli, models: dict[str, Path]) -> None:
    """Two processes, each holding half of every layer (transformers' `tp_plan="auto"` over gloo): the tokens
    are those of the whole model in one process. ~15 s, mostly two interpreters importing torch."""
    import json
    import os
    import subprocess
    import sys

    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    args = ["generate", str(models["llama"]), "-p", "The model is", "--max-new-tokens", "4", "--fixed-length",
            "--warmup", "0", "--json"]
    plain = _cli_json(cli, *args[:-1])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "--local-ranks-filter", "0", "-m", "mlops_cli", *args, "--tp-plan", "auto"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(run.stdout)
    assert report["results"][0]["outputs"][0]["new_token_ids"] == plain["results"][0]["outputs"][0]["new_token_ids"]
    assert any("split over 2 processes" in note for note in report["notes"])


def test_half_rounded_weights_are_recognised_when_some_are_offloaded() -> None:
    """Offloaded (meta) weights cannot be read: the precision is that of the weights in memory, or a half
    candidate placed by --device-map was taken for fp32 and verify-parity applied fp32 tolerances (exit 6)."""
    from mlops_cli.core.precision import module_precision

    in_memory = torch.nn.Linear(64, 64)
    with torch.no_grad():
        in_memory.weight.copy_(in_memory.weight.half().float())
    model = torch.nn.Sequential(in_memory, torch.nn.Linear(64, 128, device="meta"))
    assert module_precision(model) == ("fp16", "weights rounded to float16")
