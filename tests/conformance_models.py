"""The conformance matrix (issue #13): real architectures, every command, the verdict each one must give.

Shared by tests/test_conformance.py (pytest) and scripts/conformance.py (`make conformance`, a report).

Three kinds of model:
- Hugging Face families built from tiny configs (hidden 32, 2 layers, vocab 1000) with random weights, their
  output head scaled so logits are of the size trained models give (a standard deviation of ~10, extremes of
  tens): tolerance logic (atol + rtol * |reference|) then meets the magnitudes it meets on real checkpoints.
- timm CNN/ViT families (random init), saved as state_dicts and rebuilt with `--arch tests.conformance_models:...`.
  timm imports torchvision; without a torchvision built for the installed torch they are reported as
  unavailable (the reason names what is missing), never dropped silently.
- Trained weights from the package registry: silero-vad (a TorchScript archive and ONNX files, one of them
  the "half" variant) and facenet-pytorch's MTCNN state_dicts, loaded into the copies of PNet/RNet/ONet below
  (facenet_pytorch itself imports torchvision; its three networks are small plain conv nets).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SEED = 0
LOGIT_STD = 10.0  # trained classifiers and LMs give logits of tens; random init gives ~0.1-1
VOCAB = 1000
TEXT = dict(vocab_size=VOCAB, max_position_embeddings=128)
DECODER = dict(TEXT, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
ENCODER = dict(TEXT, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)


# ---------------------------------------------------------------- Hugging Face families


@dataclass(frozen=True)
class HfFamily:
    """A transformers family: its config class, the head loaded, and the config's keyword arguments."""

    name: str
    config: str
    model: str
    kwargs: dict[str, Any]
    scale: bool = True  # scale the head to trained magnitudes (bare base models have no logits)


