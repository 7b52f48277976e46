"""Formats are detected by content; unusable files fail with exit 3 and a plain message."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from mlops_cli.core.errors import InputError
from mlops_cli.core.formats import Format, detect_format, load_tensor_file, read_safetensors_header


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """One file of each kind, all with misleading extensions (detection must not look at them)."""
    import onnx
    import torch
    from onnx import TensorProto, helper
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("formats")
    layer = torch.nn.Linear(3, 2)
    save_file(layer.state_dict(), str(root / "weights.bin"))
    torch.save(layer.state_dict(), root / "zip.safetensors")
    torch.save(layer.state_dict(), root / "legacy.onnx", _use_new_zipfile_serialization=False)
    torch.jit.save(torch.jit.script(layer), root / "script.pt")
    torch.export.save(torch.export.export(layer, (torch.randn(1, 3),)), root / "program.pt")
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])])
    onnx.save(helper.make_model(graph), root / "model.pt")
    np.savez(root / "inputs.npz", x=np.zeros((2, 3), np.float32))
    return root


@pytest.mark.parametrize(("name", "expected"), [
    ("weights.bin", Format.SAFETENSORS), ("zip.safetensors", Format.TORCH_ZIP), ("legacy.onnx", Format.TORCH_LEGACY),
    ("script.pt", Format.TORCHSCRIPT), ("program.pt", Format.EXPORTED_PROGRAM), ("model.pt", Format.ONNX),
    ("inputs.npz", Format.NPZ),
])
def test_detect_by_content(files, name, expected) -> None:
    assert detect_format(files / name) == expected


def test_weights_load_from_every_weight_format(files) -> None:
    for name in ("weights.bin", "zip.safetensors", "legacy.onnx"):
        state = load_tensor_file(files / name)
        assert sorted(state) == ["bias", "weight"]


@pytest.mark.parametrize(("content", "message"), [
    (b"", "empty"),
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n", "Git LFS pointer"),
    (b"PK\x03\x04garbage-that-is-not-a-zip", "corrupt or truncated zip"),
    (b"hello, I am a text file" * 3, "not a format mlops understands"),
])
def test_unusable_files_exit_3(tmp_path, content, message) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    with pytest.raises(InputError, match=message) as info:
        detect_format(path)
    assert info.value.exit_code == 3


def test_missing_path(tmp_path) -> None:
    with pytest.raises(InputError, match="no such file"):
        detect_format(tmp_path / "absent.pt")


def test_truncated_safetensors_is_caught_before_allocating(files, tmp_path) -> None:
    data = (files / "weights.bin").read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[:-4])
    with pytest.raises(InputError, match="data section has 28 bytes"):
        load_tensor_file(truncated)


def test_huge_declared_tensor_in_tiny_file_is_refused(tmp_path) -> None:
    header = json.dumps({"w": {"dtype": "F32", "shape": [100000, 100000], "data_offsets": [0, 40_000_000_000]}})
    path = tmp_path / "bomb.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header.encode() + b"\0" * 16)
    with pytest.raises(InputError, match="declares 40000000000 bytes"):
        read_safetensors_header(path)


def test_truncated_torch_zip_is_input_error(files, tmp_path) -> None:
    data = (files / "zip.safetensors").read_bytes()
    path = tmp_path / "cut.pt"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError) as info:
        load_tensor_file(path)
    assert info.value.exit_code == 3


# ---------------------------------------------------------------- the one safetensors reader and writer


def test_writer_round_trips_every_dtype_in_the_librarys_layout(tmp_path) -> None:
    """Same bytes as safetensors' save_file (one metadata key: no hash order involved), readable by it."""
    import torch
    from safetensors.torch import load_file, save_file

    from mlops_cli.core.safetensors_file import DTYPES, save_safetensors

    tensors = {f"t_{name}": torch.arange(6).reshape(2, 3).to(getattr(torch, dtype.torch))
               for name, dtype in DTYPES.items()}
    tensors |= {"scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4), "strided": torch.ones(4, 4)[:, 1]}
    save_safetensors(tensors, tmp_path / "ours.safetensors", metadata={"format": "pt"})
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "lib.safetensors"),
              metadata={"format": "pt"})
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "lib.safetensors").read_bytes()
    loaded = load_file(str(tmp_path / "ours.safetensors"))
    assert all(torch.equal(loaded[k].view(torch.uint8), v.contiguous().view(torch.uint8)) if v.dim()
               else loaded[k].item() == v.item() for k, v in tensors.items())
    tensors_read, metadata = read_safetensors_header(tmp_path / "ours.safetensors")
    assert metadata == {"format": "pt"} and tensors_read["t_BF16"] == {"dtype": "BF16", "shape": [2, 3], "nbytes": 12}


