"""`mlops prune`: exact sparsity per method, permanent pruning (no weight_orig/weight_mask), outputs of the same
kind as the input that load back, structural shrink that really removes parameters and MACs, sweeps, thresholds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from mlops_cli.core.contract import ModelRef
from mlops_cli.core.errors import InputError, UnsafeInputError, UsageError
from mlops_cli.core.formats import read_safetensors_header
from mlops_cli.core.inputs import InputRequest
from mlops_cli.core.loading import LoadOptions, build_architecture, load_model
from mlops_cli.core.pruned import rebuild
from mlops_cli.services import prune
from mlops_cli.services.prune import PruneOptions, PruneReport

FAST = {"repeats": 1, "warmup": 0}
CONVNET_TARGETS = ["conv1.0", "conv2.0", "fc.0", "fc.2"]  # `out` is the classifier head: left alone


def run(reference: str, output: Path | None = None, load: LoadOptions | None = None, force: bool = False,
        inputs: tuple[str, ...] = (), **options: Any) -> PruneReport:
    request = InputRequest(specs=inputs, seed=options.get("seed", 0))
    return prune.run(ModelRef.parse(reference), PruneOptions(
        **{**FAST, **options}, load=load or LoadOptions(), output=output, force=force, inputs=request))


def weights_of(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return dict(module.named_parameters())


def assert_no_reparametrisation(keys: object) -> None:
    leftovers = [k for k in keys if k.endswith(("_orig", "_mask"))]  # type: ignore[attr-defined]
    assert not leftovers, f"pruning re-parametrisation left in the output: {leftovers}"


# ---------------------------------------------------------------- exact sparsity per method


def test_l1_prunes_each_layer_exactly_and_leaves_the_head_alone(tmp_path: Path) -> None:
    report = run("builtin:convnet", tmp_path / "out", method="l1", amounts=(0.3,))
    result = report.results[0]
    assert list(report.targets) == CONVNET_TARGETS
    assert ("out", "the classifier/LM head (name it with --include to prune it)") in report.skipped
    for layer in result.layers:
        assert layer.zeros == round(0.3 * layer.elements), layer.name
    reloaded = load_model(str(tmp_path / "out")).module
    for name in CONVNET_TARGETS:
        weight = reloaded.get_submodule(name).weight
        assert int((weight == 0).sum()) == round(0.3 * weight.numel())
    assert int((reloaded.out.weight == 0).sum()) == 0
    original = load_model("builtin:convnet").module.fc[0].weight.abs().flatten()
    pruned = reloaded.fc[0].weight.abs().flatten()
    removed = original[pruned == 0]
    assert removed.max() <= original[pruned != 0].min()  # L1: the smallest magnitudes went, not arbitrary ones


def test_random_is_seeded_and_deterministic(tmp_path: Path) -> None:
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        result = run("builtin:convnet", tmp_path / name, method="random", amounts=(0.4,), seed=seed).results[0]
        assert all(layer.zeros == round(0.4 * layer.elements) for layer in result.layers)
    same_a, same_b, other = ((tmp_path / n / "model.safetensors").read_bytes() for n in "abc")
    assert same_a == same_b
    assert same_a != other


@pytest.mark.parametrize("dim", [0, 1])
def test_ln_structured_zeroes_whole_slices(dim: int) -> None:
    report = run("builtin:convnet", method="ln-structured", amounts=(0.5,), n=1.0, dim=dim)
    assert report.dim == dim
    for layer in report.results[0].layers:
        slices = layer.shape[dim]
        assert layer.zeros == round(0.5 * slices) * (layer.elements // slices), layer.name


def test_global_prunes_the_exact_total_across_layers() -> None:
    result = run("builtin:lenet", method="global", amounts=(0.6,)).results[0]
    assert result.target_zeros == round(0.6 * result.target_elements)
    per_layer = {layer.name: layer.sparsity for layer in result.layers}
    assert len(set(round(s, 3) for s in per_layer.values())) > 1  # global: layers end up with different sparsity


# ---------------------------------------------------------------- outputs like the input, loading back


@pytest.mark.parametrize("method", ["l1", "random", "ln-structured", "global"])
def test_tiny_bert_folder_in_hf_folder_out(method: str, zoo_dir: Path, tmp_path: Path) -> None:
    source = zoo_dir / "tiny-bert"
    out = tmp_path / "pruned"
    report = run(str(source), out, method=method, amounts=(0.5,))
    result = report.results[0]
    assert "bert.embeddings.word_embeddings" in dict(report.skipped)
    assert "classifier" in dict(report.skipped)
    if method in ("l1", "random"):
        assert all(layer.zeros == round(0.5 * layer.elements) for layer in result.layers)
    elif method == "global":
        assert result.target_zeros == round(0.5 * result.target_elements)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in source.iterdir())
    assert (out / "tokenizer.json").read_bytes() == (source / "tokenizer.json").read_bytes()
    saved = load_file(str(out / "model.safetensors"))
    assert_no_reparametrisation(saved)
    assert set(saved) == set(load_file(str(source / "model.safetensors")))
    assert result.reloaded == "loads back through mlops; outputs identical to the pruned model"
    reloaded = load_model(str(out))
    original = load_model(str(source))
    assert torch.equal(reloaded.module.classifier.weight, original.module.classifier.weight)
    assert reloaded.tokenizer is not None


def test_safetensors_file_keeps_dtype_and_metadata(zoo_dir: Path, tmp_path: Path) -> None:
    state = load_file(str(zoo_dir / "convnet" / "model.safetensors"))
    source = tmp_path / "half.safetensors"
    save_file({k: v.half() for k, v in state.items()}, str(source), metadata={"format": "pt", "origin": "test"})
    out = tmp_path / "pruned.safetensors"
    load = LoadOptions(arch="mlops_cli.core.zoo:ConvNet")
    report = run(str(source), out, load, amounts=(0.5,), inputs=("x:float32[batch=2,1,28,28]",))
    assert report.model_kind == "safetensors"
    header, metadata = read_safetensors_header(out)
    assert {info["dtype"] for info in header.values()} == {"F16"}  # not silently upcast to fp32
    assert metadata == {"format": "pt", "origin": "test"}
    assert_no_reparametrisation(header)
    assert abs(out.stat().st_size - source.stat().st_size) < 200  # zeros do not shrink a dense file (metadata only)
    assert load_model(str(out), load).module.fc[0].weight.dtype == torch.float32


def test_training_checkpoint_keeps_its_other_entries(zoo_dir: Path, tmp_path: Path) -> None:
    state = load_file(str(zoo_dir / "convnet" / "model.safetensors"))
    source = tmp_path / "ckpt.pt"
    torch.save({"net": state, "epoch": 3, "optimizer": {"lr": 0.1}}, source)
    out = tmp_path / "pruned.pt"
    load = LoadOptions(arch="mlops_cli.core.zoo:ConvNet")
    report = run(str(source), out, load, amounts=(0.2,), inputs=("x:float32[batch=2,1,28,28]",))
    assert report.model_kind == "torch"
    saved = torch.load(out, weights_only=True)
    assert saved["epoch"] == 3 and saved["optimizer"] == {"lr": 0.1}
    assert_no_reparametrisation(saved["net"])
    assert int((saved["net"]["fc.0.weight"] == 0).sum()) == round(0.2 * saved["net"]["fc.0.weight"].numel())
    assert any("optimizer state still refers to the unpruned weights" in n for n in report.notes)
    assert load_model(str(out), load).state_key == "net"


def test_weights_folder_keeps_its_weights_format_and_other_files(zoo_dir: Path, tmp_path: Path) -> None:
    source = tmp_path / "lenet-pt"
    source.mkdir()
    torch.save(load_file(str(zoo_dir / "lenet" / "model.safetensors")), source / "weights.pt")
    sidecar = {**json.loads((zoo_dir / "lenet" / "mlops.json").read_text()), "weights": "weights.pt"}
    (source / "mlops.json").write_text(json.dumps(sidecar))
    (source / "README.md").write_text("notes")
    (source / "eval").mkdir()
    (source / "eval" / "scores.json").write_text("{}")
    out = tmp_path / "pruned"
    report = run(str(source), out, amounts=(0.5,))
    assert report.model_kind == "weights-folder"
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "eval", "mlops.json", "weights.pt"]
    assert (out / "eval" / "scores.json").read_text() == "{}"
    assert report.results[0].output_files["eval/"] == 2
    assert_no_reparametrisation(torch.load(out / "weights.pt", weights_only=True))
    assert json.loads((out / "mlops.json").read_text())["pruned"]["amount"] == 0.5
    assert report.results[0].reloaded == "loads back through mlops; outputs identical to the pruned model"


def test_tied_weights_are_named_when_pruned_together() -> None:
    report = run("builtin:tiny-gpt2", include=("lm_head",), amounts=(0.5,))
    assert list(report.targets) == ["lm_head"]
    assert "tied weights pruned together: transformer.wte = lm_head" in report.notes


def test_include_and_exclude_select_by_module_name() -> None:
    only_fc = run("builtin:convnet", include=("^fc\\.",), amounts=(0.5,))
    assert list(only_fc.targets) == ["fc.0", "fc.2"]
    with_head = run("builtin:convnet", include=("^out$", "^fc\\.0$"), amounts=(0.5,))
    assert list(with_head.targets) == ["fc.0", "out"]
    no_conv = run("builtin:convnet", exclude=("^conv",), amounts=(0.5,))
    assert list(no_conv.targets) == ["fc.0", "fc.2"]
    assert dict(no_conv.skipped)["conv1.0"] == "matches --exclude"
    embeddings = run("builtin:tiny-bert", include=("word_embeddings",), amounts=(0.5,))
    assert list(embeddings.targets) == ["bert.embeddings.word_embeddings"]
    assert embeddings.results[0].layers[0].zeros == round(0.5 * embeddings.results[0].layers[0].elements)
    with pytest.raises(UsageError, match="no layer to prune"):
        run("builtin:convnet", include=("nothing-matches",))


def test_sweep_reports_one_row_per_amount_and_writes_suffixed_outputs(tmp_path: Path) -> None:
    report = run("builtin:convnet", tmp_path / "swept", amounts=(0.1, 0.5, 0.9))
    assert [r.amount for r in report.results] == [0.1, 0.5, 0.9]
    assert [r.output for r in report.results] == [str(tmp_path / f"swept-{a}") for a in ("0.1", "0.5", "0.9")]
    sparsities = [r.target_sparsity for r in report.results]
    gzip_sizes = [r.size.gzip_bytes for r in report.results]
    drifts = [r.drift.max_abs for r in report.results]
    assert sparsities == sorted(sparsities) and gzip_sizes == sorted(gzip_sizes, reverse=True)
    assert drifts[0] < drifts[-1]
    assert len({r.size.raw_bytes for r in report.results}) == 1  # dense raw size never changes
    assert report.results[0].size.raw_bytes == report.size_before.raw_bytes
    assert not (tmp_path / "swept").exists()
    for amount in ("0.1", "0.5", "0.9"):
        assert load_model(str(tmp_path / f"swept-{amount}")).module is not None


# ---------------------------------------------------------------- structural shrink


def test_structured_shrink_of_a_cnn_reduces_parameters_and_macs_and_loads_back(tmp_path: Path) -> None:
    out = tmp_path / "shrunk"
    report = run("builtin:convnet", out, structured_shrink=True, amounts=(0.5,))
    result = report.results[0]
    assert result.parameters < report.parameters_before * 0.5
    assert report.macs_before and result.macs and result.macs < report.macs_before * 0.5
    assert result.size.raw_bytes < report.size_before.raw_bytes * 0.5
    shapes = {layer.name: layer.shape for layer in result.layers}
    assert shapes["conv1.0.weight"] == (8, 1, 3, 3) and shapes["out.weight"] == (10, 32)
    sidecar = json.loads((out / "mlops.json").read_text())
    assert sidecar["arch"] == "mlops_cli.core.pruned:rebuild"
    assert sidecar["arch_kwargs"]["arch"] == "mlops_cli.core.zoo:ConvNet"
    reloaded = load_model(str(out))  # no --arch needed: mlops' own architecture
    assert sum(p.numel() for p in reloaded.module.parameters()) == result.parameters
    assert reloaded.module.conv1[0].out_channels == 8
    assert reloaded.module(torch.zeros(1, 1, 28, 28)).shape == (1, 10)
    assert result.reloaded == "loads back through mlops; outputs identical to the pruned model"


def test_a_shrunk_model_can_be_shrunk_again_and_loads_back(tmp_path: Path) -> None:
    """The second shrink is described against the base architecture (rebuild inside rebuild is refused)."""
    run("builtin:convnet", tmp_path / "once", structured_shrink=True, amounts=(0.5,))
    report = run(str(tmp_path / "once"), tmp_path / "twice", structured_shrink=True, amounts=(0.5,))
    sidecar = json.loads((tmp_path / "twice" / "mlops.json").read_text())
    assert sidecar["arch_kwargs"]["arch"] == "mlops_cli.core.zoo:ConvNet"
    reloaded = load_model(str(tmp_path / "twice"))
    assert reloaded.module.conv1[0].out_channels == 4
    assert sum(p.numel() for p in reloaded.module.parameters()) == report.results[0].parameters


@pytest.mark.parametrize(("model", "field", "width"), [("tiny-bert", "intermediate_size", 64),
                                                       ("tiny-gpt2", "n_inner", 128)])
def test_structured_shrink_of_hf_feed_forward_updates_the_config(model: str, field: str, width: int,
                                                                  zoo_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "shrunk"
    report = run(str(zoo_dir / model), out, structured_shrink=True, amounts=(0.25,))
    result = report.results[0]
    assert json.loads((out / "config.json").read_text())[field] == width - round(0.25 * width)
    assert result.parameters < report.parameters_before
    assert result.macs is not None and report.macs_before is not None and result.macs < report.macs_before
    assert result.reloaded == "loads back through mlops; outputs identical to the pruned model"
    assert any("attention heads are kept" in n for n in report.notes)


def test_global_shrink_of_hf_is_refused_with_a_reason() -> None:
    with pytest.raises(UsageError, match="different widths"):
        run("builtin:tiny-vit", structured_shrink=True, method="global")


def test_rebuild_never_builds_code_from_outside_mlops(tmp_path: Path) -> None:
    with pytest.raises(UnsafeInputError, match="outside mlops"):
        rebuild("os:system", {"command": "echo unsafe"})
    folder = tmp_path / "crafted"
    folder.mkdir()
    save_file({"w": torch.zeros(1)}, str(folder / "model.safetensors"))
    (folder / "mlops.json").write_text(json.dumps({"arch": "mlops_cli.services.prune:rebuild",
                                                   "arch_kwargs": {"arch": "evil.py:Net", "shapes": {}}}))
    with pytest.raises(UnsafeInputError):
        load_model(str(folder))


# ---------------------------------------------------------------- the command


def test_command_json_and_threshold_exit_codes(cli, tmp_path: Path) -> None:
    ok = cli("prune", "builtin:lenet", "--amount", "0.3", "--repeats", "1", "--warmup", "0", "--json")
    assert ok.exit_code == 0, ok.stderr
    data = ok.json()
    assert data["enforced"] is False and data["results"][0]["drift"]["max_abs"] > 0
    assert data["results"][0]["target_sparsity"] == pytest.approx(0.3, abs=1e-3)
    assert all(layer["sparsity"] == layer["zeros"] / layer["elements"] for layer in data["results"][0]["layers"])
    assert data["results"][0]["latency"]["speedup"] > 0
    assert data["results"][0]["latency"]["before"]["median_ms"] > 0
    strict = cli("prune", "builtin:lenet", "--amount", "0.3", "--max-drift", "1e-9", "--repeats", "1", "--json")
    assert strict.exit_code == 6
    assert strict.json()["passed"] is False and "exceeds --max-drift" in strict.stderr
    atol = cli("prune", "builtin:lenet", "--amount", "0.3", "--atol", "1e-6", "--rtol", "0", "--repeats", "1")
    assert atol.exit_code == 6 and "max |diff|" in atol.stdout
    preset = cli("prune", "builtin:lenet", "--amount", "0.3", "--preset", "fp32", "--repeats", "0", "--json")
    assert preset.exit_code == 6 and preset.json()["thresholds"] == {"atol": 1e-4, "rtol": 1e-3}
    loose = cli("prune", "builtin:lenet", "--amount", "0.1", "--max-drift", "100", "--min-top1", "0", "--repeats", "1")
    assert loose.exit_code == 0 and "PASS" in loose.stdout


def test_command_tables_state_what_zeros_do_not_buy(cli, tmp_path: Path) -> None:
    result = cli("prune", "builtin:convnet", "-o", tmp_path / "p", "--repeats", "1", "--warmup", "0")
    assert result.exit_code == 0, result.stderr
    for words in ("Sparsity per layer", "weights, gzip -1", "Drift vs the unpruned model", "latency p50",
                  "do not get faster", "reload check"):
        assert words in result.stdout
    sweep = cli("prune", "builtin:convnet", "--amount", "0.2,0.6", "--structured-shrink", "--repeats", "1")
    assert sweep.exit_code == 0, sweep.stderr
    assert "Sweep: one row per amount" in sweep.stdout and "MACs" in sweep.stdout


@pytest.mark.parametrize(("args", "code", "words"), [
    (["--amount", "1.5"], 2, "between 0 and 1"),
    (["--amount", "a,b"], 2, "not a number"),
    (["--method", "magic"], 2, "magic"),
    (["--dim", "1"], 2, "--dim applies to"),
    (["--method", "ln-structured", "--dim", "4"], 2, "does not exist"),
    (["--include", "("], 2, "regular expression"),
    (["--structured-shrink", "--amount", "1"], 2, "every channel"),
    (["--max-drift", "-1"], 2, "--max-drift -1 must be 0 or more"),
    (["--max-drift", "nan"], 2, "--max-drift nan"),
    (["--min-top1", "2"], 2, "--min-top1 2 is not a fraction between 0 and 1"),
    (["--min-top1", "-0.1"], 2, "--min-top1 -0.1"),
])
def test_command_usage_errors(cli, args: list[str], code: int, words: str) -> None:
    result = cli("prune", "builtin:convnet", *args)
    assert result.exit_code == code
    assert words in result.stderr


def test_command_output_rules(cli, zoo_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "exists"
    out.mkdir()
    refused = cli("prune", "builtin:convnet", "-o", out, "--repeats", "1")
    assert refused.exit_code == 5 and "--force" in refused.stderr
    forced = cli("prune", "builtin:convnet", "-o", out, "--force", "--repeats", "1", "--json")
    assert forced.exit_code == 0 and (out / "mlops.json").is_file()
    over_input = cli("prune", zoo_dir / "convnet", "-o", zoo_dir / "convnet", "--force")
    assert over_input.exit_code == 5 and "overwrite the input" in over_input.stderr
    scripted = tmp_path / "linear.pt"
    torch.jit.trace(torch.nn.Linear(2, 2).eval(), torch.zeros(1, 2)).save(str(scripted))
    refused_kind = cli("prune", scripted, "--trust-code")
    assert refused_kind.exit_code == 3 and "prunes weights of PyTorch modules" in refused_kind.stderr


USER_ARCH = '''
import torch.nn as nn


class Net(nn.Module):
    def __init__(self, hard_coded: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 8 * 8, 16)
        self.head = nn.Linear(16, 4)
        self.hard_coded = hard_coded

    def forward(self, x):
        x = self.conv(x).relu()
        x = x.view(x.shape[0], 8 * 8 * 8) if self.hard_coded else x.flatten(1)
        return self.head(self.fc(x).relu())
'''


@pytest.fixture()
def user_arch(tmp_path: Path) -> tuple[Path, Path]:
    """A model of the user's own (architecture file + safetensors weights), outside mlops_cli."""
    arch = tmp_path / "user_net.py"
    arch.write_text(USER_ARCH)
    torch.manual_seed(0)
    net = build_architecture(f"{arch}:Net", {})
    weights = tmp_path / "net.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(weights))
    return arch, weights


