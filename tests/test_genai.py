"""The ONNX Runtime GenAI engine (issue #15): `export onnx --task causal-lm --engine genai|auto`, `generate` and
`verify-parity --generate` on the folder it writes, and the folder checks.

A tiny Llama with grouped-query attention (hidden 64, 2 layers, 4 heads, 2 KV heads, random weights) and the
zoo's byte-level BPE tokenizer; the builder makes its folder in about a second.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from mlops_cli.core.contract import ModelRef
from mlops_cli.core.errors import InputError
from mlops_cli.services.decoding import DecodingParams, decode
from mlops_cli.services.onnx_lm.genai import GENAI_CONFIG, read_genai_folder, require_genai

pytest.importorskip("onnxruntime_genai")

PROMPT = "Hello there, how are you"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An HF folder: the tiny Llama and the zoo's tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from mlops_cli.core import zoo

    folder = tmp_path_factory.mktemp("hf") / "llama"
    tokenizer = zoo.gpt2_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    LlamaForCausalLM(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def built(cli: Any, llama: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """`export onnx --engine genai` through the command: the folder and its --json report."""
    out = tmp_path_factory.mktemp("genai") / "llama-genai"
    result = cli("export", "onnx", llama, "--task", "causal-lm", "--engine", "genai", "-o", out, "--json")
    assert result.exit_code == 0, result.output
    return out, result.json()


def _torch_greedy(folder: Path, prompt: str, new_tokens: int) -> list[int]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    input_ids = AutoTokenizer.from_pretrained(folder)(prompt, return_tensors="pt")["input_ids"]
    sequences = decode(model, input_ids, None, DecodingParams(max_new_tokens=new_tokens))
    return sequences[0, input_ids.shape[1]:].tolist()


def _copy(folder: Path, target: Path, **config_changes: Any) -> Path:
    """A copy of a genai folder, its decoder entry changed."""
    shutil.copytree(folder, target)
    config = json.loads((target / GENAI_CONFIG).read_text())
    config["model"]["decoder"].update(config_changes)
    (target / GENAI_CONFIG).write_text(json.dumps(config))
    return target


def _tamper(folder: Path, target: Path) -> Path:
    """`target` (a copy of `folder`, or `folder` itself) with the largest weight matrix of the decoder having a
    quarter of its columns scaled by 1.5."""
    import onnx
    from onnx import numpy_helper

    if target != folder:
        shutil.copytree(folder, target, ignore=shutil.ignore_patterns("model.onnx*"))
    model = onnx.load(folder / "model.onnx")
    weight = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)) if len(t.dims) == 2 else 0)
    values = numpy_helper.to_array(weight).copy()
    values[:, : values.shape[1] // 4] *= 1.5
    weight.CopyFrom(numpy_helper.from_array(values, weight.name))
    for old in target.glob("model.onnx*"):
        old.unlink()
    onnx.save(model, target / "model.onnx", save_as_external_data=True, location="model.onnx.data")
    return target


def test_export_genai_writes_a_verified_folder_and_says_which_engine(built: tuple[Path, dict[str, Any]]) -> None:
    out, data = built
    assert data["engine"] == "genai" and data["engine_reason"] == "--engine genai"
    assert data["passed"] and data["precision"] == "fp32" and data["family"] == "llama"
    assert {"model.onnx", "model.onnx.data", GENAI_CONFIG, "tokenizer.json"} <= set(data["files"])
    assert data["verified_tokens"] == 3 * 8 and all(p["divergence"] is None for p in data["prompts"])
    assert "identical" in data["verdict"] and sorted(p.name for p in out.iterdir()) == sorted(data["files"])
    assert not [p for p in out.parent.iterdir() if p.name != out.name]  # no temporary folder left beside it


def test_generate_on_the_folder_equals_pytorch_greedy(cli: Any, built: tuple[Path, dict[str, Any]],
                                                     llama: Path) -> None:
    out, _ = built
    result = cli("generate", out, "--prompt", PROMPT, "--max-new-tokens", "12", "--fixed-length", "--threads", "1",
                 "--repeat", "2", "--json")
    assert result.exit_code == 0, result.output
    data = result.json()
    row = data["results"][0]
    assert data["engine"] == "onnxruntime-genai" and row["reproducible"] and row["fixed_length_ok"]
    assert list(row["outputs"][0]["new_token_ids"]) == _torch_greedy(llama, PROMPT, 12)
    metrics = row["metrics"]
    assert metrics["ttft"]["median_ms"] > 0 and metrics["decode_tokens_per_s"] > 0 and metrics["runs"] == 2
    assert metrics["token_latency"]["p90_ms"] >= metrics["token_latency"]["median_ms"] > 0


def test_a_batch_generates_what_each_prompt_generates_alone(cli: Any, built: tuple[Path, dict[str, Any]],
                                                            llama: Path, tmp_path: Path) -> None:
    prompts = ("Hello there, how are you doing today", "a", "The model")
    (tmp_path / "prompts.txt").write_text("\n".join(prompts))
    result = cli("generate", built[0], "--prompts", tmp_path / "prompts.txt", "--max-new-tokens", "6",
                 "--fixed-length", "--warmup", "0", "--json")
    assert result.exit_code == 0, result.output
    outputs = result.json()["results"][0]["outputs"]
    assert [list(o["new_token_ids"]) for o in outputs] == [_torch_greedy(llama, p, 6) for p in prompts]


def test_generate_sampling_is_seeded_and_beams_run(cli: Any, built: tuple[Path, dict[str, Any]]) -> None:
    out, _ = built

    def tokens(*extra: str) -> list[list[int]]:
        result = cli("generate", out, "--prompt", PROMPT, "--max-new-tokens", "6", "--fixed-length", "--json",
                     "--warmup", "0", *extra)
        assert result.exit_code == 0, result.output
        return [list(r["outputs"][0]["new_token_ids"]) for r in result.json()["results"]]

    assert tokens("--strategy", "sample", "--seed", "3") == tokens("--strategy", "sample", "--seed", "3")
    assert tokens("--strategy", "sample", "--seed", "3") != tokens("--strategy", "sample", "--seed", "4")
    assert len(tokens("--strategy", "all")) == 3  # greedy, beam, sample: beam-sample is not the runtime's
    refused = cli("generate", out, "--prompt", PROMPT, "--strategy", "beam-sample")
    assert refused.exit_code == 2 and "greedy, beam and sample" in refused.stderr


def test_verify_parity_generate_on_a_genai_folder(cli: Any, built: tuple[Path, dict[str, Any]], llama: Path,
                                                  tmp_path: Path) -> None:
    out, _ = built
    good = cli("verify-parity", llama, out, "--generate", "--max-new-tokens", "5", "--json")
    assert good.exit_code == 0, good.output
    data = good.json()
    assert data["passed"] and data["runtime"] == "onnxruntime-genai" and data["preset"] == "fp32"
    assert len(data["prompts"][0]["passes"]) == 5  # the prompt pass and 4 cached passes, logits compared
    perplexity = data["perplexity"]  # review finding: the evaluation was ignored on a genai folder
    assert perplexity is not None and abs(perplexity["relative_change"]) < 1e-3 and perplexity["window"] == 128
    missing = cli("verify-parity", llama, out, "--generate", "--eval-text", tmp_path / "missing.txt")
    assert missing.exit_code == 3 and "evaluation text" in missing.stderr
    bad = cli("verify-parity", llama, _tamper(out, tmp_path / "tampered"), "--generate", "--prompt", PROMPT,
              "--max-new-tokens", "5")
    assert bad.exit_code == 6 and "generation parity failed" in bad.stderr
    assert "prompt pass" in bad.stderr or "diverge at step" in bad.stderr


@pytest.mark.parametrize(("change", "message"), [
    ({"filename": "../x.onnx"}, "outside the folder"),
    ({"filename": "/etc/passwd"}, "outside the folder"),
    ({"filename": "missing.onnx"}, "not in"),
])
def test_a_genai_config_pointing_elsewhere_is_refused(cli: Any, built: tuple[Path, dict[str, Any]], tmp_path: Path,
                                                      change: dict[str, str], message: str) -> None:
    folder = _copy(built[0], tmp_path / "copy", **change)
    result = cli("generate", folder, "--prompt", PROMPT, "--max-new-tokens", "2")
    assert result.exit_code == 3 and message in result.stderr and change["filename"] in result.stderr


def test_a_folder_without_genai_config_is_refused(cli: Any, built: tuple[Path, dict[str, Any]], llama: Path,
                                                  tmp_path: Path) -> None:
    folder = tmp_path / "no-config"
    shutil.copytree(built[0], folder)
    (folder / GENAI_CONFIG).unlink()
    result = cli("generate", folder, "--prompt", PROMPT)
    assert result.exit_code == 3 and "no genai_config.json" in result.stderr
    parity = cli("verify-parity", llama, folder, "--generate")
    assert parity.exit_code == 3 and "no genai_config.json" in parity.stderr
    with pytest.raises(InputError, match="not a readable genai config"):
        (folder / GENAI_CONFIG).write_text("{not json")
        read_genai_folder(folder)


@pytest.mark.slow  # the built-in GPT-2 trains for a few seconds on first use
def test_an_unsupported_family_exits_3_naming_it_and_leaves_nothing(cli: Any, tmp_path: Path) -> None:
    out = tmp_path / "gpt2-genai"  # a built-in model: saved as an HF folder in a scratch folder, then refused
    result = cli("export", "onnx", "builtin:tiny-gpt2", "--task", "causal-lm", "--engine", "genai", "-o", out)
    assert result.exit_code == 3 and "'gpt2'" in result.stderr and "--engine torch" in result.stderr
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_export_refusals(cli: Any, llama: Path, built: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    existing = cli("export", "onnx", llama, "--task", "causal-lm", "--engine", "genai", "-o", built[0])
    assert existing.exit_code == 5  # never overwritten without --force
    as_file = cli("export", "onnx", llama, "--task", "causal-lm", "--engine", "genai", "-o", tmp_path / "x.onnx")
    assert as_file.exit_code == 2 and "writes a folder" in as_file.stderr
    torch_int4 = cli("export", "onnx", llama, "--task", "causal-lm", "--engine", "torch", "--precision", "int4",
                     "-o", tmp_path / "x.onnx")
    assert torch_int4.exit_code == 2 and "compress int4" in torch_int4.stderr
    plain = cli("export", "onnx", llama, "--no-kv-cache", "--engine", "genai", "-o", tmp_path / "y.onnx")
    assert plain.exit_code == 2 and "KV-cache export" in plain.stderr
    assert not list(tmp_path.iterdir())


def test_missing_runtime_is_an_input_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime_genai", None)  # `import onnxruntime_genai` raises ImportError
    with pytest.raises(InputError, match="not installed") as caught:
        require_genai()
    assert "onnxruntime-genai>=0.18" in (caught.value.hint or "")


@pytest.mark.slow
def test_engine_auto_picks_genai_for_a_folder_and_torch_for_a_file_or_an_unsupported_family(
        cli: Any, llama: Path, tmp_path: Path) -> None:
    folder = cli("export", "onnx", llama, "--task", "causal-lm", "-o", tmp_path / "auto", "--json")
    assert folder.exit_code == 0, folder.output
    assert folder.json()["engine"] == "genai" and folder.json()["engine_reason"].startswith("auto:")
    single = cli("export", "onnx", llama, "--task", "causal-lm", "-o", tmp_path / "auto.onnx", "--json")
    assert single.exit_code == 0, single.output
    assert single.json()["engine"] == "torch" and ".onnx file" in single.json()["engine_reason"]
    gpt2 = cli("export", "onnx", "builtin:tiny-gpt2", "--task", "causal-lm", "-o", tmp_path / "gpt2", "--json")
    assert gpt2.exit_code == 0, gpt2.output
    assert gpt2.json()["engine"] == "torch" and "'gpt2'" in gpt2.json()["engine_reason"]
    assert (tmp_path / "gpt2" / "model.onnx").is_file() and (tmp_path / "gpt2" / "tokenizer.json").is_file()


@pytest.mark.slow
def test_int4_build_is_smaller_and_reported_not_judged(llama: Path, tmp_path: Path) -> None:
    import onnx

    from mlops_cli.services.onnx_lm.genai_export import GenaiExportOptions, run

    fp32 = run(ModelRef.parse(str(llama)), GenaiExportOptions(output=tmp_path / "fp32", max_new_tokens=4))
    int4 = run(ModelRef.parse(str(llama)), GenaiExportOptions(output=tmp_path / "int4", precision="int4",
                                                              max_new_tokens=4))
    assert int4.passed and int4.precision == "int4"
    assert int4.files["model.onnx.data"] < 0.6 * fp32.files["model.onnx.data"]
    assert "MatMulNBits" in {n.op_type for n in onnx.load(tmp_path / "int4" / "model.onnx").graph.node}


@pytest.mark.slow
def test_a_build_that_does_not_match_exits_6_or_makes_auto_use_torch(cli: Any, llama: Path, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A build tampered with before its verification: --engine genai keeps it and exits 6 naming the divergence;
    --engine auto discards it and exports with torch, saying so."""
    from mlops_cli.services.onnx_lm import genai_export

    verify = genai_export.verify
    monkeypatch.setattr(genai_export, "verify", lambda folder, *rest: verify(_tamper(folder, folder), *rest))
    kept = tmp_path / "kept"
    bad = cli("export", "onnx", llama, "--task", "causal-lm", "--engine", "genai", "-o", kept)
    assert bad.exit_code == 6 and "does not match" in bad.stderr and (kept / GENAI_CONFIG).is_file()
    auto = cli("export", "onnx", llama, "--task", "causal-lm", "-o", tmp_path / "auto", "--json")
    assert auto.exit_code == 0, auto.output
    data = auto.json()
    assert data["engine"] == "torch" and "did not verify" in data["engine_reason"]
    assert any("discarded" in w for w in data["warnings"]) and (tmp_path / "auto" / "model.onnx").is_file()


