"""Safe output writing: atomic, no silent overwrite, never through a symlink, never over an input.

Files are written to a temporary sibling, fsynced and renamed into place, so a crash or Ctrl-C never
leaves a half-written output. Folders are built aside and renamed the same way.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from mlops_cli.core.errors import OutputError


def _default_mode(directory: bool = False) -> int:
    """Permissions an ordinary file/folder would get under the current umask (0644/0755 under 022)."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def check_output(path: str | Path, force: bool, inputs: Iterable[str | Path] = ()) -> Path:
    """Validate an output path before any work is done, so bad outputs fail fast (exit 5)."""
    target = Path(path)
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
    if not target.parent.exists():
        raise OutputError(f"output folder does not exist: {target.parent}",
                          hint="Create the folder first or choose another output path.")
    if not os.access(target.parent, os.W_OK):
        raise OutputError(f"cannot write in {target.parent}: permission denied")
    return target


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | Path, force: bool = False, inputs: Iterable[str | Path] = ()) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success fsync it and rename it over `path`."""
    target = check_output(path, force, inputs)
    fd, temp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    temp = Path(temp_name)
    try:
        yield temp
        with open(temp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(temp, _default_mode())
        if target.is_dir():
            shutil.rmtree(target)
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
    temp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield temp
        for file in temp.rglob("*"):
            os.chmod(file, _default_mode(directory=file.is_dir()))
            if file.is_file():
                with open(file, "rb+") as handle:
                    os.fsync(handle.fileno())
        os.chmod(temp, _default_mode(directory=True))
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
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