def test_shrunk_user_architecture_loads_back_only_when_trusted_again(user_arch: tuple[Path, Path],
                                                                     tmp_path: Path) -> None:
    arch, weights = user_arch
    out = tmp_path / "shrunk"
    report = run(str(weights), out, LoadOptions(arch=f"{arch}:Net"), structured_shrink=True, amounts=(0.5,),
                 inputs=("x:float32[batch=2,1,8,8]",))
    result = report.results[0]
    assert result.parameters < report.parameters_before
    assert result.reloaded == "loads back through mlops; outputs identical to the pruned model"
    assert any("--arch-kwargs" in note and "trust_code" in note for note in report.notes)
    with pytest.raises(UnsafeInputError, match="would run"):
        load_model(str(out))  # an mlops.json alone never makes mlops import foreign code
    kwargs = {**json.loads((out / "mlops.json").read_text())["arch_kwargs"], "trust_code": True}
    trusted = load_model(str(out), LoadOptions(arch="mlops_cli.services.prune:rebuild", arch_kwargs=kwargs))
    assert trusted.module.conv.out_channels == 4


def test_shrink_that_breaks_a_hard_coded_forward_is_an_input_error(user_arch: tuple[Path, Path]) -> None:
    arch, weights = user_arch
    with pytest.raises(InputError, match="no longer runs"):
        run(str(weights), None, LoadOptions(arch=f"{arch}:Net", arch_kwargs={"hard_coded": True}),
            structured_shrink=True, amounts=(0.5,), inputs=("x:float32[batch=2,1,8,8]",))


