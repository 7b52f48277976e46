"""Output writing: atomic, no silent overwrite, no symlinks, never over the input, reproducible bytes."""

from __future__ import annotations

import hashlib
import os
import stat

import pytest

from mlops_cli.core import io
from mlops_cli.core.errors import OutputError


def test_write_bytes_is_atomic_and_readable_by_others(tmp_path) -> None:
    target = tmp_path / "out.bin"
    old_umask = os.umask(0o022)
    try:
        io.write_bytes(target, b"hello")
    finally:
        os.umask(old_umask)
    assert target.read_bytes() == b"hello"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_existing_output_needs_force(tmp_path) -> None:
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(OutputError, match="already exists") as info:
        io.write_bytes(target, b"new")
    assert info.value.exit_code == 5 and "--force" in info.value.hint
    assert target.read_bytes() == b"old"
    io.write_bytes(target, b"new", force=True)
    assert target.read_bytes() == b"new"


def test_never_writes_through_a_symlink(tmp_path) -> None:
    real = tmp_path / "real.bin"
    real.write_bytes(b"keep")
    link = tmp_path / "link.bin"
    link.symlink_to(real)
    with pytest.raises(OutputError, match="symbolic link"):
        io.write_bytes(link, b"x", force=True)
    assert real.read_bytes() == b"keep"


def test_never_overwrites_its_input(tmp_path) -> None:
    source = tmp_path / "model.safetensors"
    source.write_bytes(b"weights")
    with pytest.raises(OutputError, match="overwrite the input"):
        io.write_bytes(source, b"x", force=True, inputs=[source])
    folder = tmp_path / "hf"
    folder.mkdir()
    with pytest.raises(OutputError, match="overwrite the input"):
        io.check_output(folder, force=True, inputs=[folder / "model.safetensors"])


def test_interrupted_write_leaves_nothing_behind(tmp_path) -> None:
    target = tmp_path / "out.bin"
    with pytest.raises(KeyboardInterrupt), io.atomic_file(target) as temp:
        temp.write_bytes(b"half")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError), io.atomic_dir(tmp_path / "folder") as temp_dir:
        (temp_dir / "a.txt").write_text("half")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_replaces_with_force(tmp_path) -> None:
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "stale.txt").write_text("old")
    old_umask = os.umask(0o022)
    try:
        with io.atomic_dir(folder, force=True) as temp:
            (temp / "new.txt").write_text("new")
    finally:
        os.umask(old_umask)
    assert sorted(p.name for p in folder.iterdir()) == ["new.txt"]
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755
    assert stat.S_IMODE((folder / "new.txt").stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # the old copy is gone


def test_missing_output_folders_are_created(tmp_path) -> None:
    """`-o new/folder/model.onnx` used to stop with exit 5 ("create the folder first")."""
    io.write_bytes(tmp_path / "new" / "folder" / "out.bin", b"x")
    assert (tmp_path / "new" / "folder" / "out.bin").read_bytes() == b"x"
    with io.atomic_dir(tmp_path / "other" / "model") as temp:
        (temp / "a.txt").write_text("a")
    assert (tmp_path / "other" / "model" / "a.txt").read_text() == "a"
    assert [p.name for p in (tmp_path / "new" / "folder").iterdir()] == ["out.bin"]


def test_a_failed_write_removes_the_folders_it_created(tmp_path) -> None:
    (tmp_path / "kept").mkdir()
    with pytest.raises(RuntimeError), io.atomic_file(tmp_path / "kept" / "a" / "b" / "out.bin") as temp:
        temp.write_bytes(b"half")
        raise RuntimeError("boom")
    assert [p.name for p in tmp_path.iterdir()] == ["kept"] and not any((tmp_path / "kept").iterdir())


def test_a_parent_that_is_a_file_is_exit_5(tmp_path) -> None:
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(OutputError, match=r"cannot create the folder .*: .*notes\.txt is a file") as info:
        io.write_bytes(tmp_path / "notes.txt" / "sub" / "out.bin", b"x")
    assert info.value.exit_code == 5 and (tmp_path / "notes.txt").read_text() == "keep me"
    with pytest.raises(OutputError, match=r"cannot write out\.bin in .*notes\.txt: .* is a file, not a folder"):
        io.write_bytes(tmp_path / "notes.txt" / "out.bin", b"x")


def _dead_pid() -> int:
    import subprocess
    import sys

    process = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, check=True)
    return int(process.stdout)


