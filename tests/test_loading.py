"""Model references and the safety rules of loading (each rule of the foundation issue has a test)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from mlops_cli.core.errors import InputError, UnsafeInputError, UsageError
from mlops_cli.core.inputs import plan_inputs
from mlops_cli.core.loading import LoadOptions, ModelKind, load_model
from mlops_cli.core.runtimes import runner_for

CONVNET = LoadOptions(arch="mlops_cli.core.zoo:ConvNet")


class Evil:
    """Unpickling this would run code: a safe load must refuse it without running anything."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _convnet_state() -> dict[str, torch.Tensor]:
    from mlops_cli.core import zoo

    return zoo.build("convnet")[0].state_dict()


def _outputs(loaded):
    return runner_for(loaded)(plan_inputs(loaded).example.tensors)


def test_pickle_with_code_is_refused_and_never_run(tmp_path, cli) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": Evil(str(marker))}, path)
    with pytest.raises(UnsafeInputError) as info:
        load_model(str(path), CONVNET)
    assert info.value.exit_code == 4
    assert "open" in info.value.message  # the offending global is named
    result = cli("inspect", path)
    assert result.exit_code == 4
    assert "refuses" in result.stderr and "Traceback" not in result.stderr
    assert not marker.exists()


def test_unknown_class_is_refused(tmp_path) -> None:
    path = tmp_path / "module.pt"
    torch.save(torch.nn.Linear(2, 2), path)  # a whole module, not a state_dict
    with pytest.raises(UnsafeInputError, match=r"torch\.nn\.modules\.linear\.Linear") as info:
        load_model(str(path), CONVNET)
    assert "state_dict" in info.value.hint


def test_torchscript_needs_trust_code(tmp_path) -> None:
    path = tmp_path / "model.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(3, 2)), path)
    with pytest.raises(UnsafeInputError, match="TorchScript") as info:
        load_model(str(path))
    assert "--trust-code" in info.value.hint
    loaded = load_model(str(path), LoadOptions(trust_code=True))
    assert loaded.kind == ModelKind.TORCHSCRIPT