def test_sweep_output_names_keep_a_file_suffix(zoo_dir: Path, tmp_path: Path) -> None:
    from mlops_cli.services.prune.artefact import output_paths

    weights = ModelRef.parse(str(zoo_dir / "convnet" / "model.safetensors"))
    sweep = PruneOptions(amounts=(0.1, 0.5), output=tmp_path / "p.safetensors")
    assert output_paths(weights, sweep) == {0.1: tmp_path / "p-0.1.safetensors", 0.5: tmp_path / "p-0.5.safetensors"}
    # a shrunk module is written as a folder
    shrink = PruneOptions(amounts=(0.1, 0.5), structured_shrink=True, output=tmp_path / "p")
    assert output_paths(weights, shrink) == {0.1: tmp_path / "p-0.1", 0.5: tmp_path / "p-0.5"}
    assert output_paths(ModelRef.parse("builtin:convnet"), PruneOptions(amounts=(0.1, 0.5))) == {}


def test_an_int8_model_is_refused_with_the_way_round(cli, zoo_dir: Path, tmp_path: Path) -> None:
    """`compress int8` output holds packed int8 kernels (state_dict keys with `._packed_params`): pruning cannot
    mask them, so it must say so (exit 3) rather than crash, and write nothing."""
    int8 = tmp_path / "convnet-int8"
    made = cli("compress", "int8", zoo_dir / "convnet", "-o", int8)
    assert made.exit_code == 0, made.stderr
    assert any("._packed_params" in key for key in torch.load(int8 / "model.int8.pt", weights_only=True))
    result = cli("prune", int8, "-o", tmp_path / "pruned", "--repeats", "1", "--warmup", "0")
    assert result.exit_code == 3, result.stderr
    message = " ".join(result.stderr.split())
    assert "quantised to int8 (fc.0, fc.2, out)" in message
    assert "Prune the float checkpoint first, then quantise" in message
    assert not (tmp_path / "pruned").exists()