HF_FAMILIES = (
    HfFamily("bert", "BertConfig", "BertForMaskedLM", ENCODER),
    HfFamily("bert-base", "BertConfig", "BertModel", ENCODER, scale=False),
    HfFamily("roberta", "RobertaConfig", "RobertaForSequenceClassification",
             dict(ENCODER, max_position_embeddings=130, pad_token_id=1, num_labels=3)),
    HfFamily("distilbert", "DistilBertConfig", "DistilBertForSequenceClassification",
             dict(vocab_size=VOCAB, max_position_embeddings=128, dim=32, hidden_dim=64, n_layers=2, n_heads=2)),
    HfFamily("gpt2", "GPT2Config", "GPT2LMHeadModel",
             dict(vocab_size=VOCAB, n_positions=128, n_embd=32, n_layer=2, n_head=2, bos_token_id=1,
                  eos_token_id=2)),
    HfFamily("llama", "LlamaConfig", "LlamaForCausalLM", DECODER),
    HfFamily("qwen2", "Qwen2Config", "Qwen2ForCausalLM", DECODER),
    HfFamily("mistral", "MistralConfig", "MistralForCausalLM", dict(DECODER, sliding_window=64)),
    HfFamily("phi3", "Phi3Config", "Phi3ForCausalLM", DECODER),
    HfFamily("t5", "T5Config", "T5ForConditionalGeneration",
             dict(vocab_size=VOCAB, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
                  decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)),
    HfFamily("vit", "ViTConfig", "ViTForImageClassification",
             dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=64, num_labels=10)),
    HfFamily("resnet-hf", "ResNetConfig", "ResNetForImageClassification",
             dict(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic", num_labels=10)),
)


def build_hf(family: HfFamily, folder: Path) -> Path:
    """Build `family` with random weights (fixed seed), scale its head, save it as a Hugging Face folder."""
    import torch
    import transformers

    torch.manual_seed(SEED)
    config = getattr(transformers, family.config)(**family.kwargs)
    model = getattr(transformers, family.model)(config).eval()
    if family.scale:
        scale_head(model, _example(config))
    model.save_pretrained(folder)
    return folder


def _example(config: Any) -> dict[str, Any]:
    import torch

    generator = torch.Generator().manual_seed(SEED)
    if hasattr(config, "image_size") or config.model_type == "resnet":
        size = getattr(config, "image_size", 32)
        return {"pixel_values": torch.randn(2, config.num_channels, size, size, generator=generator)}
    ids = torch.randint(3, VOCAB, (2, 16), generator=generator)
    example = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if config.is_encoder_decoder:
        example["decoder_input_ids"] = ids[:, :8]
    return example


def scale_head(model: Any, example: dict[str, Any], target_std: float = LOGIT_STD) -> float:
    """Multiply the last Linear layer (the head; tied heads scale their embedding too) until logits have
    `target_std`. Returns the standard deviation reached. Norm layers downstream of a tied embedding make one
    pass inexact, so it repeats a few times."""
    import torch

    head = [module for module in model.modules() if isinstance(module, torch.nn.Linear)][-1]
    std = 0.0
    with torch.no_grad():
        for _ in range(4):
            std = float(model(**example).logits.float().std())
            head.weight.mul_(target_std / std)
            if head.bias is not None:
                head.bias.mul_(target_std / std)
        return float(model(**example).logits.float().std())


# ---------------------------------------------------------------- timm families (state_dict + --arch factory)


def timm_missing() -> str | None:
    """Why timm families cannot run here (None when they can)."""
    if importlib.util.find_spec("timm") is None:
        return "timm is not installed (make conformance installs it)"
    try:
        import timm  # noqa: F401  (timm imports torchvision at import time)
    except (ImportError, RuntimeError) as exc:
        return f"timm cannot be imported: {str(exc).splitlines()[0]} (it needs a torchvision built for this torch)"
    return None


def make_timm_resnet(num_classes: int = 10) -> Any:
    """Factory for `--arch tests.conformance_models:make_timm_resnet`: timm's resnet10t, random init."""
    import timm

    return timm.create_model("resnet10t", pretrained=False, num_classes=num_classes)


def make_timm_efficientnet(num_classes: int = 10) -> Any:
    """timm's smallest EfficientNet-style model (depthwise convs, squeeze-excite, BatchNorm)."""
    import timm

    return timm.create_model("efficientnet_b0", pretrained=False, num_classes=num_classes,
                             channel_multiplier=0.25, depth_multiplier=0.25)


def make_timm_vit(num_classes: int = 10) -> Any:
    """timm's ViT on 32x32 images: patch 8, width 64, 2 blocks."""
    import timm

    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=num_classes, img_size=32,
                             patch_size=8, embed_dim=64, depth=2, num_heads=2)


TIMM_FAMILIES = {"timm-resnet10t": "make_timm_resnet", "timm-efficientnet": "make_timm_efficientnet",
                 "timm-vit": "make_timm_vit"}


def save_timm(factory_name: str, path: Path) -> Path:
    import torch

    torch.manual_seed(SEED)
    model = globals()[factory_name]().eval()
    image = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(SEED))
    with torch.no_grad():
        head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
        factor = LOGIT_STD / float(model(image).std())
        head.weight.mul_(factor)
        head.bias.mul_(factor)
    torch.save(model.state_dict(), path)
    return path


# ---------------------------------------------------------------- facenet-pytorch's MTCNN (trained weights)

# Copies of facenet_pytorch.models.mtcnn's PNet/RNet/ONet (architecture only; facenet_pytorch imports
# torchvision at import time). Their state_dicts ship in the facenet-pytorch wheel, under facenet_pytorch/data.
_MTCNN: dict[str, type] = {}


