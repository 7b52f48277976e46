"""The parity engine on hand-written runners (no model loading): output matching by name, mismatch
messages, NaN/inf, non-determinism, shape failures, padding masks, tolerances and timing fields."""

from __future__ import annotations

import numpy as np
import pytest

from mlops_cli.core.compare import PRESETS, compare_arrays
from mlops_cli.core.errors import InputError, UsageError
from mlops_cli.core.inputs import InputSet
from mlops_cli.core.parity import Tolerances, check_parity
from mlops_cli.core.runtimes import Runner
from mlops_cli.services.verify_parity import worst_output


def runner(name, fn, backend="fake"):
    return Runner(name, backend, "cpu", ["x"], lambda inputs: fn(inputs["x"]))


def sets(*batches):
    rng = np.random.default_rng(0)
    return [InputSet(f"batch={b}", {"x": rng.standard_normal((b, 4)).astype(np.float32)}, {"batch": b})
            for b in batches]


def check(ref_fn, cand_fn, input_sets=None, **kwargs):
    kwargs.setdefault("time_runs", False)
    return check_parity(runner("ref", ref_fn), runner("cand", cand_fn), input_sets or sets(1, 3), **kwargs)


def test_identical_outputs_pass_with_stats() -> None:
    report = check(lambda x: {"logits": x * 2}, lambda x: {"logits": x * 2 + 1e-6})
    assert report.passed
    diff = report.shapes[1].outputs[0]
    assert diff.name == "logits" and diff.reference_shape == (3, 4)
    assert diff.max_abs == pytest.approx(1e-6, rel=0.1) and diff.cosine == pytest.approx(1.0)
    assert diff.top1_agreement == 1.0 and diff.min_atol_to_pass == 0.0


def test_outputs_are_paired_by_name_not_order() -> None:
    report = check(lambda x: {"logits": x, "pooled": x.sum(1)}, lambda x: {"pooled": x.sum(1), "logits": x})
    assert report.passed
    assert [d.name for d in report.shapes[0].outputs] == ["logits", "pooled"]


def test_generic_names_are_paired_by_position_with_a_note() -> None:
    report = check(lambda x: {"logits": x}, lambda x: {"linear_13": x})
    assert report.passed
    assert report.shapes[0].outputs[0].name == "logits ~ linear_13"
    assert any("paired by position" in note for note in report.notes)


def test_descriptive_names_that_differ_fail() -> None:
    report = check(lambda x: {"logits": x}, lambda x: {"scores": x})
    assert not report.passed
    assert "output names differ" in report.verdict
    assert "logits (1, 4)" in report.verdict and "scores (1, 4)" in report.verdict


def test_output_count_mismatch_names_both_sides() -> None:
    report = check(lambda x: {"logits": x}, lambda x: {"logits": x, "hidden": x})
    assert not report.passed
    assert "output count mismatch" in report.verdict
    assert "reference has 1 (logits (1, 4))" in report.verdict and "hidden (1, 4)" in report.verdict


def test_shape_mismatch_shows_both_shapes() -> None:
    report = check(lambda x: {"output": x}, lambda x: {"output": x[:, :2]})
    assert not report.passed
    assert "shape mismatch: reference (1, 4) vs candidate (1, 2)" in report.verdict


@pytest.mark.parametrize(("side", "bad"), [("candidate", np.nan), ("reference", np.inf)])
def test_non_finite_values_fail_on_either_side(side, bad) -> None:
    def broken(x):
        y = x.copy()
        y[0, 0] = bad
        return {"output": y}

    clean = lambda x: {"output": x}  # noqa: E731
    report = check(clean, broken) if side == "candidate" else check(broken, clean)
    assert not report.passed
    assert f"non-finite value(s) (NaN/inf) in the {side}" in report.verdict


def test_non_deterministic_candidate_is_named() -> None:
    rng = np.random.default_rng(1)
    report = check(lambda x: {"output": x}, lambda x: {"output": x * (rng.random(x.shape) > 0.5) * 2})
    assert not report.passed
    assert "candidate is non-deterministic" in report.verdict and "dropout" in report.verdict


def test_candidate_failing_at_another_shape_is_reported_per_shape() -> None:
    def fixed_batch(x):
        if x.shape[0] != 3:
            raise ValueError(f"Got invalid dimensions for input: x index: 0 Got: {x.shape[0]} Expected: 3")
        return {"output": x}

    report = check(lambda x: {"output": x}, fixed_batch)
    assert not report.passed
    first, second = report.shapes
    assert not first.passed and "candidate failed at batch=1" in first.error and "Got: 1 Expected: 3" in first.error
    assert second.passed
    assert worst_output(report) == "(all outputs) at batch=1"


