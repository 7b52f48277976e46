"""Safe output writing: atomic, no silent overwrite, never through a symlink, never over an input.

Files are written to a temporary sibling, fsynced and renamed into place, so a crash or Ctrl-C never
leaves a half-written output. Folders are built aside and renamed the same way. Missing parent folders are
created (and removed again if the write fails). A run killed outright (SIGKILL, power loss) cannot clean up its
temporary sibling: the next run writing the same output removes it, once the process that made it is gone.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from mlops_cli.core.errors import OutputError
from mlops_cli.core.safetensors_file import save_safetensors as save_safetensors  # the one writer, re-exported

_STARTED = time.time()  # imported before any output is written: temporaries older than this are not ours
_TEMP_TAG = "mlops"  # temporaries are named .NAME.mlops-PID-XXXXXXXX.tmp


def cache_dir() -> Path:
    """Where mlops caches what it can rebuild: $MLOPS_CACHE_DIR, else $XDG_CACHE_HOME/mlops, else ~/.cache/mlops."""
    if os.environ.get("MLOPS_CACHE_DIR"):
        return Path(os.environ["MLOPS_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mlops"


def default_mode(directory: bool = False) -> int:
    """Permissions an ordinary file/folder would get under the current umask (0644/0755 under 022)."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def check_output(path: str | Path, force: bool, inputs: Iterable[str | Path] = ()) -> Path:
    """Validate an output path before any work is done, so bad outputs fail fast (exit 5)."""
    target = Path(os.path.abspath(path))  # "." and "out/.." get a real name; symlinks are not followed
    if target.is_symlink():
        raise OutputError(f"refusing to write through a symbolic link: {target}",
                          hint="Give the real path as the output.")
    resolved = target.resolve()
    for source in inputs:
        source_path = Path(source).resolve()
        if resolved == source_path or source_path in resolved.parents or resolved in source_path.parents:
            raise OutputError(f"output {target} would overwrite the input {source}",
                              hint="Write the output to another path.")
    if target.exists() and not force:
        raise OutputError(f"output already exists: {target}", hint="Pass --force to overwrite it.")
    protected = {Path.cwd().resolve(), Path.home().resolve(), *Path.cwd().resolve().parents}
    if target.is_dir() and resolved in protected:
        raise OutputError(f"refusing to replace {target}: it is the current folder, one of its parents or home",
                          hint="Give a new folder (or file) as the output.")
    existing = _nearest_existing(target.parent)
    if not existing.is_dir():
        where = f"cannot write {target.name} in {existing}" if existing == target.parent else \
            f"cannot create the folder {target.parent}"
        raise OutputError(f"{where}: {existing} is a file, not a folder",
                          hint="Choose another output path, or move that file away.")
    if not os.access(existing, os.W_OK):
        raise OutputError(f"cannot write in {existing}: permission denied")
    return target


def _nearest_existing(folder: Path) -> Path:
    """`folder` or its closest ancestor that exists (a dangling symbolic link counts as existing)."""
    while not (folder.exists() or folder.is_symlink()) and folder != folder.parent:
        folder = folder.parent
    return folder


def _make_parents(folder: Path) -> list[Path]:
    """Create `folder` and its missing ancestors; returns those created, outermost first."""
    missing = []
    while not (folder.exists() or folder.is_symlink()):
        missing.append(folder)
        folder = folder.parent
    created = []
    for path in reversed(missing):
        try:
            path.mkdir()
        except FileExistsError:
            if not path.is_dir():
                raise OutputError(f"cannot create the folder {path}: something else appeared there") from None
            continue
        created.append(path)
    return created


@contextlib.contextmanager
def _output_parent(target: Path) -> Iterator[None]:
    """The output's folder, created if missing (and removed again if the write fails), without stale temporaries."""
    created = _make_parents(target.parent)
    try:
        remove_stale_temporaries(target)
        yield
    except BaseException:
        for folder in reversed(created):
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    for folder in created:
        _fsync_dir(folder.parent)


def _temp_prefix(target: Path) -> str:
    return f".{target.name}.{_TEMP_TAG}-{os.getpid()}-"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but is not ours (EPERM), or cannot tell: keep its files
        return True
    return True


def remove_stale_temporaries(target: Path) -> list[Path]:
    """Remove the temporaries that killed runs left beside `target` (its own `.NAME.mlops-PID-*.tmp` only).

    A temporary is stale when the process named in it is gone and it is older than this process, so another
    live run's work in progress (same output, another PID) is never touched. Returns what was removed.
    """
    pattern = re.compile(rf"\.{re.escape(target.name)}\.{_TEMP_TAG}-(\d+)-[a-z0-9_]{{8}}\.tmp")
    removed = []
    with contextlib.suppress(OSError), os.scandir(target.parent) as entries:
        for entry in entries:
            match = pattern.fullmatch(entry.name)
            if not match or int(match[1]) <= 0 or _process_alive(int(match[1])):
                continue
            with contextlib.suppress(OSError):
                if entry.stat(follow_symlinks=False).st_mtime >= _STARTED:
                    continue
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path)
                else:
                    os.unlink(entry.path)
                removed.append(Path(entry.path))
    return removed


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | Path, force: bool = False, inputs: Iterable[str | Path] = ()) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success fsync it and rename it over `path`.

    A folder at `path` is never replaced by a file (not even with --force): that would delete its contents.
    """
    target = check_output(path, force, inputs)
    if target.is_dir():
        raise OutputError(f"{target} is a folder; this output is a single file",
                          hint="Give a file path, e.g. inside that folder.")
    with _output_parent(target):
        fd, temp_name = tempfile.mkstemp(prefix=_temp_prefix(target), suffix=".tmp", dir=target.parent)
        os.close(fd)
        temp = Path(temp_name)
        try:
            yield temp
            with open(temp, "rb+") as handle:
                os.fsync(handle.fileno())
            os.chmod(temp, default_mode())
            os.replace(temp, target)
            _fsync_dir(target.parent)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise


def write_bytes(path: str | Path, data: bytes, force: bool = False,
                inputs: Iterable[str | Path] = ()) -> Path:
    """Atomically write `data` to `path`."""
    with atomic_file(path, force, inputs) as temp:
        temp.write_bytes(data)
    return Path(path)


@contextlib.contextmanager
def atomic_dir(path: str | Path, force: bool = False, inputs: Iterable[str | Path] = ()) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path`; on success move it into place as `path`."""
    target = check_output(path, force, inputs)
    with _output_parent(target):
        temp = Path(tempfile.mkdtemp(prefix=_temp_prefix(target), suffix=".tmp", dir=target.parent))
        try:
            yield temp
            _commit_dir(temp, target)
        except BaseException:
            shutil.rmtree(temp, ignore_errors=True)
            raise