# ---------------------------------------------------------------- Hugging Face base models (#13.3)

SENTENCE_TRANSFORMERS_EXTRAS = {
    "1_Pooling/config.json": '{"word_embedding_dimension": 32, "pooling_mode_mean_tokens": true}',
    "modules.json": '[{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}, '
                    '{"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]',
    "config_sentence_transformers.json": '{"__version__": {"sentence_transformers": "3.0.0"}}',
    "sentence_bert_config.json": '{"max_seq_length": 64, "do_lower_case": false}',
}


def tiny_bert_config(**extra: Any) -> Any:
    from transformers import BertConfig

    return BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=64, **extra)


@pytest.fixture()
def sentence_folder(tmp_path: Path) -> Path:
    """A sentence-transformers-like folder around a bare BertModel (no head, no `bert.` prefix)."""
    from transformers import BertModel

    torch.manual_seed(0)
    folder = tmp_path / "minilm"
    BertModel(tiny_bert_config()).eval().save_pretrained(folder)
    for name, text in SENTENCE_TRANSFORMERS_EXTRAS.items():
        (folder / name).parent.mkdir(exist_ok=True)
        (folder / name).write_text(text)
    return folder


def test_global_pruning_of_a_bare_base_model_prunes_linear_weights_only(cli, sentence_folder: Path,
                                                                        tmp_path: Path) -> None:
    out = tmp_path / "pruned"
    result = cli("prune", sentence_folder, "-o", out, "--method", "global", "--amount", "0.3", "--repeats", "0",
                 "--json")
    assert result.exit_code == 0, result.stderr
    data = result.json()
    assert data["results"][0]["target_sparsity"] == pytest.approx(0.3, abs=1e-3)
    assert {layer["module_type"] for layer in data["results"][0]["layers"]} == {"Linear"}
    assert "encoder.layer.0.attention.self.query" in data["targets"] and "pooler.dense" in data["targets"]
    skipped = dict(map(tuple, data["skipped"]))
    assert "embeddings.word_embeddings" in skipped and "encoder.layer.0.output.LayerNorm" in skipped
    original, pruned = load_file(str(sentence_folder / "model.safetensors")), load_file(str(out / "model.safetensors"))
    for name, tensor in pruned.items():
        if "LayerNorm" in name or "embeddings" in name or name.endswith(".bias"):
            assert torch.equal(tensor, original[name]), name  # norms, embeddings and biases untouched
    assert int((pruned["encoder.layer.1.intermediate.dense.weight"] == 0).sum()) > 0
    for name, text in SENTENCE_TRANSFORMERS_EXTRAS.items():
        assert (out / name).read_text() == text, name  # every extra file and folder beside the weights
    assert load_model(str(out)).module is not None


