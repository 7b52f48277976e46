"""The conformance matrix (issue #13): every command on real architectures, with the exit code it must give.

The models and their expected verdicts live in tests/conformance_models.py, shared with `make conformance`
(scripts/conformance.py), which runs the whole matrix and prints exit code, verdict and wall time per step.

What runs here, to stay within the suite's time budget on 2 cores:
- every model of the matrix, every command except the ONNX export and its parity check (~1-2 s a model);
- the exports and their parity checks (~5-30 s a model) only for the families in EXPORTED: an encoder with
  an MLM head (BERT), a tied-embedding decoder (GPT-2), a rotary/GQA decoder (Llama), a vision transformer
  (ViT), a CNN with BatchNorm (HF ResNet), facenet's trained PNet, silero-vad's real files and timm's
  resnet10t. RoBERTa, DistilBERT, Qwen2, Mistral, Phi-3, T5 (dynamo fails, the legacy fallback runs: ~35 s),
  bare BERT, RNet/ONet and the other timm models are exported only by `make conformance`.
Models whose package is missing (timm without a torchvision built for the installed torch; silero-vad and
facenet-pytorch before `make conformance` installed them) are skipped with that reason, shown by `-ra`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conformance_models import LOGIT_STD, Outcome, Subject, all_subjects, run_step

EXPORTED = {"bert", "gpt2", "llama", "vit", "resnet-hf", "facenet-mtcnn-pnet", "silero-vad",
            "timm-resnet10t"}
NAMES = [subject.name for subject in all_subjects(Path("unused"))]
SLOW = {subject.name for subject in all_subjects(Path("unused")) if subject.slow}


@pytest.fixture(scope="session")
def subjects(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Subject]:
    """The matrix over one session folder: models are built there on first use (a few seconds each)."""
    return {subject.name: subject for subject in all_subjects(tmp_path_factory.mktemp("conformance"))}


def _describe(outcome: Outcome) -> str:
    return (f"{outcome.subject} / {outcome.command}: exit {outcome.exit_code}, expected {outcome.expected}"
            f"{f' ({outcome.reason})' if outcome.reason else ''}; verdict: {outcome.verdict[:400]}")


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in NAMES])
def test_every_command_gives_the_expected_verdict(name: str, subjects: dict[str, Subject]) -> None:
    subject = subjects[name]
    if subject.unavailable:
        pytest.skip(subject.unavailable)
    if subject.prepare:
        subject.prepare()
    steps = [step for step in subject.steps if name in EXPORTED or not step.heavy]
    outcomes = [run_step(name, step) for step in steps]
    wrong = [outcome for outcome in outcomes if not outcome.as_expected]
    assert not wrong, "\n".join(_describe(outcome) for outcome in wrong)


@pytest.mark.parametrize("name", ["gpt2", "roberta"])
def test_random_heads_give_logits_of_trained_magnitude(name: str, subjects: dict[str, Subject]) -> None:
    """The point of scaling: tolerance checks meet logits of tens, as on trained checkpoints."""
    import torch
    import transformers

    subject = subjects[name]
    assert subject.prepare is not None
    subject.prepare()
    folder = subject.steps[0].args[1]
    loader = {"gpt2": transformers.GPT2LMHeadModel, "roberta": transformers.RobertaForSequenceClassification}[name]
    model = loader.from_pretrained(folder).eval()
    ids = torch.randint(3, 1000, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    assert LOGIT_STD / 2 < float(logits.std()) < LOGIT_STD * 2
    assert float(logits.abs().max()) > LOGIT_STD  # logits of tens