def test_formats_keep_their_names_for_the_one_table() -> None:
    from mlops_cli.core import formats, io, safetensors_file

    assert formats.SAFETENSORS_DTYPES["BF16"] == 2 and safetensors_file.TO_TORCH["F8_E4M3"] == "float8_e4m3fn"
    assert io.save_safetensors is safetensors_file.save_safetensors
    assert formats.read_safetensors_header is safetensors_file.read_safetensors_header


# ---------------------------------------------------------------- hostile safetensors headers


def _safetensors_bytes(header: str | bytes, data: bytes) -> bytes:
    raw = header.encode() if isinstance(header, str) else header
    return struct.pack("<Q", len(raw)) + raw + data


_F32 = '"dtype":"F32","shape":[1]'


@pytest.mark.parametrize(("header", "data", "message"), [
    # the safetensors library keeps the last "w"; a reader keeping the first sees other bytes
    (f'{{"w":{{{_F32},"data_offsets":[0,4]}},"w":{{{_F32},"data_offsets":[4,8]}}}}', 8, r"repeats 'w'"),
    (f'{{"w":{{{_F32},"dtype":"I32","data_offsets":[0,4]}}}}', 4, r"repeats 'dtype'"),
    ('{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],'
     '"data_offsets":[4,12]}}', 12, r"'a' and 'b' overlap at bytes \[4, 8\)"),
    (f'{{"a":{{{_F32},"data_offsets":[0,4]}},"b":{{{_F32},"data_offsets":[0,4]}}}}', 4, r"'a' and 'b' overlap"),
    (f'{{"a":{{{_F32},"data_offsets":[0,4]}},"b":{{{_F32},"data_offsets":[8,12]}}}}', 12,
     r"bytes \[4, 8\) .* before tensor 'b', belong to no tensor"),
    (f'{{"a":{{{_F32},"data_offsets":[4,8]}}}}', 8, r"bytes \[0, 4\) .* before tensor 'a'"),
    (f'{{"a":{{{_F32},"data_offsets":[0,4]}}}}', 12, r"8 bytes after the last tensor \('a'\)"),
    ('{"a":{"dtype":"F32","shape":[0],"data_offsets":[4,0]}}', 4, r"'a' has reversed data offsets \[4, 0\)"),
    (f'{{"a":{{{_F32},"data_offsets":[0.0,4]}}}}', 4, "malformed header entry"),
    ('{"a":{"dtype":"F32","shape":[true],"data_offsets":[0,4]}}', 4, "malformed header entry"),
    ('{"a":{"dtype":"F32","shape":[NaN],"data_offsets":[0,4]}}', 4, "corrupt safetensors header"),
    (f'{{"__metadata__":{{"n":1}},"a":{{{_F32},"data_offsets":[0,4]}}}}', 4, "must map names to strings"),
    (f'{{"a":{{{_F32},"data_offsets":[0,4]}}}}'.encode("utf-16-le"), 4, "corrupt safetensors header"),
], ids=["duplicate-tensor", "duplicate-field", "overlap", "same-range", "gap", "leading-gap", "trailing-bytes",
        "reversed-offsets", "float-offset", "bool-dim", "nan", "metadata-not-string", "utf16-header"])