def test_include_selects_layers_by_type_never_norms_named_only_through_their_parent(sentence_folder: Path) -> None:
    report = run(str(sentence_folder), include=("encoder",), amounts=(0.3,))
    assert report.targets and not [name for name in report.targets if "LayerNorm" in name]
    assert all(layer.module_type == "Linear" for layer in report.results[0].layers)
    assert dict(report.skipped)["encoder.layer.0.output.LayerNorm"].startswith("embeddings and norms")
    named = run(str(sentence_folder), include=("LayerNorm",), amounts=(0.3,))  # named by the user: pruned
    assert named.targets and all("LayerNorm" in name for name in named.targets)


def test_task_head_model_keeps_its_head_and_prunes_its_base(tmp_path: Path) -> None:
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    folder = tmp_path / "classifier"
    BertForSequenceClassification(tiny_bert_config(num_labels=3)).eval().save_pretrained(folder)
    report = run(str(folder), tmp_path / "out", method="global", amounts=(0.3,))
    assert dict(report.skipped)["classifier"].startswith("the classifier/LM head")
    assert "bert.pooler.dense" in report.targets
    assert report.results[0].target_sparsity == pytest.approx(0.3, abs=1e-3)
    assert report.results[0].reloaded == "loads back through mlops; outputs identical to the pruned model"
    base = run(str(folder), include=("^bert\\.",), amounts=(0.3,))  # the base model's layers, by type
    assert "bert.pooler.dense" in base.targets and "classifier" not in base.targets
    assert not [name for name in base.targets if "LayerNorm" in name or "embeddings" in name]


