"""Encoder-decoder LMs on ONNX Runtime (issue #15): Optimum's folder layout (encoder, decoder, decoder with past),
generation from the folder, greedy and logit parity against PyTorch, refusals.

A tiny T5 (relative attention bias, tied embeddings with their logit scaling) and a tiny BART (learned absolute
positions, final logits bias), random weights drawn wide enough that greedy decoding does not repeat one token,
both with the zoo's byte-level BPE tokenizer; each exported once per module.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from mlops_cli.core.contract import ModelRef
from mlops_cli.core.errors import InputError
from mlops_cli.core.loading import is_seq2seq_lm_folder
from mlops_cli.services.decoding import DecodingParams
from mlops_cli.services.generate import GenerateOptions
from mlops_cli.services.generate import run as generate_run
from mlops_cli.services.onnx_lm import GenerationParityOptions, parity_run
from mlops_cli.services.onnx_lm.seq2seq_export import Seq2SeqExportOptions, export_seq2seq, run
from mlops_cli.services.onnx_lm.seq2seq_generate import TorchSeq2Seq, encode_sources, seq2seq_decode

FAMILIES = ("t5", "bart")
PROMPTS = ("The model", "Once upon a time there was", "a")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tokenizer() -> Any:
    from mlops_cli.core import zoo

    tokenizer = zoo.gpt2_tokenizer()
    tokenizer.pad_token = zoo.BPE_SPECIAL
    return tokenizer


def _model(family: str, vocab_size: int, special: int) -> Any:
    import transformers

    torch.manual_seed(0)
    ids = dict(pad_token_id=special, eos_token_id=special, decoder_start_token_id=special)
    if family == "t5":
        config = transformers.T5Config(vocab_size=vocab_size, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
                                       initializer_factor=16.0, architectures=["T5ForConditionalGeneration"], **ids)
        return transformers.T5ForConditionalGeneration(config).eval()
    config = transformers.BartConfig(vocab_size=vocab_size, d_model=32, encoder_layers=2, decoder_layers=2,
                                     encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                                     decoder_ffn_dim=64, max_position_embeddings=64, init_std=0.5, bos_token_id=special,
                                     forced_eos_token_id=None, architectures=["BartForConditionalGeneration"], **ids)
    return transformers.BartForConditionalGeneration(config).eval()


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """HF folders (model + tokenizer) of both families."""
    root = tmp_path_factory.mktemp("seq2seq")
    tokenizer = _tokenizer()
    for family in FAMILIES:
        _model(family, len(tokenizer), tokenizer.pad_token_id).save_pretrained(root / family)
        tokenizer.save_pretrained(root / family)
    return {family: root / family for family in FAMILIES}


@pytest.fixture(scope="module")
def exported(folders: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("seq2seq-onnx")
    return {family: run(ModelRef.parse(str(folder)), Seq2SeqExportOptions(output=out / family))
            for family, folder in folders.items()}


def _hf(folder: Path) -> Any:
    from transformers import AutoModelForSeq2SeqLM

    return AutoModelForSeq2SeqLM.from_pretrained(folder).eval()


def _dims(value: Any) -> list[Any]:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


@pytest.mark.parametrize("family", FAMILIES)
def test_export_writes_optimum_layout_with_dynamic_dims_and_runs_alone(exported: dict[str, Any], family: str) -> None:
    import onnx

    report = exported[family]
    folder = Path(report.output)
    assert {"encoder_model.onnx", "decoder_model.onnx", "decoder_with_past_model.onnx", "config.json",
            "generation_config.json", "tokenizer.json"} <= set(report.files) and report.tokenizer
    encoder = onnx.load(folder / "encoder_model.onnx").graph
    assert [i.name for i in encoder.input] == ["input_ids", "attention_mask"]
    assert _dims(encoder.output[0]) == ["batch_size", "encoder_sequence_length", 32]
    first = onnx.load(folder / "decoder_model.onnx").graph
    assert [i.name for i in first.input] == ["encoder_attention_mask", "input_ids", "encoder_hidden_states"]
    own = [f"present.{i}.decoder.{k}" for i in range(2) for k in ("key", "value")]
    cross = [name.replace("decoder", "encoder") for name in own]
    assert [o.name for o in first.output] == ["logits", *own, *cross]
    with_past = onnx.load(folder / "decoder_with_past_model.onnx").graph
    inputs = {i.name: _dims(i) for i in with_past.input}
    assert [o.name for o in with_past.output] == ["logits", *own]  # the cross-attention cache does not change
    assert inputs["past_key_values.1.decoder.value"] == ["batch_size", 2, "past_decoder_sequence_length", 16]
    assert inputs["past_key_values.0.encoder.key"] == ["batch_size", 2, "encoder_sequence_length_out", 16]
    assert inputs["input_ids"] == ["batch_size", "decoder_sequence_length"]
    assert _dims(with_past.output[1])[2] == "past_decoder_sequence_length + decoder_sequence_length"
    assert report.graphs["decoder_with_past_model.onnx"]["inputs"] == tuple(inputs)  # the names as written
    assert report.checked["decoder_with_past_model.onnx"] and report.family == family and not report.warnings


@pytest.mark.parametrize("family", FAMILIES)
def test_onnx_greedy_equals_pytorch_greedy_and_every_pass_matches(folders: dict[str, Path],
                                                                  exported: dict[str, Any], family: str) -> None:
    report = parity_run(ModelRef.parse(str(folders[family])),
                        GenerationParityOptions(candidate=Path(exported[family].output), prompts=PROMPTS,
                                                max_new_tokens=8))
    assert report.passed, report.verdict
    assert all(p.reference_tokens == p.candidate_tokens and len(p.reference_tokens) == 8 for p in report.prompts)
    assert all(len(p.passes) == 8 and all(d.diff.passed for d in p.passes) for p in report.prompts)
    assert len({token for p in report.prompts for token in p.reference_tokens}) >= 3  # not one token everywhere


@pytest.mark.parametrize(("family", "strategy"), [("t5", "greedy"), ("bart", "sample")])
def test_generate_on_the_folder_matches_model_generate_on_a_padded_batch(folders: dict[str, Path],
                                                                         exported: dict[str, Any], family: str,
                                                                         strategy: str) -> None:
    """`mlops generate FOLDER`: the tokens `model.generate` gives (greedy; sampling with the same seed), with the
    figures of any generation."""
    options = GenerateOptions(prompts=PROMPTS, strategy=strategy, max_new_tokens=6, fixed_length=True, seed=3,
                              repeat=2, warmup=0, threads=1)
    report = generate_run(ModelRef.parse(exported[family].output), options)
    model, tokenizer = _hf(folders[family]), _tokenizer()
    input_ids, mask = encode_sources(tokenizer, PROMPTS)
    torch.manual_seed(3)
    expected = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6,
                              do_sample=strategy == "sample", top_k=50 if strategy == "sample" else None)
    result = report.results[0]
    assert [list(o.new_token_ids) for o in result.outputs] == expected[:, 1:].tolist()
    assert result.reproducible and report.batch_size == 3 and result.engine == "onnxruntime"
    assert result.metrics.runs == 2 and result.metrics.new_tokens == 18
    assert result.metrics.ttft is not None and result.metrics.decode_tokens_per_s is not None


def test_the_pytorch_loop_is_model_generate(folders: dict[str, Path]) -> None:
    """The reference side of the parity check runs our loop: it must be what `model.generate` does."""
    model, tokenizer = _hf(folders["t5"]), _tokenizer()
    input_ids, mask = encode_sources(tokenizer, PROMPTS)
    ours = seq2seq_decode(TorchSeq2Seq(model), input_ids, mask, DecodingParams(max_new_tokens=8),
                          model.config.decoder_start_token_id)
    expected = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=8, min_new_tokens=8,
                              do_sample=False)
    assert torch.equal(ours, expected)


def _tamper_decoder(folder: Path, target: Path, output: str | None = None) -> Path:
    """A copy of `folder` whose first decoder is wrong: its largest weight scaled by 1.5 (or, with `output`, that
    cache output scaled after the attention used it: only the cached passes read it)."""
    import shutil

    import onnx
    from onnx import helper, numpy_helper

    shutil.copytree(folder, target)
    model = onnx.load(target / "decoder_model.onnx")
    if output is None:
        weight = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)) if len(t.dims) == 2 else 0)
        weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * 1.5, weight.name))
    else:
        for node in model.graph.node:
            for names in (node.input, node.output):
                for index, name in enumerate(names):
                    if name == output:
                        names[index] = f"{output}.raw"
        model.graph.initializer.append(numpy_helper.from_array(np.array(1.5, dtype=np.float32), "tamper.scale"))
        model.graph.node.append(helper.make_node("Mul", [f"{output}.raw", "tamper.scale"], [output]))
    onnx.save(model, target / "decoder_model.onnx")
    return target


def test_a_cache_only_fault_passes_the_first_pass_and_is_named_at_the_first_cached_step(
        folders: dict[str, Path], exported: dict[str, Any], tmp_path: Path) -> None:
    tampered = _tamper_decoder(Path(exported["bart"].output), tmp_path / "cache-fault", "present.0.encoder.value")
    report = parity_run(ModelRef.parse(str(folders["bart"])),
                        GenerationParityOptions(candidate=tampered, prompts=PROMPTS[:1], max_new_tokens=4))
    result = report.prompts[0]
    assert not report.passed and result.passes[0].diff.passed
    assert result.first_failing_pass is not None and result.first_failing_pass.step == 1


@pytest.mark.slow
def test_commands_export_generate_verify_and_a_tampered_folder_exits_6(cli: Any, folders: dict[str, Path],
                                                                       tmp_path: Path) -> None:
    """The path a user walks: an encoder-decoder LM exported to a folder (the task found from its config),
    generated from, verified; a tampered copy fails verification with exit 6."""
    out = tmp_path / "t5-onnx"
    exported = cli("export", "onnx", folders["t5"], "-o", out, "--json")
    assert exported.exit_code == 0, exported.output
    assert exported.json()["graphs"]["decoder_model.onnx"]["outputs"][0] == "logits"
    again = cli("export", "onnx", folders["t5"], "-o", out)
    assert again.exit_code == 5 and "--force" in again.stderr
    ignored = cli("export", "onnx", folders["t5"], "-o", out, "--force", "--static")
    assert ignored.exit_code == 2 and "--task seq2seq-lm" in ignored.stderr
    generated = cli("generate", out, "--prompt", "The model", "--max-new-tokens", "4", "--fixed-length", "--json")
    assert generated.exit_code == 0, generated.output
    data = generated.json()
    assert data["engine"] == "onnxruntime" and data["results"][0]["outputs"][0]["new_tokens"] == 4
    good = cli("verify-parity", folders["t5"], out, "--generate", "--max-new-tokens", "4", "--json")
    assert good.exit_code == 0, good.output
    assert good.json()["passed"] and good.json()["preset"] == "fp32"
    tampered = _tamper_decoder(out, tmp_path / "tampered")
    bad = cli("verify-parity", folders["t5"], tampered, "--generate", "--prompt", "The model", "--max-new-tokens", "4")
    assert bad.exit_code == 6 and "generation parity failed" in bad.stderr
    assert "diverge at step 1" in bad.stderr or "logits differ at the prompt pass" in bad.stderr


def test_a_speech_encoder_decoder_is_refused_by_name_with_exit_3_and_nothing_written(cli: Any,
                                                                                     tmp_path: Path) -> None:
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    config = WhisperConfig(vocab_size=64, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                           decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, num_mel_bins=8,
                           max_source_positions=8, max_target_positions=8, pad_token_id=0, bos_token_id=1,
                           eos_token_id=2, decoder_start_token_id=1)
    WhisperForConditionalGeneration(config).save_pretrained(tmp_path / "whisper")
    assert is_seq2seq_lm_folder(tmp_path / "whisper")  # so exporting it to a folder takes this path by default
    result = cli("export", "onnx", tmp_path / "whisper", "-o", tmp_path / "out")
    assert result.exit_code == 3, result.output
    assert "'whisper' model family" in result.stderr and "input_features" in result.stderr
    assert not (tmp_path / "out").exists()


def test_an_export_whose_graph_differs_from_the_model_is_refused_and_nothing_written(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Every graph is run against the model before the folder is moved into place; an old folder survives."""
    import onnx
    from onnx import numpy_helper

    from mlops_cli.services.onnx_lm import seq2seq_export as module

    def save_broken(written: Path, external: bool) -> None:
        if written.name == "decoder_with_past_model.onnx":
            model = onnx.load(str(written))
            weight = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
            weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * 1.5, weight.name))
            onnx.save(model, str(written))

    monkeypatch.setattr(module, "gather_weights", save_broken)
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("kept")
    with pytest.raises(InputError, match=r"'t5' model family.*decoder_with_past_model.onnx.*differs") as caught:
        export_seq2seq(_model("t5", 64, 0), target, force=True)
    assert caught.value.exit_code == 3
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and [p.name for p in target.iterdir()] == ["old.txt"]