def test_remote_code_needs_trust_remote_code(zoo_dir, tmp_path) -> None:
    folder = tmp_path / "remote"
    shutil.copytree(zoo_dir / "tiny-bert", folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "modeling_evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsafeInputError, match="custom code") as info:
        load_model(str(folder))
    assert "--trust-remote-code" in info.value.hint


def test_training_checkpoint_state_dict_found_automatically(tmp_path) -> None:
    state = _convnet_state()
    path = tmp_path / "ckpt.pt"
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    torch.save({"net": state, "optimizer": optimizer.state_dict(), "epoch": 4}, path)
    loaded = load_model(str(path), CONVNET)
    assert loaded.state_key == "net"
    assert loaded.checkpoint_extras["epoch"] == 4
    assert torch.equal(loaded.module.out.weight, state["out.weight"])


def test_key_option_and_wrong_key(tmp_path) -> None:
    path = tmp_path / "ckpt.pt"
    torch.save({"ema_weights": _convnet_state(), "step": 10}, path)
    with pytest.raises(InputError, match="without a recognisable state_dict") as info:
        load_model(str(path), CONVNET)
    assert "--key" in info.value.hint and "ema_weights" in info.value.hint
    loaded = load_model(str(path), LoadOptions(arch="mlops_cli.core.zoo:ConvNet", key="ema_weights"))
    assert loaded.state_key == "ema_weights"
    with pytest.raises(InputError, match="no key 'nope'"):
        load_model(str(path), LoadOptions(arch="mlops_cli.core.zoo:ConvNet", key="nope"))


def test_missing_unexpected_and_mismatched_keys_are_named(tmp_path) -> None:
    state = _convnet_state()
    del state["out.bias"]
    state["extra.weight"] = torch.zeros(1)
    state["fc.0.weight"] = torch.zeros(7, 7)
    path = tmp_path / "bad.safetensors"
    from safetensors.torch import save_file

    save_file(state, str(path))
    with pytest.raises(InputError) as info:
        load_model(str(path), CONVNET)
    message = info.value.message
    assert info.value.exit_code == 3
    assert "missing keys: out.bias" in message
    assert "unexpected keys: extra.weight" in message
    assert "fc.0.weight: file (7, 7) vs model (128, 1568)" in message


def test_dataparallel_prefix_needs_strip_prefix(tmp_path) -> None:
    path = tmp_path / "dp.pt"
    torch.save({f"module.{k}": v for k, v in _convnet_state().items()}, path)
    with pytest.raises(InputError) as info:
        load_model(str(path), CONVNET)
    assert "--strip-prefix module." in info.value.hint
    loaded = load_model(str(path), LoadOptions(arch="mlops_cli.core.zoo:ConvNet", strip_prefix="module."))
    assert loaded.kind == ModelKind.MODULE


def test_weights_without_arch_is_a_usage_error(tmp_path) -> None:
    path = tmp_path / "w.pt"
    torch.save(_convnet_state(), path)
    with pytest.raises(UsageError, match="architecture") as info:
        load_model(str(path))
    assert "--arch" in info.value.hint


def test_arch_from_a_file_with_kwargs(tmp_path) -> None:
    (tmp_path / "net.py").write_text(
        "import torch\n"
        "def make(width=4):\n"
        "    return torch.nn.Sequential(torch.nn.Linear(3, width), torch.nn.ReLU(), torch.nn.Linear(width, 2))\n")
    state = {"0.weight": torch.ones(6, 3), "0.bias": torch.zeros(6), "2.weight": torch.ones(2, 6),
             "2.bias": torch.zeros(2)}
    torch.save(state, tmp_path / "w.pt")
    options = LoadOptions(arch=f"{tmp_path / 'net.py'}:make", arch_kwargs={"width": 6})
    loaded = load_model(str(tmp_path / "w.pt"), options)
    out = loaded.module(torch.ones(1, 3))
    assert out.tolist() == [[18.0, 18.0]]
    with pytest.raises(UsageError, match=r"--arch-kwargs|calling it"):
        load_model(str(tmp_path / "w.pt"), LoadOptions(arch=f"{tmp_path / 'net.py'}:make", arch_kwargs={"depth": 1}))


def test_checkpoint_saved_on_cuda_loads_on_cpu(tmp_path, monkeypatch) -> None:
    """Storages tagged 'cuda:0' (as written on a GPU box) are mapped to the CPU."""
    import torch.serialization as serialization

    path = tmp_path / "gpu.pt"
    monkeypatch.setattr(serialization, "location_tag", lambda storage: "cuda:0")
    torch.save(_convnet_state(), path)
    monkeypatch.undo()
    with pytest.raises(RuntimeError, match="CUDA"):  # what a plain torch.load does on this machine
        torch.load(path, weights_only=True)
    loaded = load_model(str(path), CONVNET)
    assert loaded.module.out.weight.device.type == "cpu"


def test_sidecar_cannot_name_foreign_code(zoo_dir, tmp_path) -> None:
    folder = tmp_path / "convnet"
    shutil.copytree(zoo_dir / "convnet", folder)
    sidecar = json.loads((folder / "mlops.json").read_text())
    sidecar["arch"] = "os:system"
    (folder / "mlops.json").write_text(json.dumps(sidecar))
    with pytest.raises(UnsafeInputError, match="would run its code"):
        load_model(str(folder))


def test_saved_zoo_models_load_back_identically(zoo_dir) -> None:
    for name in ("tiny-bert", "convnet"):
        saved = load_model(str(zoo_dir / name))
        builtin = load_model(f"builtin:{name}")
        for key, value in _outputs(builtin).items():
            np.testing.assert_allclose(_outputs(saved)[key], value, atol=1e-6)
    weights_only = load_model(str(zoo_dir / "convnet" / "model.safetensors"))  # sidecar found beside it
    assert weights_only.arch == "mlops_cli.core.zoo:ConvNet"


def test_hf_folder_with_wrong_weights_is_exit_3(zoo_dir, tmp_path) -> None:
    folder = tmp_path / "broken"
    shutil.copytree(zoo_dir / "tiny-bert", folder)
    config = json.loads((folder / "config.json").read_text())
    config["hidden_size"] = 64
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError) as info:
        load_model(str(folder))
    assert info.value.exit_code == 3
    assert "do not fit" in info.value.message or "do not match" in info.value.message