def test_hostile_safetensors_headers_are_refused(tmp_path, cli, header, data, message) -> None:
    """Files that readers could disagree on (or that the safetensors library refuses) never load: exit 3."""
    path = tmp_path / "hostile.safetensors"
    path.write_bytes(_safetensors_bytes(header, b"\0" * data))
    with pytest.raises(InputError, match=message):
        read_safetensors_header(path)
    with pytest.raises(InputError, match=message):
        load_tensor_file(path, Format.SAFETENSORS)
    result = cli("inspect", path)
    assert result.exit_code == 3 and "Traceback" not in result.stderr


def test_well_formed_header_written_by_hand_is_read(tmp_path) -> None:
    """Header order need not follow data order (mlops' older files sorted their keys), only the tiling counts."""
    path = tmp_path / "ok.safetensors"
    header = (f'{{"__metadata__":{{"format":"pt"}},"b":{{{_F32},"data_offsets":[4,8]}},'
              f'"a":{{{_F32},"data_offsets":[0,4]}},"e":{{"dtype":"F32","shape":[0],"data_offsets":[8,8]}}}}    ')
    path.write_bytes(_safetensors_bytes(header, struct.pack("<ff", 1.0, 2.0)))
    tensors, metadata = read_safetensors_header(path)
    assert list(tensors) == ["b", "a", "e"] and metadata == {"format": "pt"}
    state = load_tensor_file(path)
    assert state["a"].item() == 1.0 and state["b"].item() == 2.0


# ---------------------------------------------------------------- plain pickles


class _RunsShell:
    """Unpickling this would run a shell command (creating `marker`)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


class _RemovesFile:
    def __reduce__(self):
        import os

        return (os.remove, ("/nonexistent",))


@pytest.mark.parametrize("protocol", range(6))
def test_plain_pickle_with_code_is_unsafe_and_never_run(tmp_path, cli, protocol) -> None:
    """Not a torch checkpoint (no zip, no legacy magic): named globals, exit 4, like a torch zip with code."""
    import os
    import pickle

    from mlops_cli.core.errors import UnsafeInputError

    marker = tmp_path / "pwned"
    path = tmp_path / "model.bin"
    path.write_bytes(pickle.dumps({"w": [1.0], "run": _RunsShell(str(marker)), "rm": _RemovesFile()}, protocol))
    expected = [f"{os.system.__module__}.system", f"{os.remove.__module__}.remove"]
    with pytest.raises(UnsafeInputError) as info:
        detect_format(path)
    assert all(name in info.value.message for name in expected), info.value.message
    assert "never unpickles" in info.value.hint
    result = cli("inspect", path)
    assert result.exit_code == 4 and "system" in result.stderr
    assert not marker.exists()


def test_plain_pickle_without_code_is_input_error(tmp_path) -> None:
    import pickle

    path = tmp_path / "weights.pkl"
    path.write_bytes(pickle.dumps({"w": [1.0, 2.0], "name": "net"}, protocol=2))
    with pytest.raises(InputError, match="plain Python pickle") as info:
        detect_format(path)
    assert info.value.exit_code == 3


def test_other_binary_files_are_not_taken_for_pickles(tmp_path) -> None:
    """A .npy file opens with STACK_GLOBAL's byte; it is unknown content (exit 3), not an unsafe pickle."""
    path = tmp_path / "array.npy"
    np.save(path, np.arange(4096, dtype=np.float32).reshape(64, 64))
    with pytest.raises(InputError, match="not a format mlops understands") as info:
        detect_format(path)
    assert info.value.exit_code == 3


def test_pickle_scan_skips_big_payloads(tmp_path) -> None:
    """A 4 MiB payload is sought over, not read; a pickle cut before its STOP is not a pickle. (Module names that
    protocols 4-5 fetch from the memo are followed: `posix` twice in the test above.)"""
    import pickle

    from mlops_cli.core.formats import pickle_globals

    path = tmp_path / "big.pkl"
    path.write_bytes(pickle.dumps([b"\0" * (4 << 20), _RemovesFile(), _RemovesFile()], protocol=4))
    assert pickle_globals(path) == [f"{__import__('os').remove.__module__}.remove"]
    path.write_bytes(pickle.dumps(b"\0" * (4 << 20), protocol=4)[:-1])  # truncated: no STOP
    assert pickle_globals(path) is None
