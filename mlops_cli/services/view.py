"""`mlops view`: open a model in Netron, served on 127.0.0.1 only, headless unless asked to browse.

Netron's server answers `/data/<path>` with any file of the served model's folder. So the model is never
served from where it lives: the file (and an ONNX model's external data) is hard-linked, or copied, into a
private temporary folder, and that folder is served; nothing else beside the model is reachable.

ONNX, TorchScript and torch.export .pt2 files are shown as they are (Netron parses them in the browser: no
model code runs here, so TorchScript needs no --trust-code, and a .pt2 is shown as the program it is rather
than re-exported). Everything else (Hugging Face folders, weights + --arch, builtin:NAME) is exported to a
temporary ONNX file first with `core.onnx_export.write_onnx`.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

from mlops_cli.core.contract import ModelRef, Report, ServiceOptions
from mlops_cli.core.errors import UsageError
from mlops_cli.core.formats import Format, detect_format
from mlops_cli.core.inputs import InputRequest

HOST = "127.0.0.1"
TORCHSCRIPT_SUFFIXES = (".pt", ".pth", ".ptl", ".torchscript")  # names Netron recognises for TorchScript


def _nobody_waits(session: ViewSession) -> None:
    """The default `on_ready`: nobody is told where the server listens."""


@dataclass(frozen=True, kw_only=True)
class ViewOptions(ServiceOptions):
    """`serve_seconds` None serves until Ctrl-C; `on_ready(session)` is called once the server listens, so the
    caller can show the URL while `run` keeps serving."""

    port: int | None = None  # None: 8080 when free, else another free port (Netron's choice); 0: any free port
    browse: bool = False
    inputs: InputRequest = field(default_factory=InputRequest)  # --input specs and --seed for the ONNX export
    opset: int = 20
    serve_seconds: float | None = None
    on_ready: Callable[[ViewSession], None] = field(default=_nobody_waits, compare=False, repr=False)


@dataclass(frozen=True)
class StagedModel:
    """The model file ready to serve, alone in a private folder."""

    folder: Path
    model_file: str  # name inside `folder`
    files: tuple[str, ...]  # every file in `folder` (model + external data): all that can be fetched
    source: str  # "onnx", "torchscript", "torch.export program" or "exported to ONNX (<exporter>)"
    warnings: tuple[str, ...] = ()  # the loader's, when the model was loaded to be exported


@dataclass(frozen=True, kw_only=True)
class ViewSession(Report):
    """Where the model is served: the report of `mlops view` (shown as soon as the server listens)."""

    reference: str
    url: str
    host: str
    port: int
    model_file: str
    served_files: tuple[str, ...]
    source: str
    folder: str  # the private temporary folder being served (deleted on exit)


# ---------------------------------------------------------------- staging


def stage_model(ref: ModelRef, options: ViewOptions, folder: Path) -> StagedModel:
    """Put what Netron needs, and nothing else, into `folder`."""
    path = ref.path
    if path is not None and path.is_file():
        fmt = detect_format(path)
        if fmt == Format.ONNX:
            return _stage_onnx(path, folder)
        if fmt == Format.TORCHSCRIPT:
            name = path.name if path.suffix in TORCHSCRIPT_SUFFIXES else f"{path.stem}.pt"
            _link_or_copy(path, folder / name)
            return StagedModel(folder, name, (name,), "torchscript")
        if fmt == Format.EXPORTED_PROGRAM:  # Netron reads .pt2 archives: show the program itself, not a re-export
            name = path.name if path.suffix == ".pt2" else f"{path.stem}.pt2"
            _link_or_copy(path, folder / name)
            return StagedModel(folder, name, (name,), "torch.export program")
    return _stage_export(ref, options, folder)


def _stage_onnx(path: Path, folder: Path) -> StagedModel:
    from mlops_cli.core.loading import check_onnx_external_data
    from mlops_cli.core.onnx_export import external_data_files

    check_onnx_external_data(path)  # refuses locations that escape the model's folder
    _link_or_copy(path, folder / path.name)
    external = list(external_data_files(path))
    for location in external:
        target = folder / location
        target.parent.mkdir(parents=True, exist_ok=True)
        _link_or_copy(path.parent / location, target)
    return StagedModel(folder, path.name, (path.name, *external), "onnx")


def _stage_export(ref: ModelRef, options: ViewOptions, folder: Path) -> StagedModel:
    from mlops_cli.core.inputs import plan_inputs
    from mlops_cli.core.loading import load_model
    from mlops_cli.core.onnx_export import write_onnx
    from mlops_cli.core.runtimes import gather_on_cpu

    options.on_step("loading the model")
    loaded = load_model(ref, options.load)
    gather_on_cpu(loaded, "viewing (an ONNX export)")
    plan = plan_inputs(loaded, options.inputs)
    name = f"{_model_name(ref)}.onnx"
    options.on_step("exporting to ONNX")
    result = write_onnx(loaded, folder / name, plan.export_example(("batch", "sequence")), dynamic=True,
                        opset=options.opset, exporter="auto", specs=plan.specs)
    files = tuple(sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()))
    return StagedModel(folder, name, files, f"exported to ONNX ({result.exporter_used})", tuple(loaded.warnings))


def _model_name(ref: ModelRef) -> str:
    if ref.path is None:
        return ref.builtin or "model"
    return (ref.path.name if ref.path.is_dir() else ref.path.stem) or "model"


def _link_or_copy(source: Path, target: Path) -> None:
    """A hard link costs nothing for big files; across file systems, copy. Never a symlink (Netron refuses them
    and they would point back into the user's folder)."""
    try:
        os.link(source.resolve(), target)
    except OSError:
        shutil.copyfile(source, target)


# ---------------------------------------------------------------- serving


def serve(folder: Path, model_file: str, port: int | None, browse: bool) -> tuple[str, int]:
    """Start Netron's server thread on 127.0.0.1 for `folder/model_file`; returns (host, port)."""
    import netron

    if port is not None and not 0 <= port <= 65535:
        raise UsageError(f"--port {port} is not a port number (0-65535)")
    root = logging.getLogger()
    guard = logging.NullHandler()
    root.addHandler(guard)  # netron.serve would otherwise call logging.basicConfig and print to stderr
    try:
        host, bound = netron.serve(str(folder / model_file), None, address=(HOST, port), browse=browse)
    except OSError as exc:
        if exc.errno in (errno.EADDRINUSE, errno.EACCES):
            raise UsageError(f"port {port} on {HOST} cannot be used: {exc.strerror}",
                             hint="Choose another --port, or leave it out to get a free one.") from exc
        raise
    finally:
        root.removeHandler(guard)
    return host, int(bound)


def stop(address: tuple[str, int], timeout_s: float = 5.0) -> None:
    """Stop the server and wait for its thread to end: until then its listening socket still accepts."""
    import netron

    netron.stop(address)
    deadline = time.monotonic() + timeout_s
    while netron.status(address) and time.monotonic() < deadline:
        time.sleep(0.02)


def is_serving(session: ViewSession) -> bool:
    import netron

    return bool(netron.status((session.host, session.port)))


def wait(session: ViewSession, seconds: float | None = None) -> None:
    """Block while the server runs: until Ctrl-C or SIGTERM (raised as KeyboardInterrupt, so the caller's
    clean-up runs), or until `seconds` have passed."""
    deadline = None if seconds is None else time.monotonic() + seconds
    with _terminate_as_interrupt():
        while is_serving(session) and (deadline is None or time.monotonic() < deadline):
            time.sleep(0.1)


@contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """`kill`, `timeout` and container stops send SIGTERM: treat it like Ctrl-C so temporary files go too."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run(ref: ModelRef, options: ViewOptions) -> ViewSession:
    """Serve the model until Ctrl-C (the way a server is meant to stop) or `serve_seconds`; the temporary
    folder is gone when this returns. The session is handed to `options.on_ready` while it serves."""
    with open_view(ref, options) as session:
        options.on_ready(session)
        with suppress(KeyboardInterrupt):
            wait(session, options.serve_seconds)
    return session


@contextmanager
def open_view(reference: str | ModelRef, options: ViewOptions) -> Iterator[ViewSession]:
    """Stage the model in a private folder and serve it; on exit stop the server and delete the folder."""
    ref = ModelRef.parse(reference)
    folder = Path(tempfile.mkdtemp(prefix="mlops-view-"))  # mode 0700: private to this user
    try:
        staged = stage_model(ref, options, folder)
        host, port = serve(folder, staged.model_file, options.port, options.browse)
        try:
            yield ViewSession(reference=str(ref), url=f"http://{host}:{port}/", host=host, port=port,
                              model_file=staged.model_file, served_files=staged.files, source=staged.source,
                              folder=str(folder), warnings=staged.warnings)
        finally:
            stop((host, port))
    finally:
        shutil.rmtree(folder, ignore_errors=True)

