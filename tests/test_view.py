"""`mlops view`: a real Netron server on 127.0.0.1, serving the model and nothing else beside it."""

from __future__ import annotations

import http.client
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mlops_cli.core.contract import LoadOptions, ModelRef
from mlops_cli.services.view import HOST, ViewOptions, open_view, run

ANY_PORT = ViewOptions(port=0)


def fetch(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, b""


def raw_get(port: int, path: str) -> int:
    """GET a path exactly as written (urllib would normalise `..` away)."""
    connection = http.client.HTTPConnection(HOST, port, timeout=10)
    connection.request("GET", path)
    status = connection.getresponse().status
    connection.close()
    return status


def listening_on_loopback_only(port: int) -> bool:
    """From the kernel's socket table: the port listens on 127.0.0.1 and on no other address."""
    table = Path("/proc/net/tcp")
    if not table.exists():
        pytest.skip("no /proc/net/tcp on this system")
    listeners = []
    for line in table.read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, port_hex = local.split(":")
        if state == "0A" and int(port_hex, 16) == port:  # 0A = LISTEN
            listeners.append(address)
    six = Path("/proc/net/tcp6")
    if six.exists():
        for line in six.read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if state == "0A" and int(local.split(":")[1], 16) == port:
                listeners.append(local.split(":")[0])
    return listeners == ["0100007F"]  # 127.0.0.1, little-endian hex


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with an ONNX model + external data, TorchScript and .pt2 files, and private files beside them."""
    import onnx
    import torch
    from onnx import TensorProto, helper, numpy_helper

    from mlops_cli.core import zoo

    folder = tmp_path_factory.mktemp("models")
    weight = numpy_helper.from_array(np.ones((64, 32), np.float32), "weight")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "weight"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 32])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save_model(model, str(folder / "mlp.onnx"), save_as_external_data=True, location="mlp.weights",
                    size_threshold=0)
    convnet, example = zoo.build("convnet")[0], torch.randn(2, 1, 28, 28)
    torch.jit.trace(convnet, example).save(str(folder / "convnet.ts"))
    torch.export.save(torch.export.export(convnet, (example,)), str(folder / "convnet.pt2"))
    (folder / "secret.txt").write_text("credentials\n")
    (folder / "train.py").write_text("print('private code')\n")
    return folder


def test_onnx_with_external_data_is_served_alone_on_loopback(model_folder: Path) -> None:
    with open_view(str(model_folder / "mlp.onnx"), ANY_PORT) as session:
        assert session.host == HOST and session.url == f"http://127.0.0.1:{session.port}/"
        assert session.served_files == ("mlp.onnx", "mlp.weights") and session.source == "onnx"
        assert listening_on_loopback_only(session.port)
        status, page = fetch(session.url)
        assert status == 200 and b'<meta name="file" content="/data/mlp.onnx">' in page
        assert fetch(session.url + "data/mlp.onnx") == (200, (model_folder / "mlp.onnx").read_bytes())
        assert fetch(session.url + "data/mlp.weights") == (200, (model_folder / "mlp.weights").read_bytes())
        for sibling in ("secret.txt", "train.py", "convnet.ts"):
            assert fetch(session.url + f"data/{sibling}")[0] == 404  # beside the model, never served
        assert raw_get(session.port, "/data/../secret.txt") == 404
        assert raw_get(session.port, "/data/%2e%2e/secret.txt") == 404
        assert raw_get(session.port, f"/data/{model_folder}/secret.txt") == 404
        port = session.port
    with pytest.raises(OSError):  # stopped on exit
        socket.create_connection((HOST, port), timeout=2).close()


def test_torchscript_is_served_as_is_without_running_it(model_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import webbrowser

    opened: list[str] = []
    monkeypatch.setattr(webbrowser, "open", lambda url, *a, **k: opened.append(url))
    no_trust = ViewOptions(load=LoadOptions(), port=0)  # no --trust-code
    with open_view(str(model_folder / "convnet.ts"), no_trust) as session:
        assert session.source == "torchscript" and session.model_file == "convnet.pt"  # a name Netron knows
        assert fetch(session.url + "data/convnet.pt") == (200, (model_folder / "convnet.ts").read_bytes())
        folder = Path(session.folder)
        assert sorted(p.name for p in folder.iterdir()) == ["convnet.pt"]
        assert oct(folder.stat().st_mode)[-3:] == "700"  # private to the user
    assert opened == []  # headless unless --browse
    assert not folder.exists()  # deleted on exit


def test_exported_program_is_served_as_is(model_folder: Path) -> None:
    with open_view(str(model_folder / "convnet.pt2"), ANY_PORT) as session:
        assert session.source == "torch.export program" and session.served_files == ("convnet.pt2",)
        assert fetch(session.url + "data/convnet.pt2") == (200, (model_folder / "convnet.pt2").read_bytes())


@pytest.mark.slow
def test_other_references_are_exported_to_a_temporary_onnx() -> None:
    import onnx

    with open_view("builtin:convnet", ANY_PORT) as session:
        assert session.model_file == "convnet.onnx" and session.source.startswith("exported to ONNX")
        status, body = fetch(session.url + "data/convnet.onnx")
        assert status == 200
        graph = onnx.load_from_string(body).graph
        assert [i.name for i in graph.input] == ["x"]
        assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"  # dynamic=True


def test_run_serves_until_time_is_up_and_cleans_up(model_folder: Path) -> None:
    """`run` hands the session over while it serves, and returns once the server stopped and the folder is gone."""
    seen: list[tuple[int, bytes]] = []

    def ready(session: Any) -> None:
        seen.append(fetch(session.url + "data/mlp.onnx"))

    report = run(ModelRef.parse(str(model_folder / "mlp.onnx")), ViewOptions(port=0, serve_seconds=0.2,
                                                                             on_ready=ready))
    assert seen == [(200, (model_folder / "mlp.onnx").read_bytes())]
    assert report.served_files == ("mlp.onnx", "mlp.weights") and report.warnings == ()
    assert not Path(report.folder).exists()
    with pytest.raises(OSError):
        socket.create_connection((HOST, report.port), timeout=2).close()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


def test_command_serves_until_time_is_up(cli: Any, model_folder: Path) -> None:
    port = free_port()
    results: list[Any] = []
    runner = threading.Thread(target=lambda: results.append(cli(
        "view", model_folder / "mlp.onnx", "--port", port, "--serve-seconds", "3", "--json")))
    runner.start()
    status, deadline = 0, time.monotonic() + 30
    while status != 200 and time.monotonic() < deadline:
        time.sleep(0.1)
        try:
            status = fetch(f"http://127.0.0.1:{port}/data/mlp.onnx")[0]
        except OSError:
            status = 0
    assert status == 200
    assert fetch(f"http://127.0.0.1:{port}/data/secret.txt")[0] == 404
    runner.join(timeout=30)
    result = results[0]
    assert result.exit_code == 0, result.output
    data = result.json()
    assert data["url"] == f"http://127.0.0.1:{port}/" and data["served_files"] == ["mlp.onnx", "mlp.weights"]


def test_busy_port_is_a_usage_error(cli: Any, model_folder: Path) -> None:
    with socket.socket() as busy:
        busy.bind((HOST, 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = cli("view", model_folder / "mlp.onnx", "--port", port, "--serve-seconds", "0")
    assert result.exit_code == 2, result.output
    assert "cannot be used" in result.stderr


def test_missing_model_and_bad_port(cli: Any, tmp_path: Path) -> None:
    assert cli("view", tmp_path / "nope.onnx", "--serve-seconds", "0").exit_code == 3
    assert cli("view", "builtin:convnet", "--port", "70000").exit_code == 2