def _define_mtcnn() -> dict[str, type]:
    if _MTCNN:
        return _MTCNN
    import torch
    from torch import nn

    class PNet(nn.Module):
        """Proposal net: fully convolutional, face probability and box offsets per 12x12 window."""

        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(3, 10, kernel_size=3)
            self.prelu1 = nn.PReLU(10)
            self.pool1 = nn.MaxPool2d(2, 2, ceil_mode=True)
            self.conv2 = nn.Conv2d(10, 16, kernel_size=3)
            self.prelu2 = nn.PReLU(16)
            self.conv3 = nn.Conv2d(16, 32, kernel_size=3)
            self.prelu3 = nn.PReLU(32)
            self.conv4_1 = nn.Conv2d(32, 2, kernel_size=1)
            self.softmax4_1 = nn.Softmax(dim=1)
            self.conv4_2 = nn.Conv2d(32, 4, kernel_size=1)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            x = self.prelu3(self.conv3(self.prelu2(self.conv2(self.pool1(self.prelu1(self.conv1(x)))))))
            return self.conv4_2(x), self.softmax4_1(self.conv4_1(x))

    class RNet(nn.Module):
        """Refine net on 24x24 crops."""

        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(3, 28, kernel_size=3)
            self.prelu1 = nn.PReLU(28)
            self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
            self.conv2 = nn.Conv2d(28, 48, kernel_size=3)
            self.prelu2 = nn.PReLU(48)
            self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
            self.conv3 = nn.Conv2d(48, 64, kernel_size=2)
            self.prelu3 = nn.PReLU(64)
            self.dense4 = nn.Linear(576, 128)
            self.prelu4 = nn.PReLU(128)
            self.dense5_1 = nn.Linear(128, 2)
            self.softmax5_1 = nn.Softmax(dim=1)
            self.dense5_2 = nn.Linear(128, 4)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            x = self.pool2(self.prelu2(self.conv2(self.pool1(self.prelu1(self.conv1(x))))))
            x = self.prelu3(self.conv3(x)).permute(0, 3, 2, 1).contiguous()
            x = self.prelu4(self.dense4(x.view(x.shape[0], -1)))
            return self.dense5_2(x), self.softmax5_1(self.dense5_1(x))

    class ONet(nn.Module):
        """Output net on 48x48 crops: probability, box and five landmarks."""

        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(3, 32, kernel_size=3)
            self.prelu1 = nn.PReLU(32)
            self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
            self.conv2 = nn.Conv2d(32, 64, kernel_size=3)
            self.prelu2 = nn.PReLU(64)
            self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
            self.conv3 = nn.Conv2d(64, 64, kernel_size=3)
            self.prelu3 = nn.PReLU(64)
            self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
            self.conv4 = nn.Conv2d(64, 128, kernel_size=2)
            self.prelu4 = nn.PReLU(128)
            self.dense5 = nn.Linear(1152, 256)
            self.prelu5 = nn.PReLU(256)
            self.dense6_1 = nn.Linear(256, 2)
            self.softmax6_1 = nn.Softmax(dim=1)
            self.dense6_2 = nn.Linear(256, 4)
            self.dense6_3 = nn.Linear(256, 10)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            x = self.pool2(self.prelu2(self.conv2(self.pool1(self.prelu1(self.conv1(x))))))
            x = self.pool3(self.prelu3(self.conv3(x)))
            x = self.prelu4(self.conv4(x)).permute(0, 3, 2, 1).contiguous()
            x = self.prelu5(self.dense5(x.view(x.shape[0], -1)))
            return self.dense6_2(x), self.dense6_3(x), self.softmax6_1(self.dense6_1(x))

    for cls in (PNet, RNet, ONet):
        cls.__module__ = __name__
    _MTCNN.update(PNet=PNet, RNet=RNet, ONet=ONet)
    return _MTCNN


def PNet() -> Any:
    """Factory for `--arch tests.conformance_models:PNet`."""
    return _define_mtcnn()["PNet"]()


def RNet() -> Any:
    return _define_mtcnn()["RNet"]()


def ONet() -> Any:
    return _define_mtcnn()["ONet"]()