# ---------------------------------------------------------------- slow steps (#13.8)


def test_compressed_size_of_a_large_state_is_estimated_from_a_fixed_sample() -> None:
    from mlops_cli.services.prune.sizes import weight_sizes

    generator = torch.Generator().manual_seed(0)
    state = {f"layer{i}.weight": torch.randn(256, 1024, generator=generator) * 0.02 for i in range(4)}  # 4 MiB
    for i, tensor in enumerate(state.values()):  # sparsity that differs per tensor: the sample must span them all
        tensor[torch.rand(tensor.shape, generator=generator) < 0.2 * i] = 0
    exact = weight_sizes(state, sample_bytes=None)
    sampled = weight_sizes(state, sample_bytes=512 * 1024)
    assert exact.sampled_share == 1.0 and exact.method == "every byte compressed" and exact.codec == "gzip -1"
    assert sampled.raw_bytes == exact.raw_bytes == 4 * 1024 * 1024
    assert sampled.sampled_share == pytest.approx(1 / 8)
    assert "1 block of 64 KiB in 8 compressed (12.5% of the bytes)" in sampled.method
    assert sampled.gzip_bytes == pytest.approx(exact.gzip_bytes, rel=0.03)
    assert weight_sizes(state, sample_bytes=512 * 1024) == sampled  # the same blocks every run
    skipped = weight_sizes(state, estimate=False)
    assert skipped.gzip_bytes is None and skipped.gzip_ratio is None and "--no-size-estimate" in skipped.method


