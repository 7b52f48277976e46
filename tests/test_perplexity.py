"""The perplexity figure of causal LMs (issue #15), shared by compress half/int8/int4, prune and verify-parity.

Causal LM: the zoo's tiny GPT-2 (trained on the bundled corpus, saved as an HF folder with its tokenizer) and
its ONNX export with a KV cache; non-LM: the zoo's tiny BERT, which must see nothing change.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from mlops_cli.core.contract import ModelRef
from mlops_cli.core.loading import load_model
from mlops_cli.services.perplexity import EvaluationText, PerplexityProbe, probe_for, torch_logits_fn

FIGURES = ("before", "after", "relative_change", "greedy_agreement")


@pytest.fixture(scope="module")
def gpt2(zoo_dir: Path) -> Path:
    return zoo_dir / "tiny-gpt2"


@pytest.fixture(scope="module")
def decoder(gpt2: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny GPT-2 exported with its KV cache, alone in a folder (no tokenizer beside it)."""
    from mlops_cli.services.onnx_lm import ExportWithPastOptions, export_run

    output = tmp_path_factory.mktemp("decoder") / "gpt2.onnx"
    export_run(ModelRef.parse(str(gpt2)), ExportWithPastOptions(output=output))
    return output


def _figures(data: dict[str, Any]) -> dict[str, Any]:
    quality = data["perplexity"]
    assert quality is not None, data
    assert all(math.isfinite(quality[name]) for name in FIGURES)
    assert quality["before"] > 1 and quality["after"] > 1 and 0 <= quality["greedy_agreement"] <= 1
    assert quality["tokens"] == 512 and quality["scored_tokens"] == 511  # the bundled text's first 512 tokens
    assert math.isclose(quality["relative_change"], quality["after"] / quality["before"] - 1, rel_tol=1e-6)
    return quality


def test_one_window_is_the_models_own_loss(gpt2: Path, tmp_path: Path) -> None:
    """A text shorter than the window is one forward pass: perplexity = exp(the model's mean cross-entropy)."""
    loaded = load_model(ModelRef.parse(str(gpt2)))
    text = tmp_path / "text.txt"
    text.write_text("The model reads a short text and predicts every next token of it, one after the other.")
    probe, why = probe_for(EvaluationText(text_file=text, window=128), loaded)
    assert probe is not None and why is None and len(probe.tokens) < 128
    ids = torch.from_numpy(probe.tokens)[None]
    with torch.inference_mode():
        loss = float(loaded.module(input_ids=ids, labels=ids).loss)
    assert math.isclose(probe.baseline.perplexity, math.exp(loss), rel_tol=1e-5)
    same = probe.compare(loaded)
    assert same.relative_change == pytest.approx(0.0, abs=1e-9) and same.greedy_agreement == 1.0


def test_compress_half_reports_the_perplexity_of_a_causal_lm_and_nothing_for_bert(
        cli, gpt2: Path, zoo_dir: Path, tmp_path: Path) -> None:
    result = cli("compress", "half", gpt2, "-o", tmp_path / "fp16", "--json")
    assert result.exit_code == 0, result.output
    quality = _figures(result.json())
    assert "float32 on CPU" in quality["compute"]  # fp16 weights, fp32 compute: said so
    direct = PerplexityProbe.of(EvaluationText(), torch_logits_fn(load_model(ModelRef.parse(str(gpt2))).module),
                                load_model(ModelRef.parse(str(gpt2))).tokenizer)
    assert math.isclose(quality["before"], direct.baseline.perplexity, rel_tol=1e-6)
    assert abs(quality["relative_change"]) < 0.01 and quality["greedy_agreement"] > 0.95
    bert = cli("compress", "half", zoo_dir / "tiny-bert", "-o", tmp_path / "bert16", "--json")
    assert bert.exit_code == 0, bert.output
    assert bert.json()["perplexity"] is None