def package_file(distribution: str, suffix: str) -> Path | None:
    """A file shipped in an installed distribution's wheel (found from its RECORD, without importing it)."""
    try:
        files = importlib.metadata.files(distribution) or []
    except importlib.metadata.PackageNotFoundError:
        return None
    return next((Path(str(f.locate())) for f in files if str(f).endswith(suffix)), None)


# ---------------------------------------------------------------- the matrix


@dataclass(frozen=True)
class Step:
    """One command on one model, with the exit code a correct mlops gives and why when it is not 0."""

    command: str
    args: tuple[str, ...]
    expect: int = 0
    reason: str = ""
    heavy: bool = False  # an export or the parity check of its file: ~5-30 s a model on 2 cores


@dataclass(frozen=True)
class Subject:
    """A model of the matrix and the steps run on it (in order: later steps read what earlier ones wrote)."""

    name: str
    steps: tuple[Step, ...]
    unavailable: str | None = None  # why this model cannot be built here
    slow: bool = False
    prepare: Callable[[], object] | None = field(default=None, compare=False)


def hf_steps(model: Path, work: Path) -> tuple[Step, ...]:
    """Every command on a Hugging Face folder (all must pass: no family here has a legitimate failure)."""
    onnx, half = work / "model.onnx", work / "fp16"
    return (
        Step("inspect", ("inspect", str(model))),
        Step("summarize", ("summarize", str(model), "--repeats", "0")),
        Step("export onnx", ("export", "onnx", str(model), "-o", str(onnx), "--force", "--repeats", "0",
                             "--no-kv-cache"), heavy=True),  # the plain graph, which verify-parity feeds
        Step("verify-parity onnx", ("verify-parity", str(model), str(onnx), "--repeats", "0"), heavy=True),
        Step("compress half", ("compress", "half", str(model), "-o", str(half), "--force", "--repeats", "1")),
        Step("verify-parity fp16", ("verify-parity", str(model), str(half), "--preset", "fp16", "--repeats", "0")),
        Step("prune", ("prune", str(model), "--amount", "0.2", "--repeats", "1")),
    )


def weights_steps(weights: Path, work: Path, arch: str, spec: str) -> tuple[Step, ...]:
    """Every command on a state_dict rebuilt by an --arch factory, fed `spec` (an --input spec with batch=2);
    torch.export also gets a batch-1 example (its size-1 dims must stay dynamic)."""
    load = ("--arch", arch)
    given = ("--input", spec)
    onnx, half, program = work / "model.onnx", work / "fp16.safetensors", work / "batch1.pt2"
    single = ("--input", spec.replace("batch=2", "batch=1"))
    return (
        Step("inspect", ("inspect", str(weights))),
        Step("summarize", ("summarize", str(weights), *load, *given, "--repeats", "0")),
        Step("export onnx", ("export", "onnx", str(weights), *load, *given, "-o", str(onnx), "--force",
                             "--repeats", "0"), heavy=True),
        Step("verify-parity onnx", ("verify-parity", str(weights), str(onnx), *load, *given, "--repeats", "0"),
             heavy=True),
        Step("export pt2 batch-1", ("export", "pt2", str(weights), *load, *single, "-o", str(program), "--force",
                                    "--repeats", "0"), heavy=True),
        Step("compress half", ("compress", "half", str(weights), *load, *given, "-o", str(half), "--force",
                               "--repeats", "1")),
        Step("prune", ("prune", str(weights), *load, *given, "--amount", "0.2", "--repeats", "1")),
    )


SLOW_FAMILIES = {"t5", "phi3", "mistral", "qwen2", "roberta", "distilbert", "resnet-hf", "bert-base"}


