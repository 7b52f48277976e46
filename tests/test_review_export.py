"""Review findings on `export onnx` of causal LMs (the KV-cache default, --engine auto/genai) and on compressing
the files it writes: options the KV-cache export would ignore are refused, auto falls back to a folder holding
model.onnx and the tokenizer, int4/int8/half work on a genai folder's model.onnx, messages name the right flags.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest


@pytest.mark.parametrize(("extra", "expected"), [
    (["--device", "cpu"], "--device"),
    (["--seed", "3"], "--seed"),
    (["--opset", "18"], "opset 17 at most"),
    (["--engine", "genai", "--opset", "17"], "--opset applies to --engine torch"),
    (["--engine", "genai", "--external-data"], "--external-data applies to --engine torch"),
])
def test_options_the_kv_cache_export_would_ignore_are_refused(cli: Any, tmp_path: Path, extra: list[str],
                                                              expected: str) -> None:
    """Before: --device and --seed were ignored, --opset above 17 silently clamped to 17, and the genai engine
    ignored --opset and --external-data."""
    result = cli("export", "onnx", "builtin:tiny-gpt2", "-o", tmp_path / "lm", *extra)
    assert result.exit_code == 2, result.output
    assert expected in result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_auto_falls_back_to_a_folder_holding_model_onnx_and_the_tokenizer(cli: Any, tmp_path: Path) -> None:
    """Before: `-o FOLDER` on a family the genai builder does not support (GPT-2) wrote a FILE named FOLDER."""
    out = tmp_path / "lm"
    report = cli("export", "onnx", "builtin:tiny-gpt2", "-o", out, "--json")
    assert report.exit_code == 0, report.output
    assert report.json()["engine"] == "torch" and "does not support the 'gpt2' family" in report.json()["engine_reason"]
    assert report.json()["output"] == str(out / "model.onnx")
    assert {"model.onnx", "config.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    generated = cli("generate", out / "model.onnx", "--prompt", "Hello", "--max-new-tokens", "2", "--json")
    assert generated.exit_code == 0, generated.output


@pytest.mark.slow
def test_auto_falls_back_to_torch_for_a_model_without_tokenizer_and_for_torch_only_options(
        cli: Any, tmp_path: Path) -> None:
    """Before: a supported family without a tokenizer stopped auto with exit 3 instead of using the torch
    exporter; --opset now chooses the torch exporter too."""
    llama = tmp_path / "llama"
    assert cli("zoo", "save", "tiny-llama", llama).exit_code == 0
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json"):
        (llama / name).unlink(missing_ok=True)
    report = cli("export", "onnx", llama, "-o", tmp_path / "lm", "--json")
    assert report.exit_code == 0, report.output
    assert report.json()["engine"] == "torch" and "has no tokenizer" in report.json()["engine_reason"]
    assert (tmp_path / "lm" / "model.onnx").is_file()
    chosen = cli("export", "onnx", llama, "-o", tmp_path / "lm17", "--opset", "16", "--json")
    assert chosen.exit_code == 0, chosen.output
    assert chosen.json()["engine_reason"].startswith("auto: the torch exporter takes --opset")
    assert chosen.json()["opset"] == 16


def test_a_family_genai_refuses_at_int4_is_pointed_at_compress_int4(cli: Any, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime_genai")
    result = cli("export", "onnx", "builtin:tiny-gpt2", "-o", tmp_path / "lm", "--precision", "int4")
    assert result.exit_code == 3
    assert "--engine torch" in result.stderr and "mlops compress int4" in result.stderr


@pytest.fixture(scope="module")
def genai_folder(cli: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-llama built by ONNX Runtime GenAI's builder: its model.onnx has symbolic KV head dims."""
    pytest.importorskip("onnxruntime_genai")
    folder = tmp_path_factory.mktemp("genai")
    assert cli("zoo", "save", "tiny-llama", folder / "llama").exit_code == 0
    built = cli("export", "onnx", folder / "llama", "--engine", "genai", "-o", folder / "g")
    assert built.exit_code == 0, built.output
    return folder / "g"


@pytest.mark.slow
def test_weight_only_quantisation_of_a_genai_folders_model(cli: Any, genai_folder: Path, tmp_path: Path) -> None:
    """Before: int4 and int8 --weight-only built our generation loop's decoder even with --no-eval, which refuses
    the builder's symbolic head dims, and its hint pointed back at the same export."""
    int8 = cli("compress", "int8", genai_folder / "model.onnx", "--weight-only", "--no-eval", "-o",
               tmp_path / "int8.onnx", "--json")
    assert int8.exit_code == 0, int8.output
    assert int8.json()["quantized_matmuls"] > 0
    int4 = cli("compress", "int4", genai_folder / "model.onnx", "-o", tmp_path / "int4.onnx", "--json")
    assert int4.exit_code == 0, int4.output
    assert int4.json()["perplexity"] is None
    assert any("symbolic dim" in w and "--engine torch" in w for w in int4.json()["warnings"])


def test_messages_of_the_plain_graph_name_no_kv_cache(cli: Any, tmp_path: Path) -> None:
    """Before: a --no-kv-cache user was told to add --task causal-lm (still the plain graph with --no-kv-cache)."""
    from mlops_cli.core.contract import ModelRef
    from mlops_cli.core.loading import LoadOptions, load_model
    from mlops_cli.services.export_onnx import _generation_advice

    refused = cli("export", "onnx", "builtin:tiny-gpt2", "-o", tmp_path / "x.onnx", "--no-kv-cache",
                  "--engine", "torch")
    assert refused.exit_code == 2 and "drop --no-kv-cache" in refused.stderr
    assert "--task causal-lm" not in refused.stderr
    advice = _generation_advice(load_model(ModelRef.parse("builtin:tiny-gpt2"), LoadOptions()))
    assert len(advice) == 1 and "without --no-kv-cache" in advice[0] and "--task causal-lm" not in advice[0]


def test_a_family_without_a_plain_kv_cache_is_pointed_at_no_kv_cache() -> None:
    """Before: the hint said 'export without the cache', naming no flag (the cache export is now the default)."""
    from transformers import MambaConfig, MambaForCausalLM

    from mlops_cli.core.errors import InputError
    from mlops_cli.services.onnx_lm.export_with_past import kv_layout

    model = MambaForCausalLM(MambaConfig(vocab_size=64, hidden_size=16, state_size=4, num_hidden_layers=1)).eval()
    with pytest.raises(InputError) as refused:
        kv_layout(model)
    assert "'mamba'" in refused.value.message and "--no-kv-cache" in (refused.value.hint or "")