def test_compress_int8_and_prune_report_it_and_no_eval_skips_it(cli, gpt2: Path, tmp_path: Path) -> None:
    int8 = cli("compress", "int8", gpt2, "-o", tmp_path / "int8", "--repeats", "0", "--json")
    assert int8.exit_code == 0, int8.output
    _figures(int8.json())
    pruned = cli("prune", gpt2, "--amount", "0.2", "--repeats", "0", "--no-size-estimate", "--json")
    assert pruned.exit_code == 0, pruned.output
    quality = _figures(pruned.json()["results"][0])
    assert quality["after"] != quality["before"]
    human = cli("prune", gpt2, "--amount", "0.1,0.2", "--repeats", "0", "--no-size-estimate")
    assert human.exit_code == 0 and "Perplexity per amount" in human.stdout
    skipped = cli("prune", gpt2, "--amount", "0.2", "--repeats", "0", "--no-size-estimate", "--no-eval", "--json")
    assert skipped.exit_code == 0 and skipped.json()["results"][0]["perplexity"] is None


def test_verify_parity_compares_perplexity_of_two_causal_lms(cli, gpt2: Path, decoder: Path, zoo_dir: Path) -> None:
    same = cli("verify-parity", gpt2, gpt2, "--repeats", "0", "--json")
    assert same.exit_code == 0, same.output
    quality = _figures(same.json())
    assert quality["relative_change"] == pytest.approx(0.0, abs=1e-9) and quality["greedy_agreement"] == 1.0
    generated = cli("verify-parity", gpt2, decoder, "--generate", "--max-new-tokens", "2", "--json")
    assert generated.exit_code == 0, generated.output
    assert abs(_figures(generated.json())["relative_change"]) < 1e-4  # an fp32 export scores like its model
    bert = cli("verify-parity", zoo_dir / "tiny-bert", zoo_dir / "tiny-bert", "--repeats", "0", "--json")
    assert bert.exit_code == 0 and bert.json()["perplexity"] is None


def test_a_missing_eval_text_exits_3_before_anything_is_written(cli, gpt2: Path, decoder: Path,
                                                                 tmp_path: Path) -> None:
    missing = tmp_path / "missing.txt"
    runs = {"half": ("compress", "half", gpt2, "-o", tmp_path / "half"),
            "int8": ("compress", "int8", gpt2, "-o", tmp_path / "int8"),
            "weight-only": ("compress", "int8", decoder, "--weight-only", "-o", tmp_path / "w8.onnx"),
            "prune": ("prune", gpt2, "-o", tmp_path / "pruned"),
            "verify": ("verify-parity", gpt2, gpt2)}
    for name, args in runs.items():
        result = cli(*args, "--eval-text", missing)
        assert result.exit_code == 3 and "evaluation text" in result.stderr, (name, result.output)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    contradiction = cli("compress", "half", gpt2, "-o", tmp_path / "half", "--eval-text", missing, "--no-eval")
    assert contradiction.exit_code == 2


def test_int8_weight_only_shrinks_the_decoder_which_still_decodes(cli, gpt2: Path, decoder: Path,
                                                                  tmp_path: Path) -> None:
    import onnx

    out = tmp_path / "w8.onnx"
    result = cli("compress", "int8", decoder, "--weight-only", "-o", out, "--tokenizer", gpt2, "--json")
    assert result.exit_code == 0, result.output
    data = result.json()
    assert data["bits"] == 8 and data["accuracy_level"] == 4 and data["size_after"] < data["size_before"]
    nodes = [n for n in onnx.load(out).graph.node if n.op_type == "MatMulNBits"]
    assert len(nodes) == data["quantized_matmuls"] > 0
    assert all(a.i == 8 for n in nodes for a in n.attribute if a.name == "bits")
    assert abs(_figures(data)["relative_change"]) < 0.01  # 8-bit weights barely move the logits
    generated = cli("generate", out, "--tokenizer", gpt2, "--prompt", "The model", "--max-new-tokens", "4",
                    "--fixed-length", "--warmup", "0", "--json")
    assert generated.exit_code == 0, generated.output
    assert generated.json()["results"][0]["outputs"][0]["new_tokens"] == 4
    refused = cli("compress", "int8", decoder, "--weight-only", "-o", tmp_path / "x.onnx", "--exclude", "lm_head")
    assert refused.exit_code == 2 and not (tmp_path / "x.onnx").exists()
    assert np.isfinite(data["perplexity"]["after"])


