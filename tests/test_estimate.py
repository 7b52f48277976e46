"""`mlops estimate`: sizes from a config on the meta device, checked against counts made by hand."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from mlops_cli.core.contract import ModelRef
from mlops_cli.services.estimate import EstimateOptions, EstimateReport, run

GIB = 1024**3

# Llama with grouped-query attention: hidden 64, 2 layers, 4 heads of 16 dims, 2 KV heads, MLP 128, vocab 100.
SMALL_LLAMA = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 100,
    "max_position_embeddings": 256, "tie_word_embeddings": False,
}
# GPT-2 with tied embeddings: hidden 32, 2 layers, 2 heads of 16 dims, MLP 4 x 32, vocab 100, 64 positions.
SMALL_GPT2 = {
    "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": 32, "n_layer": 2, "n_head": 2,
    "vocab_size": 100, "n_positions": 64, "tie_word_embeddings": True,
}
LLAMA3_70B = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 8192, "num_hidden_layers": 80,
    "num_attention_heads": 64, "num_key_value_heads": 8, "intermediate_size": 28672, "vocab_size": 128256,
    "tie_word_embeddings": False, "max_position_embeddings": 8192,
}


def write_config(folder: Path, config: dict[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    return path


def estimate(reference: str | Path, **options: Any) -> EstimateReport:
    return run(ModelRef.parse(str(reference)), EstimateOptions(**options))


def test_small_llama_with_gqa_matches_hand_counts(tmp_path: Path) -> None:
    report = estimate(write_config(tmp_path, SMALL_LLAMA), context=16, batch=2)  # a lone config.json file
    # per layer: q 64x64, k and v 64x32 (2 KV heads x 16), o 64x64, gate/up/down 64x128 each, two RMSNorms of 64
    linear_per_layer = 4096 + 2048 + 2048 + 4096 + 3 * 8192
    per_layer = linear_per_layer + 2 * 64
    embedding, head, final_norm = 100 * 64, 100 * 64, 64
    unique = 2 * per_layer + embedding + head + final_norm
    params = report.parameters
    assert (params.unique, params.total, params.embedding, params.tied) == (unique, unique, embedding, ())
    assert params.non_embedding == unique - embedding
    assert report.decoder_lm and report.compute is not None
    assert (report.compute.unit, report.compute.context) == ("token", 16)
    assert report.compute.linear_macs == 2 * linear_per_layer + head
    assert report.compute.attention_macs == 2 * 2 * (4 * 16) * 16  # 2 products x layers x heads x head_dim x keys
    assert report.kv_cache is not None
    assert report.kv_cache.bytes_per_token == 2 * 2 * 2 * 16 * 2  # K and V x layers x KV heads x head_dim x 16-bit
    assert report.kv_cache.total_bytes == report.kv_cache.bytes_per_token * 16 * 2
    assert report.weight_bytes == {"fp32": 4 * unique, "fp16": 2 * unique, "bf16": 2 * unique, "int8": unique,
                                   "int4": unique // 2}
    tokens = 2 * 16
    assert report.activations.inference_bytes == tokens * (4 * 64 + 2 * 128) * 2 + 2 * 100 * 4
    assert report.activations.training_bytes == 2 * tokens * (18 * 64 + 4 * 128) + tokens * 100 * 4
    assert report.inference_bytes["bf16"] == (2 * unique + report.kv_cache.total_bytes
                                              + report.activations.inference_bytes)
    training = report.training
    assert training.bytes_per_parameter == 16 and training.states_bytes == 16 * unique
    assert training.total_bytes == 16 * unique + report.activations.training_bytes


def test_gpt2_counts_tied_embeddings_once(tmp_path: Path) -> None:
    report = estimate(write_config(tmp_path / "gpt2", SMALL_GPT2).parent, context=16)  # an HF folder
    # per layer: c_attn 32x96 + 96, attn c_proj 32x32 + 32, c_fc 32x128 + 128, mlp c_proj 128x32 + 32, ln_1 and ln_2
    per_layer = (3072 + 96) + (1024 + 32) + (4096 + 128) + (4096 + 32) + 2 * 64
    wte, wpe, ln_f = 100 * 32, 64 * 32, 64
    unique = 2 * per_layer + wte + wpe + ln_f
    params = report.parameters
    assert params.unique == unique
    assert params.total == unique + wte  # lm_head.weight is wte under a second name
    assert params.embedding == wte + wpe
    assert params.tied == (("transformer.wte.weight", "lm_head.weight"),)
    assert report.compute is not None
    assert report.compute.linear_macs == 2 * (3072 + 1024 + 4096 + 4096) + wte  # the tied head still computes
    assert report.compute.attention_macs == 2 * 2 * 32 * 16
    assert report.kv_cache is not None and report.kv_cache.bytes_per_token == 2 * 2 * 2 * 16 * 2
    assert report.weight_bytes["fp32"] == 4 * unique


def test_analytic_macs_match_the_op_counter_on_a_real_model(tmp_path: Path) -> None:
    """The per-token formula is what core/flops counts in a real forward pass of N tokens, divided by N."""
    import torch
    import transformers

    from mlops_cli.core.flops import count_macs

    context = 12
    report = estimate(write_config(tmp_path, SMALL_LLAMA), context=context)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL_LLAMA)).eval()
    counted = count_macs(model, {"input_ids": torch.randint(0, 100, (1, context))}, by_module=False)
    assert report.compute is not None
    assert report.compute.macs * context == counted.macs
    assert report.compute.attention_macs * context == counted.attention_macs


def test_mixture_of_experts_counts_the_experts_a_token_runs(tmp_path: Path) -> None:
    """Mixtral keeps its experts in stacked [experts, out, in] tensors: all of them weigh, top-k compute."""
    import torch
    import transformers

    from mlops_cli.core.flops import count_macs

    config = {**SMALL_LLAMA, "model_type": "mixtral", "architectures": ["MixtralForCausalLM"],
              "num_local_experts": 4, "num_experts_per_tok": 2}
    report = estimate(write_config(tmp_path, config), context=8)
    expert = 3 * 64 * 128  # gate, up and down projections of one expert
    attention_linear = 4096 + 2048 + 2048 + 4096
    assert report.compute is not None
    assert report.compute.linear_macs == 2 * (attention_linear + 2 * expert) + 100 * 64
    assert report.parameters.unique >= 2 * 4 * expert  # every expert weighs
    assert any("count the 2 a token runs" in line for line in report.notes)
    torch.manual_seed(0)
    # eager experts: core/flops has no formula for the default kernel, aten._grouped_mm, yet
    model = transformers.MixtralForCausalLM._from_config(transformers.MixtralConfig(**config),
                                                         experts_implementation="eager").eval()
    counted = count_macs(model, {"input_ids": torch.randint(0, 100, (1, 8))}, by_module=False)
    router = 2 * 64 * 4 * 8  # the router's logits (layers x hidden x experts x tokens), not a Linear layer
    assert report.compute.macs * 8 == counted.macs - router


def test_weights_are_never_read(tmp_path: Path) -> None:
    """A folder whose weight file is garbage still estimates: only config.json is opened."""
    folder = write_config(tmp_path / "model", SMALL_LLAMA).parent
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    assert estimate(folder).parameters.unique > 0


@pytest.mark.parametrize("name", ["convnet", "tiny-vit"])
def test_other_models_are_counted_on_meta_tensors(name: str) -> None:
    """Vision models go through core/flops on meta tensors: the same MACs as a real pass at batch 1."""
    from mlops_cli.core import zoo
    from mlops_cli.core.flops import count_macs
    from mlops_cli.core.inputs import make_inputs, parse_input_spec

    report = estimate(f"builtin:{name}", batch=1)
    module, _ = zoo.build(name)
    specs = [parse_input_spec(s) for s in zoo.entry(name).inputs] or [
        parse_input_spec("pixel_values:float32[batch=1,3,32,32]")]
    real = count_macs(module, make_inputs(specs, {"batch": 1}).tensors, by_module=False)
    assert report.compute is not None and report.compute.method == "op counter on meta tensors"
    assert (report.compute.unit, report.compute.macs, report.compute.context) == ("example", real.macs, None)
    assert report.kv_cache is None and not report.decoder_lm
    assert report.activations.inference_bytes and report.activations.training_bytes


def test_text_encoder_falls_back_to_the_config_formula() -> None:
    report = estimate("builtin:tiny-bert", context=16)
    assert report.compute is not None and report.compute.method == "analytic"
    # per token: 2 layers x (4 x 32x32 + 2 x 32x64) + pooler 32x32 + classifier 32x2; attention 2 x 2 x 32 x 16
    assert report.compute.macs == 16 * (2 * (4 * 1024 + 2 * 2048) + 1024 + 64) + 16 * 2 * 2 * 32 * 16
    assert any("meta tensors failed" in line for line in report.notes)


def test_llama3_70b_sized_config_fits_where_expected(tmp_path: Path) -> None:
    report = estimate(write_config(tmp_path, LLAMA3_70B), context=8192, batch=1)
    assert report.parameters.unique == 70_553_706_496
    assert report.kv_cache is not None and report.kv_cache.bytes_per_token == 327_680  # 2 x 80 x 8 x 128 x 2
    fits = {fit.gpu: fit for fit in report.gpus}
    assert [fits[gpu].inference["int4"] for gpu in ("24 GB", "48 GB", "80 GB", "141 GB")] == [False, True, True, True]
    assert [fits[gpu].inference["bf16"] for gpu in ("24 GB", "48 GB", "80 GB", "141 GB")] == [False, False, False,
                                                                                                True]
    assert not any(fit.training or fit.training_checkpointed for fit in report.gpus)


def test_arch_builds_on_meta_without_reading_the_weights(tmp_path: Path) -> None:
    from mlops_cli.core.contract import LoadOptions

    weights = tmp_path / "model.pt"
    weights.write_bytes(b"never read")
    report = run(ModelRef.parse(str(weights)),
                 EstimateOptions(load=LoadOptions(arch="mlops_cli.core.zoo:ConvNet", arch_kwargs={"num_classes": 3})))
    assert report.parameters.unique == 214_538 - 7 * 65  # the head shrinks from 10 to 3 classes (64 weights + bias)
    assert report.compute is None and any("MACs not estimated" in line for line in report.notes)


def test_long_context_is_a_warning(tmp_path: Path) -> None:
    report = estimate(write_config(tmp_path, SMALL_LLAMA), context=1024)
    assert any("longer than the model's 256 positions" in line for line in report.warnings)


def test_custom_code_needs_trust(tmp_path: Path) -> None:
    from mlops_cli.core.errors import InputError, UnsafeInputError

    config = {**SMALL_LLAMA, "model_type": "my-llama", "architectures": ["MyLlama"],
              "auto_map": {"AutoModelForCausalLM": "modeling_my.MyLlama"}}
    path = write_config(tmp_path, config)
    with pytest.raises(InputError, match="my-llama") as unknown:
        estimate(path)
    assert "--trust-remote-code" in (unknown.value.hint or "")
    # a known model_type whose architecture ships code: refused without the flag
    known = write_config(tmp_path / "known", {**SMALL_LLAMA, "architectures": ["MyLlama"],
                                              "auto_map": {"AutoModelForCausalLM": "modeling_my.MyLlama"}})
    with pytest.raises(UnsafeInputError, match="ships its own code"):
        estimate(known)


def test_cli_json_and_tables(cli: Any, tmp_path: Path) -> None:
    result = cli("estimate", "builtin:tiny-gpt2", "--context", "32", "--batch", "2", "--json")
    assert result.exit_code == 0, result.output
    data = result.json()
    assert data["decoder_lm"] and data["context"] == 32 and data["batch"] == 2
    assert data["kv_cache"]["total_bytes"] == data["kv_cache"]["bytes_per_token"] * 64
    assert [gpu["gpu"] for gpu in data["gpus"]] == ["24 GB", "48 GB", "80 GB", "141 GB"]
    tables = cli("estimate", write_config(tmp_path, SMALL_LLAMA), "--seq-len", "16")
    assert tables.exit_code == 0, tables.output
    for text in ("Parameters", "KV cache", "Training with AdamW", "Fits on one GPU"):
        assert text in tables.stdout
    image = cli("estimate", "builtin:convnet", "--batch", "8")
    assert image.exit_code == 0, image.output
    assert "Inference memory (batch 8)" in image.stdout and "Compute per example (its input shape" in image.stdout


def test_cli_errors(cli: Any, tmp_path: Path) -> None:
    (tmp_path / "weights.safetensors").write_bytes(b"x")
    assert cli("estimate", tmp_path / "weights.safetensors").exit_code == 3
    assert cli("estimate", tmp_path / "missing").exit_code == 3
    assert cli("estimate", "builtin:tiny-gpt2", "--context", "0").exit_code == 2


def test_a_config_the_model_cannot_be_built_from_is_an_input_error(cli, tmp_path) -> None:
    """Review finding: hidden size 100 with 3 heads (or a class that does not fit the config) was exit 1."""
    import json

    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 100, "num_attention_heads": 3,
        "num_hidden_layers": 1, "intermediate_size": 64, "vocab_size": 64}))
    result = cli("estimate", folder)
    assert result.exit_code == 3, result.output
    assert "is not a valid llama config" in result.stderr
    mismatched = tmp_path / "mismatched"
    mismatched.mkdir()
    (mismatched / "config.json").write_text(json.dumps({
        "model_type": "gpt2", "architectures": ["BertModel"], "n_embd": 32, "n_layer": 1, "n_head": 2}))
    other = cli("estimate", mismatched)
    assert other.exit_code == 3, other.output
    assert "cannot be built from this config" in other.stderr
    summarized = cli("summarize", folder, "--repeats", "0")
    assert summarized.exit_code == 3 and "not a valid config" in summarized.stderr