def scratch_dir_beside(path: str | Path) -> Path:
    """A new private folder beside the output `path` (same file system: its files can be renamed into place),
    for a service that builds its output in several steps. Missing parent folders are created; the caller
    removes the folder. It is named like atomic_dir's temporaries, so a killed run's one is cleaned up later."""
    target = Path(os.path.abspath(path))
    _make_parents(target.parent)
    remove_stale_temporaries(target)
    return Path(tempfile.mkdtemp(prefix=_temp_prefix(target), suffix=".tmp", dir=target.parent))


def _commit_dir(temp: Path, target: Path) -> None:
    """fsync a finished temporary folder and rename it into place, replacing what was there."""
    for file in temp.rglob("*"):
        os.chmod(file, default_mode(directory=file.is_dir()))
        if file.is_file():
            with open(file, "rb+") as handle:
                os.fsync(handle.fileno())
    os.chmod(temp, default_mode(directory=True))
    if target.exists() or target.is_symlink():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        os.replace(temp, target)
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
    else:
        os.replace(temp, target)
    _fsync_dir(target.parent)


def copy_extras(source: Path, folder: Path, rewritten: tuple[str, ...]) -> None:
    """Everything beside a model's weights travels with them into a folder being written: tokenizer files,
    READMEs, sentence-transformers modules (`1_Pooling/`, `modules.json`, ...). Weight files and the files named
    in `rewritten` are written anew by the caller."""
    from mlops_cli.core.formats import is_weight_file

    for item in sorted(source.iterdir()):
        if item.is_dir():
            shutil.copytree(item, folder / item.name)
        elif item.name not in rewritten and not is_weight_file(item.name):
            shutil.copy2(item, folder / item.name)


# ---------------------------------------------------------------- checkpoint writers

_SERIALIZATION_ID = ".data/serialization_id"


def save_torch(obj: object, path: str | Path, force: bool = False, inputs: Iterable[str | Path] = ()) -> Path:
    """`torch.save` atomically and reproducibly: identical objects give byte-identical files.

    torch writes a random `serialization_id` record and names the archive after the file; we write
    through a file handle (archive name `archive`) and replace the id with a digest of the other records.
    """
    import torch

    with atomic_file(path, force, inputs) as temp:
        with open(temp, "wb") as handle:
            torch.save(obj, handle)
        make_torch_zip_deterministic(temp)
    return Path(path)


def make_torch_zip_deterministic(path: Path) -> None:
    """Rewrite a torch zip's serialization_id in place with a digest of its other records' CRCs."""
    import hashlib
    import struct
    import zipfile
    import zlib

    with zipfile.ZipFile(path) as archive:
        infos = archive.infolist()
    target = next((i for i in infos if i.filename.endswith(_SERIALIZATION_ID)), None)
    if target is None or target.compress_type != zipfile.ZIP_STORED or target.header_offset >= 0xFFFFFFFF:
        return
    digest = hashlib.sha256()
    for info in infos:
        if info is not target:
            digest.update(f"{info.filename}:{info.CRC}:{info.file_size};".encode())
    new_id = str(int.from_bytes(digest.digest(), "big")).encode()[: target.file_size].zfill(target.file_size)
    crc = zlib.crc32(new_id)
    with open(path, "r+b") as handle:
        handle.seek(target.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", handle.read(4))
        handle.seek(target.header_offset + 14)
        handle.write(struct.pack("<I", crc))
        handle.seek(target.header_offset + 30 + name_len + extra_len)
        handle.write(new_id)
        _patch_central_directory_crc(handle, target.filename, crc)


def _patch_central_directory_crc(handle: object, filename: str, crc: int) -> None:
    import struct

    fh: Any = handle
    fh.seek(0, os.SEEK_END)
    size = fh.tell()
    fh.seek(max(0, size - 65_557))
    tail = fh.read()
    end = tail.rfind(b"PK\x05\x06")
    if end < 0:
        return
    directory_size, directory_offset = struct.unpack_from("<II", tail, end + 12)
    fh.seek(directory_offset)
    directory = fh.read(directory_size)
    position = 0
    while position + 46 <= len(directory) and directory[position:position + 4] == b"PK\x01\x02":
        name_len, extra_len, comment_len = struct.unpack_from("<HHH", directory, position + 28)
        name = directory[position + 46: position + 46 + name_len].decode("utf-8", "replace")
        if name == filename:
            fh.seek(directory_offset + position + 16)
            fh.write(struct.pack("<I", crc))
            return
        position += 46 + name_len + extra_len + comment_len