def test_compress_of_an_onnx_kv_decoder_is_checked_by_its_perplexity(cli, gpt2: Path, decoder: Path,
                                                                     tmp_path: Path) -> None:
    """Generated inputs cannot drive a KV decoder (no drift check): with a tokenizer its perplexity is the check;
    without one it is refused before writing, as before."""
    for command in ("half", "int8"):
        out = tmp_path / f"{command}.onnx"
        result = cli("compress", command, decoder, "-o", out, "--tokenizer", gpt2, "--repeats", "0", "--json")
        assert result.exit_code == 0, result.output
        data = result.json()
        assert data["drift"] is None and any("KV cache" in line for line in data["notes"])
        assert abs(_figures(data)["relative_change"]) < 0.02
    refused = cli("compress", "half", decoder, "-o", tmp_path / "none.onnx")
    assert refused.exit_code == 2 and "--tokenizer" in refused.stderr and not (tmp_path / "none.onnx").exists()


def test_an_explicit_tokenizer_that_cannot_be_loaded_exits_3_before_writing(cli, decoder: Path,
                                                                             tmp_path: Path) -> None:
    """Review finding: int4 only warned (then PASS) and half/int8 said 'pass --tokenizer' (exit 2) when the
    --tokenizer given did not exist; auto-discovery alone falls back to a warning."""
    missing = tmp_path / "nonexistent"
    for args in (("int4",), ("half",), ("int8",), ("int8", "--weight-only")):
        out = tmp_path / "out.onnx"
        result = cli("compress", *args, decoder, "-o", out, "--tokenizer", missing)
        assert result.exit_code == 3 and f"--tokenizer {missing}" in result.stderr, (args, result.output)
        assert not out.exists()
    found_none = cli("compress", "int4", decoder, "-o", tmp_path / "auto.onnx", "--json")
    assert found_none.exit_code == 0 and any("perplexity not measured" in w for w in found_none.json()["warnings"])


def test_plain_verify_parity_of_a_kv_decoder_says_use_generate(cli, gpt2: Path, decoder: Path) -> None:
    """Review finding: HF vs its KV-cache export exited 3 ('the models take different inputs... --input'), and two
    KV decoders crashed in ONNX Runtime's Gather: generated inputs cannot drive such a graph."""
    for reference, candidate in ((gpt2, decoder), (decoder, decoder)):
        result = cli("verify-parity", reference, candidate, "--repeats", "0")
        assert result.exit_code == 2 and "--generate" in result.stderr, result.output


def test_weight_only_refuses_drift_options_and_no_check_skips_the_perplexity(cli, gpt2: Path, decoder: Path,
                                                                             tmp_path: Path) -> None:
    """Review finding: --weight-only silently ignored the drift check's options, --no-check still measured the
    perplexity, and --no-check --eval-text read a text it did not use."""
    out = tmp_path / "w8.onnx"
    for option in (("--atol", "1"), ("--rtol", "1"), ("--preset", "fp16"), ("--repeats", "3"),
                   ("--input", "input_ids:1x4:int64"), ("--seed", "3"), ("--threads", "1")):
        refused = cli("compress", "int8", decoder, "--weight-only", "-o", out, *option)
        assert refused.exit_code == 2 and option[0] in refused.stderr, (option, refused.output)
    assert not out.exists()
    skipped = cli("compress", "int8", decoder, "--weight-only", "-o", out, "--tokenizer", gpt2, "--no-check", "--json")
    assert skipped.exit_code == 0 and skipped.json()["perplexity"] is None, skipped.output
    for command in (("int8", "--weight-only"), ("half",)):
        both = cli("compress", *command, decoder, "-o", tmp_path / "x.onnx", "--no-check", "--eval-text", gpt2)
        assert both.exit_code == 2 and "--no-check" in both.stderr and not (tmp_path / "x.onnx").exists()