def test_hf_folder_without_weights_or_with_lfs_pointer(zoo_dir, tmp_path) -> None:
    folder = tmp_path / "lfs"
    shutil.copytree(zoo_dir / "tiny-bert", folder)
    (folder / "model.safetensors").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 9\n")
    with pytest.raises(InputError, match="Git LFS pointer"):
        load_model(str(folder))
    (folder / "model.safetensors").unlink()
    with pytest.raises(InputError, match="no weights"):
        load_model(str(folder))


def test_unknown_builtin_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="unknown built-in model") as info:
        load_model("builtin:resnet9000")
    assert "tiny-bert" in info.value.hint


@pytest.mark.slow
def test_int8_artefacts_load_back(zoo_dir, tmp_path) -> None:
    """`compress int8` outputs (HF folder with quantization.json, weights folder) are MODEL references too."""
    from mlops_cli.core.contract import ModelRef
    from mlops_cli.services.compress import int8

    for name in ("tiny-bert", "convnet"):
        int8.run(ModelRef.parse(str(zoo_dir / name)), int8.Int8Options(output=tmp_path / name, check=False))
        quantized = load_model(str(tmp_path / name))
        assert any(type(m).__module__.startswith("torch.ao.nn.quantized") for m in quantized.module.modules())
        reference = load_model(str(zoo_dir / name))
        for key, value in _outputs(reference).items():
            np.testing.assert_allclose(_outputs(quantized)[key], value, atol=0.05)
        from mlops_cli.services.inspect import inspect_path

        report = inspect_path(str(tmp_path / name))  # the packed int8 weights are listed, not a crash
        assert "qint8" in {d.dtype for d in report.dtypes}


def _rewrite_zip(source, target, replace):
    """Copy a zip archive, replacing the members for which `replace(name, data)` returns new bytes."""
    import zipfile

    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as new:
        for info in old.infolist():
            data = old.read(info.filename)
            new.writestr(info, replace(info.filename, data) or data)


@pytest.fixture(scope="module")
def program_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("pt2") / "linear.pt2"
    torch.export.save(torch.export.export(torch.nn.Linear(3, 2), (torch.randn(1, 3),)), path)
    return path


def test_pt2_with_pickled_weights_is_refused_without_trust_code(program_file, tmp_path) -> None:
    """torch.export.load unpickles `use_pickle` weights with weights_only=False: that would run code."""
    import io as bytes_io

    marker = tmp_path / "pwned"
    payload = bytes_io.BytesIO()
    torch.save(Evil(str(marker)), payload)

    def poison(name, data):
        if name.endswith("model_weights_config.json"):
            config = json.loads(data)
            first = next(iter(config["config"].values()))
            first["use_pickle"] = True
            return json.dumps(config).encode()
        if "/data/weights/weight_0" in name:
            return payload.getvalue()
        return None

    evil = tmp_path / "evil.pt2"
    _rewrite_zip(program_file, evil, poison)
    with pytest.raises(UnsafeInputError, match="pickled Python object") as info:
        load_model(str(evil))
    assert "--trust-code" in info.value.hint
    assert not marker.exists()


def test_pt2_with_unsafe_sample_inputs_is_refused(program_file, tmp_path) -> None:
    """Sample inputs that a safe load rejects would make torch fall back to weights_only=False."""
    import io as bytes_io

    marker = tmp_path / "pwned"
    payload = bytes_io.BytesIO()
    torch.save(Evil(str(marker)), payload)
    evil = tmp_path / "evil.pt2"
    _rewrite_zip(program_file, evil,
                 lambda name, data: payload.getvalue() if name.endswith("sample_inputs/model.pt") else None)
    with pytest.raises(UnsafeInputError, match="safe load refuses"):
        load_model(str(evil))
    assert not marker.exists()
    assert load_model(str(program_file)).kind == ModelKind.EXPORTED  # a clean archive needs no flag