def hf_subjects(root: Path) -> list[Subject]:
    subjects = []
    for family in HF_FAMILIES:
        folder, work = root / family.name, root / f"{family.name}-out"
        subjects.append(Subject(
            family.name, hf_steps(folder, work),
            slow=family.name in SLOW_FAMILIES,
            prepare=lambda family=family, folder=folder, work=work: _prepare_hf(family, folder, work)))
    return subjects


def _prepare_hf(family: HfFamily, folder: Path, work: Path) -> None:
    work.mkdir(parents=True, exist_ok=True)
    if not (folder / "config.json").exists():
        build_hf(family, folder)


def timm_subjects(root: Path) -> list[Subject]:
    missing = timm_missing()
    subjects = []
    for name, factory in TIMM_FAMILIES.items():
        weights, work = root / f"{name}.pt", root / f"{name}-out"
        steps = weights_steps(weights, work, f"tests.conformance_models:{factory}", "x:float32[batch=2,3,32,32]")
        subjects.append(Subject(name, steps, unavailable=missing, slow=name != "timm-resnet10t",
                                prepare=lambda f=factory, w=weights, o=work: _prepare_weights(f, w, o)))
    return subjects


def _prepare_weights(factory: str, weights: Path, work: Path) -> None:
    work.mkdir(parents=True, exist_ok=True)
    if not weights.exists():
        save_timm(factory, weights)


MTCNN_INPUTS = {"pnet": "x:float32[batch=2,3,24,24]", "rnet": "x:float32[batch=2,3,24,24]",
                "onet": "x:float32[batch=2,3,48,48]"}


def mtcnn_subjects(root: Path) -> list[Subject]:
    subjects = []
    for name, spec in MTCNN_INPUTS.items():
        weights = package_file("facenet-pytorch", f"data/{name}.pt")
        work = root / f"mtcnn-{name}-out"
        arch = f"tests.conformance_models:{name[0].upper()}Net"
        subjects.append(Subject(
            f"facenet-mtcnn-{name}", weights_steps(weights or Path(f"{name}.pt"), work, arch, spec),
            unavailable=None if weights else "facenet-pytorch is not installed (make conformance installs it)",
            prepare=lambda work=work: work.mkdir(parents=True, exist_ok=True)))
    return subjects


SILERO_ONNX_INPUTS = ("--input", "input:float32[batch=2,576]", "--input", "state:float32[2,batch=2,128]",
                      "--input", "sr:int64[]")
SILERO_RATE = 16000
SILERO_WINDOW = 576  # 512 new samples at 16 kHz after 64 samples of context, as silero-vad's OnnxWrapper feeds


def silero_inputs(path: Path) -> Path:
    """Real inputs for silero-vad's ONNX files: a noisy 440 Hz tone, a zero LSTM state, sr = 16000.

    Generated inputs cannot drive silero: its `sr` input selects a branch and must be 8000 or 16000."""
    import numpy as np

    samples = np.arange(SILERO_WINDOW) / SILERO_RATE
    tone = 0.5 * np.sin(2 * np.pi * 440 * samples) + 0.05 * np.random.default_rng(SEED).standard_normal(SILERO_WINDOW)
    np.savez(path, input=np.stack([tone, tone[::-1]]).astype(np.float32),
             state=np.zeros((2, 2, 128), np.float32), sr=np.array(SILERO_RATE, np.int64))
    return path