def test_padded_positions_are_excluded_unless_asked() -> None:
    mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=np.int64)
    ids = np.arange(8, dtype=np.int64).reshape(2, 4)
    input_set = InputSet("batch=2,sequence=4", {"input_ids": ids, "attention_mask": mask}, {"batch": 2})

    def model(garbage_in_padding):
        def run(inputs):
            hidden = inputs["input_ids"][..., None].astype(np.float32).repeat(3, -1)
            if garbage_in_padding:
                hidden = np.where(inputs["attention_mask"][..., None] == 0, 99.0, hidden)
            return {"last_hidden_state": hidden}
        return Runner("m", "fake", "cpu", None, run)

    excluded = check_parity(model(False), model(True), [input_set], time_runs=False)
    assert excluded.passed and excluded.masked_positions_excluded
    assert excluded.shapes[0].outputs[0].masked_out == 2 * 3
    included = check_parity(model(False), model(True), [input_set], time_runs=False, include_masked=True)
    assert not included.passed and included.shapes[0].outputs[0].masked_out == 0


def test_per_output_tolerance_overrides_and_presets() -> None:
    ref = lambda x: {"logits": x, "probs": x}  # noqa: E731
    cand = lambda x: {"logits": x + 0.005, "probs": x + 0.005}  # noqa: E731
    strict = check(ref, cand, tolerances=Tolerances(*PRESETS["fp32"]))
    assert not strict.passed
    override = check(ref, cand, tolerances=Tolerances(1e-4, 0.0, {"logits": (1e-2, None)}))
    outcomes = {d.name: d.passed for d in override.shapes[0].outputs}
    assert outcomes == {"logits": True, "probs": False}
    assert "probs" in override.verdict and "would pass with atol >= 0.005" in override.verdict
    assert check(ref, cand, tolerances=Tolerances(*PRESETS["fp16"])).passed


def test_tolerance_semantics_are_atol_plus_rtol_times_reference() -> None:
    reference = np.array([100.0, 1.0])
    candidate = np.array([100.05, 1.0])
    assert compare_arrays("o", reference, candidate, atol=0.0, rtol=1e-3).passed  # 0.05 <= 1e-3 * 100
    assert not compare_arrays("o", reference, candidate, atol=0.0, rtol=1e-4).passed


def test_latency_of_both_sides_and_speed_ratio() -> None:
    report = check(lambda x: {"output": x}, lambda x: {"output": x}, sets(2), time_runs=True, repeats=3)
    shape = report.shapes[0]
    assert shape.reference_latency.repeats == 3 and shape.candidate_latency.repeats == 3
    assert shape.speed_ratio == pytest.approx(shape.speedup)


def test_worst_output_names_the_furthest_failure() -> None:
    report = check(lambda x: {"a": x, "b": x}, lambda x: {"a": x + 1e-3, "b": x + 1.0},
                   tolerances=Tolerances(1e-4, 0.0))
    assert worst_output(report) == "b at batch=3" or worst_output(report) == "b at batch=1"


def test_fixed_shape_hint_only_for_size_errors() -> None:
    def broken(x):
        raise RuntimeError("unsupported operator aten::frobnicate")

    def fixed(x):
        raise RuntimeError("The size of tensor a (3) must match the size of tensor b (2) at non-singleton dimension 0")

    unrelated = check(lambda x: {"output": x}, broken)
    assert "candidate failed at batch=1: unsupported operator" in unrelated.verdict
    assert "fixed shapes" not in unrelated.verdict
    assert "(was it traced or exported with fixed shapes?)" in check(lambda x: {"output": x}, fixed).verdict


@pytest.mark.parametrize("side", ["candidate", "reference"])
def test_an_onnx_side_needing_missing_inputs_is_an_input_error(side) -> None:
    graph = Runner("model.onnx", "onnxruntime", "cpu", ["x", "mask"], lambda inputs: {"output": inputs["x"]})
    torch_side = runner("torch-model", lambda x: {"output": x})
    pair = (torch_side, graph) if side == "candidate" else (graph, torch_side)
    with pytest.raises(InputError) as caught:
        check_parity(*pair, sets(1), time_runs=False)
    message = caught.value.message
    assert f"the {side} model.onnx needs mask" in message and "fixed shapes" not in message
    assert "torch-model takes x" in message and "model.onnx takes x, mask" in message


def test_unknown_per_output_override_is_a_usage_error() -> None:
    with pytest.raises(UsageError) as caught:
        check(lambda x: {"logits": x}, lambda x: {"logits": x},
              tolerances=Tolerances(per_output={"logit": (1.0, None)}))
    assert "'logit' matches no output" in caught.value.message and "the outputs are: logits" in caught.value.message
    # a candidate-side name of an output paired by position is a real output too
    paired = check(lambda x: {"logits": x}, lambda x: {"linear_3": x + 0.5},
                   tolerances=Tolerances(per_output={"linear_3": (1.0, None)}))
    assert paired.passed and paired.shapes[0].outputs[0].atol == 1.0