def test_sidecar_cannot_reach_code_through_mlops_modules(zoo_dir, tmp_path) -> None:
    """`mlops_cli.`-prefixed factories are not enough: only built-in architectures may be named by a file."""
    marker = tmp_path / "pwned"
    folder = tmp_path / "evil"
    shutil.copytree(zoo_dir / "convnet", folder)
    for sidecar in (
        {"arch": "mlops_cli.core.loading:build_architecture",
         "arch_kwargs": {"arch": "subprocess:run", "arch_kwargs": {"args": ["touch", str(marker)]}}},
        {"arch": "mlops_cli.services.prune:rebuild",
         "arch_kwargs": {"arch": "subprocess:run", "arch_kwargs": {"args": ["touch", str(marker)]},
                         "trust_code": True}},
    ):
        (folder / "mlops.json").write_text(json.dumps({"weights": "model.safetensors", **sidecar}))
        with pytest.raises(UnsafeInputError, match="would run its code"):
            load_model(str(folder))
    assert not marker.exists()


def test_exported_archives_carry_their_input_specs(cli, tmp_path) -> None:
    """`export jit/pt2` store the input specs in the archive, so the artefacts run without --input."""
    result = cli("export", "pt2", "builtin:convnet", "-o", tmp_path / "cv.pt2", "--repeats", "0", "--json")
    assert result.exit_code == 0, result.stderr
    loaded = load_model(str(tmp_path / "cv.pt2"))
    assert loaded.input_specs == ("x:float32[batch=2,1,28,28]",)
    assert _outputs(loaded)["output"].shape == (2, 10)


@pytest.mark.parametrize(("sidecar", "message"), [
    ([1], "not a JSON object"),
    ({"arch": "mlops_cli.core.zoo:ConvNet", "arch_kwargs": [1]}, "'arch_kwargs' must be a dict"),
    ({"arch": "mlops_cli.core.zoo:ConvNet", "inputs": "x:float32[2]"}, "'inputs' must be a list"),
    ({"arch": "mlops_cli.core.zoo:ConvNet", "arch_kwargs": {"bogus": 1}}, "calling it with"),
    ({"arch": "mlops_cli.core.zoo:ConvNet", "inputs": ["x:float32[2,1,28"]}, "not of the form"),
])
def test_a_malformed_sidecar_is_an_input_error_naming_the_file(zoo_dir, tmp_path, cli, sidecar, message) -> None:
    folder = tmp_path / "bad"
    shutil.copytree(zoo_dir / "convnet", folder)
    (folder / "mlops.json").write_text(json.dumps(sidecar))
    with pytest.raises(InputError, match=message) as info:
        load_model(str(folder))
    assert "mlops.json" in info.value.message and "Re-save" in info.value.hint
    result = cli("inspect", folder)
    assert result.exit_code in (0, 3) and "internal error" not in result.stderr


def test_hf_folder_with_safetensors_never_opens_its_bin(zoo_dir, tmp_path, monkeypatch) -> None:
    """transformers loads the safetensors when both exist; a hostile `.bin` beside them must neither block the
    folder nor be read (it used to be sniffed, and a code-carrying one stopped the load with exit 4)."""
    import builtins
    import pickle

    from mlops_cli.core.formats import detect_format

    folder = tmp_path / "both"
    shutil.copytree(zoo_dir / "tiny-bert", folder)
    bin_file = folder / "pytorch_model.bin"
    bin_file.write_bytes(pickle.dumps(Evil(str(tmp_path / "pwned")), protocol=2))
    with pytest.raises(UnsafeInputError):
        detect_format(bin_file)  # on its own, the .bin is refused
    opened = []
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda file, *a, **k: opened.append(str(file)) or real_open(file, *a, **k))
    loaded = load_model(str(folder))
    assert str(bin_file) not in opened
    assert any("pytorch_model.bin" in w and "safetensors" in w for w in loaded.warnings)
    assert not (tmp_path / "pwned").exists()
    for key, value in _outputs(load_model("builtin:tiny-bert")).items():
        np.testing.assert_allclose(_outputs(loaded)[key], value, atol=1e-6)


def test_hf_folder_with_only_bin_weights_still_checks_them(zoo_dir, tmp_path) -> None:
    import pickle

    folder = tmp_path / "bin-only"
    shutil.copytree(zoo_dir / "tiny-bert", folder)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(Evil(str(tmp_path / "pwned")), protocol=2))
    with pytest.raises(UnsafeInputError, match=r"io\.open"):
        load_model(str(folder))