def test_temporaries_of_killed_runs_are_removed_by_the_next_write(tmp_path) -> None:
    """Only the output's own temporaries, only when their process is gone and they predate this process."""
    dead, alive = _dead_pid(), os.getpid()
    past = io._STARTED - 60
    stale_file = tmp_path / f".out.bin.mlops-{dead}-abc_1234.tmp"
    stale_dir = tmp_path / f".out.bin.mlops-{dead}-zzzzzzzz.tmp"
    kept = [tmp_path / f".out.bin.mlops-{alive}-abcdefgh.tmp",  # a live run's work in progress
            tmp_path / f".other.bin.mlops-{dead}-abcdefgh.tmp",  # another output's
            tmp_path / f".out.bin.mlops-{dead}-abcdefgh.tmp.keep",  # not a temporary name
            tmp_path / f".out.bin.mlops-{dead}-newer000.tmp"]  # newer than this process: not provably stale
    stale_dir.mkdir()
    (stale_dir / "weights.bin").write_bytes(b"half")
    for path in (stale_file, *kept):
        path.write_bytes(b"half")
    for path in (stale_file, stale_dir, *kept[:-1]):
        os.utime(path, (past, past))
    io.write_bytes(tmp_path / "out.bin", b"new")
    assert not stale_file.exists() and not stale_dir.exists()
    assert all(path.exists() for path in kept)
    with io.atomic_dir(tmp_path / "other.bin", force=False):
        pass
    assert not kept[1].exists()


def test_save_torch_is_byte_identical_and_loads(tmp_path) -> None:
    import torch

    torch.manual_seed(0)
    checkpoint = {"net": torch.nn.Linear(8, 4).state_dict(), "epoch": 3}
    digests = []
    for name in ("a.pt", "b.pt"):
        io.save_torch(checkpoint, tmp_path / name)
        digests.append(hashlib.sha256((tmp_path / name).read_bytes()).hexdigest())
    assert digests[0] == digests[1]
    loaded = torch.load(tmp_path / "a.pt", weights_only=True)
    assert loaded["epoch"] == 3 and torch.equal(loaded["net"]["weight"], checkpoint["net"]["weight"])


def test_save_safetensors_is_byte_identical(tmp_path) -> None:
    import torch

    tensors = {"w": torch.arange(6.0).reshape(2, 3), "ids": torch.arange(4)}
    io.save_safetensors(tensors, tmp_path / "a.safetensors", metadata={"format": "pt"})
    io.save_safetensors(tensors, tmp_path / "b.safetensors", metadata={"format": "pt"})
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def test_save_safetensors_with_several_metadata_keys_is_byte_identical(tmp_path) -> None:
    """safetensors writes metadata in hash order; the header is canonicalised so saves are reproducible (also with
    non-ASCII names, whose escaped canonical header used to be too long to replace the original)."""
    import subprocess
    import sys

    code = ("import torch, sys; from mlops_cli.core import io; "
            "io.save_safetensors({'w': torch.ones(3), 'b': torch.zeros(2), 'poids_\u00e9t\u00e9': torch.ones(1)}, "
            "sys.argv[1], "
            "metadata={f'key{i}': str(i) for i in range(8)})")
    for name in ("a.safetensors", "b.safetensors"):  # separate processes: separate hash seeds
        subprocess.run([sys.executable, "-c", code, str(tmp_path / name)], check=True,
                       env={"PYTHONHASHSEED": "random", "PATH": ""})
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    from safetensors.torch import load_file

    assert load_file(str(tmp_path / "a.safetensors"))["w"].tolist() == [1.0, 1.0, 1.0]


def test_a_folder_is_never_replaced_by_a_file_even_with_force(tmp_path) -> None:
    """`-o precious --force` on a folder used to delete the folder's contents."""
    folder = tmp_path / "precious"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    with pytest.raises(OutputError, match="is a folder") as info:
        io.write_bytes(folder, b"model", force=True)
    assert info.value.exit_code == 5
    assert (folder / "notes.txt").read_text() == "keep me"


def test_current_folder_and_its_parents_are_never_replaced(tmp_path, monkeypatch) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (work / "data.txt").write_text("keep me")
    monkeypatch.chdir(work)
    for target in (".", "..", str(work)):
        with pytest.raises(OutputError, match="current folder"), io.atomic_dir(target, force=True):
            pass
    assert (work / "data.txt").read_text() == "keep me"


def test_export_onnx_into_a_new_folder(tmp_path, cli) -> None:
    """Issue #13.9: the ONNX exporter stopped with exit 5 where the other exporters created the folder."""
    out = tmp_path / "new" / "folder" / "model.onnx"
    result = cli("export", "onnx", "builtin:lenet", "-o", out, "--exporter", "legacy", "--no-verify")
    assert result.exit_code == 0, result.stderr
    assert out.is_file() and [p.name for p in out.parent.iterdir()] == ["model.onnx"]
