"""`mlops bench`: runtime rows, interleaved speed-ups with intervals, trust warnings, OOM early stop, plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from mlops_cli.core.contract import LoadOptions, ModelRef
from mlops_cli.services import bench
from mlops_cli.services.bench import BenchOptions, BenchReport, candidates, run
from mlops_cli.services.bench.sweep import DIFFERS, OUT_OF_MEMORY, TIMED

FAST = {"repeats": 3, "warmup": 1, "threads": 1}


def bench_run(model: str, **options: Any) -> BenchReport:
    return run(ModelRef.parse(model), BenchOptions(**{**FAST, **options}))


def rows_of(report: BenchReport, label: str) -> list[Any]:
    return [row for row in report.rows if row.label == label]


@pytest.fixture(scope="module")
def convnet_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mlops_cli.services.bench.exports import export_artefact

    folder = tmp_path_factory.mktemp("bench-onnx")
    exported = export_artefact("onnxruntime", ModelRef.parse("builtin:convnet"), LoadOptions(), (), "cpu",
                               folder)
    assert exported.passed
    return exported.path


def test_text_model_eager_and_onnxruntime_rows() -> None:
    report = bench_run("builtin:tiny-bert", runtimes=("eager", "onnxruntime"), batches=(2, 1), seq_lens=(8,),
                       dtypes=("fp32", "int8"))
    eager, ort = rows_of(report, "eager fp32"), rows_of(report, "onnxruntime fp32")
    assert [r.batch for r in eager] == [1, 2] and [r.batch for r in ort] == [1, 2]
    assert all(r.status == TIMED for r in eager + ort)
    assert eager[0].speedup_text == "baseline" and eager[0].speedup is None
    assert ort[1].speedup is not None and ort[1].speedup.low <= ort[1].speedup.ratio <= ort[1].speedup.high
    row = ort[1]
    assert row.throughput_unit == "tokens/s"
    assert row.throughput == pytest.approx(1000 * 2 * 8 / row.latency.median_ms)
    assert report.threads == 1 and report.baseline == "eager fp32" and report.passed
    assert [row.status for row in rows_of(report, "eager int8")] == [TIMED, TIMED]
    assert not rows_of(report, "onnxruntime int8")  # the exported graph is fp32: a note says so, no row
    assert "onnxruntime runs the exported fp32 graph; int8 applies to eager and compile" in report.notes


def test_eager_precisions_and_compile_on_a_vision_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """int8 (dynamic, Linear layers), fp16 (asked explicitly: noted as not representative on CPU) and compile
    (with a cheap backend: inductor's C++ build takes minutes on a small CPU) are each verified and timed."""
    monkeypatch.setattr(candidates, "COMPILE_BACKEND", "eager")
    report = bench_run("builtin:convnet", runtimes=("eager", "compile"), dtypes=("fp32", "int8", "fp16"),
                       batches=(2,))
    timed = {row.label for row in report.rows if row.status == TIMED}
    assert {"eager fp32", "eager int8", "eager fp16", "compile fp32", "compile fp16"} <= timed
    assert all(row.throughput_unit == "items/s" for row in report.rows if row.status == TIMED)
    assert any("fp16 on CPU" in note and "not representative" in note for note in report.notes)
    assert next(row.note or "" for row in report.rows if row.label == "compile int8").startswith("torch dynamic int8")
    memory = [row for row in report.rows if row.status == TIMED]
    assert all(row.peak_memory_bytes is None or row.memory == "peak RSS growth" for row in memory)


def test_torchscript_and_pt2_are_exported_verified_and_timed() -> None:
    report = bench_run("builtin:convnet", runtimes=("torchscript", "pt2"), batches=(1,))
    statuses = {row.label: row.status for row in report.rows}
    assert statuses == {"eager fp32": TIMED, "torchscript fp32": TIMED, "pt2 fp32": TIMED}
    assert any("baseline" in note for note in report.notes)


def test_existing_onnx_alone_and_against_its_original(convnet_onnx: Path, cli: Any) -> None:
    alone = bench_run(str(convnet_onnx), batches=(1,))
    assert [row.label for row in alone.rows] == ["onnxruntime fp32"] and alone.baseline is None
    assert alone.rows[0].speedup is None and any("--against" in note for note in alone.notes)
    against = bench_run(str(convnet_onnx), batches=(1,), against=ModelRef.parse("builtin:convnet"))
    assert {row.label: row.status for row in against.rows} == {"eager fp32": TIMED, "onnxruntime fp32": TIMED}
    assert rows_of(against, "onnxruntime fp32")[0].speedup is not None
    assert cli("bench", convnet_onnx, "--against", convnet_onnx).exit_code == 2  # the original must be eager
    assert cli("bench", convnet_onnx, "--runtime", "torchscript").exit_code == 2


def test_a_runtime_whose_outputs_differ_is_reported_not_timed(monkeypatch: pytest.MonkeyPatch) -> None:
    real = bench.eager_variant

    def broken(loaded: Any, dtype: str, device: str) -> Any:
        module = real(loaded, dtype, device)
        if dtype == "fp16":
            for parameter in module.parameters():
                parameter.data.mul_(-1)
        return module

    monkeypatch.setattr(bench, "eager_variant", broken)
    report = bench_run("builtin:convnet", runtimes=("eager",), dtypes=("fp32", "fp16"), batches=(1,))
    differing = rows_of(report, "eager fp16")
    assert [row.status for row in differing] == [DIFFERS] and differing[0].latency is None
    assert rows_of(report, "eager fp32")[0].status == TIMED


def test_memory_running_out_stops_the_sweep_for_that_runtime(monkeypatch: pytest.MonkeyPatch, cli: Any) -> None:
    """A runner raising MemoryError at batch >= 8 gets one row at 8 and none beyond; exit 7 only if nothing ran."""
    real = bench.torch_candidate

    def limited(*args: Any, limit: int = 8, **kwargs: Any) -> Any:
        candidate = real(*args, **kwargs)
        bind = candidate.bind

        def bind_or_fail(inputs: dict[str, Any]) -> Any:
            if next(iter(inputs.values())).shape[0] >= limit:
                raise MemoryError
            return bind(inputs)

        candidate.bind = bind_or_fail
        return candidate

    monkeypatch.setattr(bench, "torch_candidate", limited)
    report = bench_run("builtin:convnet", runtimes=("eager",), batches=(1, 8, 16, 4))
    assert [(row.batch, row.status) for row in report.rows] == [(1, TIMED), (4, TIMED), (8, OUT_OF_MEMORY)]
    assert report.rows[-1].note == "out of memory at batch 8, larger batches skipped"
    monkeypatch.setattr(bench, "torch_candidate", lambda *a, **k: limited(*a, limit=1, **k))
    result = cli("bench", "builtin:convnet", "--runtime", "eager", "--batch", "1,2", "--repeats", "3")
    assert result.exit_code == 7 and "out of memory" in result.stderr


def test_table_shows_no_measurable_difference_and_busy_warning(monkeypatch: pytest.MonkeyPatch, cli: Any) -> None:
    """Identical noisy samples for eager and the candidate: the interval spans 1.0; a machine with many other
    runnable threads is named in the warnings (text and --json)."""
    from mlops_cli.core import timing

    def same_samples(calls: dict[str, Any], **kwargs: Any) -> dict[str, timing.Timing]:
        for call in calls.values():
            call()
        return {name: timing.summarize_samples([1.0, 1.2, 0.9, 1.1, 1.05]) for name in calls}

    monkeypatch.setattr("mlops_cli.services.bench.sweep.measure_interleaved", same_samples)
    monkeypatch.setattr(timing, "other_runnable", lambda: 64.0)
    args = ("bench", "builtin:convnet", "--dtype", "fp32,int8", "--runtime", "eager", "--repeats", "5")
    result = cli(*args)
    assert result.exit_code == 0, result.output
    assert "no measurable difference" in result.stdout and "baseline" in result.stdout
    assert "the machine is busy" in result.stderr
    data = cli(*args, "--json").json()
    assert any("the machine is busy" in w for w in data["warnings"])
    int8 = next(row for row in data["rows"] if row["dtype"] == "int8")
    assert int8["speedup_text"].startswith("no measurable difference") and int8["latency"]["median_ms"] == 1.05


def test_plot_png_and_html(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlops_cli.core import timing

    monkeypatch.setattr("mlops_cli.services.bench.sweep.measure_interleaved",
                        lambda calls, **kw: {name: timing.summarize_samples([2.0, 2.5, 3.0]) for name in calls})
    png, page = tmp_path / "bench.png", tmp_path / "bench.html"
    report = bench_run("builtin:convnet", runtimes=("eager",), batches=(1, 2), plot=png)
    assert report.plot == str(png) and png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    bench_run("builtin:convnet", runtimes=("eager",), batches=(1, 2), plot=page)
    text = page.read_text()
    assert "<svg" in text and "http" not in text.replace('xmlns="http://www.w3.org/2000/svg"', "")
    data = json.loads(text.split('id="bench-data">')[1].split("</script>")[0])
    assert data == [{"name": "eager fp32", "batch": [1, 2], "latency_ms": [2.5, 2.5],
                     "throughput": [400.0, 800.0], "unit": "items/s"}]


def test_usage_errors(cli: Any, tmp_path: Path) -> None:
    assert cli("bench", "builtin:convnet", "--runtime", "tensorrt").exit_code == 2
    assert cli("bench", "builtin:convnet", "--batch", "1,x").exit_code == 2
    assert cli("bench", "builtin:convnet", "--seq-len", "16").exit_code == 2  # no sequence dim
    assert cli("bench", "builtin:convnet", "--plot", str(tmp_path / "bench.svg")).exit_code == 2
    assert cli("bench", "builtin:convnet", "--against", "builtin:lenet").exit_code == 2
    existing = tmp_path / "bench.png"
    existing.write_bytes(b"keep")
    assert cli("bench", "builtin:convnet", "--plot", existing).exit_code == 5  # checked before any timing
    assert existing.read_bytes() == b"keep"