def test_a_row_stopping_on_eos_counts_it_like_the_onnx_and_pytorch_paths(cli: Any, zoo_dir: Path,
                                                                         tmp_path: Path) -> None:
    """Review finding: the runtime leaves the EOS that ends a run out of get_sequence, so the genai row was one
    token short and stopped on 'max_new_tokens'. The trained tiny Llama ends this prompt with EOS (token 0)."""
    folder = tmp_path / "genai"
    assert cli("export", "onnx", zoo_dir / "tiny-llama", "-o", folder).exit_code == 0
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Once upon a time there was\nThe model")

    def outputs(model: Path) -> list[tuple[list[int], str]]:
        result = cli("generate", model, "--prompts", prompts, "--max-new-tokens", "8", "--warmup", "0", "--json")
        assert result.exit_code == 0, result.output
        return [(list(o["new_token_ids"]), o["stop_reason"]) for o in result.json()["results"][0]["outputs"]]

    genai, pytorch = outputs(folder), outputs(zoo_dir / "tiny-llama")
    assert genai == pytorch and genai[0][1] == "eos" and genai[0][0][-1] == 0
    for option in (("--max-memory", "cpu=1GiB"), ("--offload-folder", str(tmp_path / "off"))):
        refused = cli("generate", folder, "--prompt", "a", *option)
        assert refused.exit_code == 2 and "--offload-folder" in refused.stderr, option
