"""Example inputs: --input specs, realistic text inputs with real padding, several shape sets."""

from __future__ import annotations

import numpy as np
import pytest

from mlops_cli.core.errors import UsageError
from mlops_cli.core.inputs import Dim, InputRequest, make_inputs, parse_input_spec, plan_inputs, varied_sizes
from mlops_cli.core.loading import load_model


def test_parse_input_spec_named_and_fixed_dims() -> None:
    spec = parse_input_spec("x:float32[batch=4,3,224,224]")
    assert spec.name == "x" and spec.dtype == "float32"
    assert spec.dims == (Dim(4, "batch"), Dim(3), Dim(224), Dim(224))
    assert spec.shape({"batch": 1}) == (1, 3, 224, 224)
    ids = parse_input_spec("input_ids:int64[batch,sequence=32]")
    assert ids.dims == (Dim(2, "batch"), Dim(32, "sequence"))


def test_first_dim_is_varied_by_default() -> None:
    spec = parse_input_spec("x:float32[2,3]")
    assert spec.dims[0] == Dim(2, "batch")
    assert varied_sizes({"batch": 2}) == [{"batch": 2}, {"batch": 1}, {"batch": 3}]


@pytest.mark.parametrize("text", ["x:float32", "x:complex[2]", "x:float32[channels]", "1x:float32[2]"])
def test_bad_specs_are_usage_errors(text) -> None:
    with pytest.raises(UsageError) as info:
        parse_input_spec(text)
    assert info.value.exit_code == 2


def test_text_inputs_are_realistic() -> None:
    specs = [parse_input_spec(s) for s in
             ("input_ids:int64[batch=4,sequence=10]", "attention_mask:int64[batch=4,sequence=10]",
              "token_type_ids:int64[batch=4,sequence=10]")]
    inputs = make_inputs(specs, vocab_size=50, pad_token_id=0).tensors
    mask = inputs["attention_mask"]
    assert mask.sum(axis=1).min() >= 1  # never an all-zero row (the tips' §7 trap)
    assert (mask.sum(axis=1) < 10).any()  # and real padding on some rows
    real_ids = inputs["input_ids"][mask.astype(bool)]
    assert real_ids.min() >= 5 and real_ids.max() < 50
    assert (inputs["input_ids"][~mask.astype(bool)] == 0).all()  # padded positions hold the pad id
    assert set(np.unique(inputs["token_type_ids"])) == {0, 1}


def test_shape_sets_cover_batches_and_lengths_for_a_text_model() -> None:
    loaded = load_model("builtin:tiny-bert")
    sets = plan_inputs(loaded).sets
    shapes = {s.tensors["input_ids"].shape for s in sets}
    batches = {b for b, _ in shapes}
    lengths = {n for _, n in shapes}
    assert 1 in batches and max(batches) > 1
    assert len(lengths) >= 2 and max(lengths) <= loaded.config.max_position_embeddings
    assert set(sets[0].tensors) == {"input_ids", "attention_mask", "token_type_ids"}


def test_vision_model_inputs_from_config() -> None:
    loaded = load_model("builtin:tiny-vit")
    sets = plan_inputs(loaded).sets
    assert [s.tensors["pixel_values"].shape for s in sets] == [(2, 3, 32, 32), (1, 3, 32, 32), (3, 3, 32, 32)]


def test_the_users_sizes_are_the_first_input_set_and_the_others_derive_from_them() -> None:
    """Issue 13.2: `--input input_ids:int64[batch=1,sequence=128]` used to run at sequence 8/8/48."""
    loaded = load_model("builtin:tiny-bert")
    specs = ("input_ids:int64[batch=1,sequence=128]", "attention_mask:int64[batch=1,sequence=128]")
    plan = plan_inputs(loaded, InputRequest(specs=specs))
    longest = min(256, loaded.config.max_position_embeddings)  # never past what the model can embed
    assert [s.sizes for s in plan.sets] == [{"batch": 1, "sequence": 128}, {"batch": 1, "sequence": 64},
                                            {"batch": 2, "sequence": longest}]
    assert plan.example.tensors["input_ids"].shape == (1, 128)
    sized = plan_inputs(loaded, InputRequest(batch_size=4, seq_len=20))
    assert sized.example.tensors["input_ids"].shape == (4, 20)
    assert all(s.tensors["input_ids"].shape[1] <= loaded.config.max_position_embeddings for s in sized.sets)


def test_sizes_for_a_dim_the_inputs_lack_and_combined_sources_are_usage_errors() -> None:
    loaded = load_model("builtin:lenet")
    with pytest.raises(UsageError, match="no sequence dim"):
        plan_inputs(loaded, InputRequest(seq_len=10))
    with pytest.raises(UsageError, match="cannot be combined"):
        InputRequest(specs=("x:float32[2,1,28,28]",), texts=("hello",))


def test_encoder_decoder_models_get_decoder_inputs() -> None:
    """The conformance matrix found T5 unusable without --input: its forward needs decoder_input_ids."""
    import transformers

    from mlops_cli.core.inputs import hf_input_specs

    config = transformers.T5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2)
    model = transformers.T5ForConditionalGeneration(config).eval()
    specs = {spec.name: spec for spec in hf_input_specs(config, model)}
    assert set(specs) == {"input_ids", "attention_mask", "decoder_input_ids"}
    assert specs["decoder_input_ids"].shape() == (2, 8)
    bert = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=32)
    assert "decoder_input_ids" not in {spec.name for spec in hf_input_specs(bert)}