def silero_subjects(root: Path) -> list[Subject]:
    """silero-vad's real files: inspect and summarize the TorchScript archive and the ONNX files, compare the
    opset-15 and the "half" files with the reference ONNX file on real inputs, convert the opset-15 file to
    fp16 and check that conversion with the fp16 preset (the wheel has no fp16 file of its own)."""
    files = {name: package_file("silero-vad", f"data/{name}") for name in (
        "silero_vad.jit", "silero_vad.onnx", "silero_vad_16k_op15.onnx", "silero_vad_half.onnx")}
    missing = "silero-vad is not installed (make conformance installs it)" if None in files.values() else None
    path = {name: str(file) for name, file in files.items()}
    work = root / "silero-out"
    real = ("--inputs", str(work / "inputs.npz"))
    half = work / "half.onnx"
    steps = (
        Step("inspect jit", ("inspect", path["silero_vad.jit"])),
        Step("summarize jit", ("summarize", path["silero_vad.jit"], "--trust-code", "--repeats", "0",
                               "--input", "x:float32[batch=1,512]", "--input", "sr:int64[]"), 3,
             "summarize has no real-input option and a generated sr is not a supported sample rate: the forward "
             "pass fails on the generated inputs, an input error"),
        Step("inspect onnx", ("inspect", path["silero_vad.onnx"])),
        Step("summarize onnx", ("summarize", path["silero_vad_16k_op15.onnx"], "--repeats", "0",
                                *SILERO_ONNX_INPUTS)),
        Step("summarize onnx half", ("summarize", path["silero_vad_half.onnx"], "--repeats", "0")),
        Step("verify-parity onnx op15", ("verify-parity", path["silero_vad.onnx"], path["silero_vad_16k_op15.onnx"],
                                         "--repeats", "0", *real)),
        Step("verify-parity onnx half", ("verify-parity", path["silero_vad.onnx"], path["silero_vad_half.onnx"],
                                         "--preset", "fp16", "--repeats", "0", *real), 6,
             "silero_vad_half.onnx is not an fp16 copy of silero_vad.onnx: float32 weights, no fp16 cast, and "
             "another network (speech probability 0.149 vs 0.028 on the same window); the mismatch is real"),
        Step("compress half onnx", ("compress", "half", path["silero_vad_16k_op15.onnx"], "-o", str(half),
                                    "--force", "--repeats", "1", *SILERO_ONNX_INPUTS)),
        Step("verify-parity onnx fp16", ("verify-parity", path["silero_vad_16k_op15.onnx"], str(half),
                                         "--preset", "fp16", "--repeats", "0", *real)),
    )
    return [Subject("silero-vad", steps, unavailable=missing, prepare=lambda: _prepare_silero(work))]


def _prepare_silero(work: Path) -> None:
    work.mkdir(parents=True, exist_ok=True)
    silero_inputs(work / "inputs.npz")


def all_subjects(root: Path) -> list[Subject]:
    return [*hf_subjects(root), *timm_subjects(root), *mtcnn_subjects(root), *silero_subjects(root)]


# ---------------------------------------------------------------- running a step


@dataclass(frozen=True)
class Outcome:
    """What one step gave: exit code, verdict (the report's `verdict`, else pass/fail), wall time."""

    subject: str
    command: str
    exit_code: int
    expected: int
    verdict: str
    seconds: float
    reason: str = ""

    @property
    def as_expected(self) -> bool:
        return self.exit_code == self.expected


def run_step(subject: str, step: Step) -> Outcome:
    """Run `mlops <step.args> --json` in-process and read its verdict."""
    import json
    import time

    from typer.testing import CliRunner

    from mlops_cli.app import app

    start = time.perf_counter()
    result = CliRunner().invoke(app, [*step.args, "--json"], env={"COLUMNS": "160", "NO_COLOR": "1"})
    seconds = round(time.perf_counter() - start, 3)
    try:
        report = json.loads(result.stdout)
    except ValueError:
        report = {}
    return Outcome(subject, step.command, result.exit_code, step.expect, _verdict(report, result), seconds,
                   step.reason)


def _verdict(report: dict[str, Any], result: Any) -> str:
    if isinstance(report.get("verdict"), str):
        return report["verdict"]
    if isinstance(report.get("passed"), bool):
        return "pass" if report["passed"] else "fail"
    if result.exit_code == 0:
        return "ok"
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        return f"crash: {type(result.exception).__name__}: {result.exception}"
    lines = [line.strip() for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    return (errors or lines or [f"exit {result.exit_code}"])[-1]