def test_only_encoder_decoder_lm_folders_are_detected(folders: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    assert is_seq2seq_lm_folder(folders["bart"]) and not is_seq2seq_lm_folder(tmp_path)
    assert not is_seq2seq_lm_folder(tmp_path / "missing") and not is_seq2seq_lm_folder(None)


def test_generation_defaults_the_loop_does_not_apply_are_named(exported: dict[str, Any], tmp_path: Path) -> None:
    """BART and Marian checkpoints ship generation configs (forced EOS, beams, banned pad token) that
    `model.generate` applies by default: the ONNX loop says which it leaves out rather than differing silently."""
    import shutil

    folder = shutil.copytree(exported["bart"].output, tmp_path / "bart")
    config = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**config, "num_beams": 4, "forced_eos_token_id": 2,
                                                               "min_length": 0}))
    report = generate_run(ModelRef.parse(str(folder)), GenerateOptions(prompts=("a",), max_new_tokens=2, warmup=0))
    warning = next(w for w in report.warnings if "generation config" in w)
    assert "num_beams=4, forced_eos_token_id=2" in warning and "min_length" not in warning
    plain = generate_run(ModelRef.parse(exported["bart"].output),
                         GenerateOptions(prompts=("a",), max_new_tokens=2, warmup=0))
    assert not plain.warnings