def test_every_long_step_names_itself_and_the_size_estimate_can_be_skipped(tmp_path: Path) -> None:
    steps: list[str] = []
    report = run("builtin:lenet", tmp_path / "out", on_step=steps.append, repeats=1, amounts=(0.3,))
    assert steps == ["loading", "estimating the compressed size of the input", "pruning 0.3", "measuring drift 0.3",
                     "writing out", "reload check out", "timing 0.3", "estimating the compressed size at 0.3"]
    assert report.results[0].size.gzip_bytes and report.size_before.method == "every byte compressed"
    steps.clear()
    quick = run("builtin:lenet", on_step=steps.append, repeats=0, size_estimate=False, amounts=(0.3,))
    assert not [step for step in steps if "compressed size" in step or "timing" in step]
    assert quick.results[0].size.gzip_bytes is None and quick.results[0].latency is None


def test_command_no_size_estimate_says_so(cli) -> None:
    result = cli("prune", "builtin:lenet", "--no-size-estimate", "--repeats", "0")
    assert result.exit_code == 0, result.stderr
    assert "compressed size: not estimated (--no-size-estimate)" in " ".join(result.stdout.split())
    data = cli("prune", "builtin:lenet", "--no-size-estimate", "--repeats", "0", "--json").json()
    assert data["size_before"]["gzip_bytes"] is None and data["results"][0]["latency"] is None


# ---------------------------------------------------------------- speed-ups the spread supports (#14)


def timing(*samples: float) -> Any:
    from mlops_cli.core.timing import summarize_samples

    return summarize_samples(list(samples), warmup=3)


def test_a_speed_up_is_claimed_only_when_its_interval_excludes_one() -> None:
    from mlops_cli.render.prune import speed_change
    from mlops_cli.services.prune import LatencyFigures

    noisy = (1.0, 2.0, 1.1, 1.9, 1.2, 1.8, 1.0, 2.0)  # issue #14: equal p90s, medians apart by noise
    overlapping = LatencyFigures("x", before=timing(*noisy), after=timing(*reversed(noisy[1:]), 0.9))
    assert not overlapping.measurable
    assert speed_change(overlapping).startswith("no measurable difference")
    steady_2, steady_1 = (2.0, 2.1, 1.95, 2.05, 2.0, 2.02), (1.0, 1.05, 0.98, 1.02, 1.0, 1.01)
    faster = LatencyFigures("x", before=timing(*steady_2), after=timing(*steady_1))
    assert faster.measurable and speed_change(faster).startswith("2.00x faster")
    slower = LatencyFigures("x", before=timing(*steady_1), after=timing(*steady_2))
    assert slower.measurable and speed_change(slower).startswith("2.00x slower")
    few = LatencyFigures("x", before=timing(2.0), after=timing(1.0))
    assert not few.measurable and speed_change(few).startswith("no measurable difference")