def test_the_decoder_starts_from_decoder_start_token_id_before_any_bos(tmp_path: Path) -> None:
    from mlops_cli.services.onnx_lm.seq2seq_generate import decoder_start_token

    (tmp_path / "generation_config.json").write_text(json.dumps({"bos_token_id": 0}))
    (tmp_path / "config.json").write_text(json.dumps({"decoder_start_token_id": 2, "bos_token_id": 0}))
    assert decoder_start_token(tmp_path) == 2
    (tmp_path / "config.json").write_text(json.dumps({}))
    assert decoder_start_token(tmp_path) == 0
    (tmp_path / "generation_config.json").unlink()
    with pytest.raises(InputError, match="no decoder_start_token_id"):
        decoder_start_token(tmp_path)


def test_no_kv_cache_gives_an_encoder_decoder_its_plain_graph(cli: Any, folders: dict[str, Path],
                                                              tmp_path: Path) -> None:
    """--no-kv-cache was ignored for an encoder-decoder exported to a folder (the cache layout was written)."""
    out = tmp_path / "plain"
    result = cli("export", "onnx", folders["t5"], "-o", out, "--no-kv-cache", "--optimize", "none", "--json")
    assert result.exit_code == 0, result.output
    assert out.is_file() and "decoder_input_ids" in [value["name"] for value in result.json()["inputs"]]
