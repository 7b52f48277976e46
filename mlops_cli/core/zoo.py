"""Built-in tiny models for demos and tests, created locally with fixed seeds (no model hub needed).

Each entry builds a real model with random weights: Hugging Face BERT/GPT-2/ViT with tokenizers trained
on the bundled corpus, and the tips' ConvNet and LeNet as plain nn.Modules. `mlops zoo save` writes any
of them as an ordinary checkpoint folder so every command can be tried on files too.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlops_cli.core.errors import UsageError

if TYPE_CHECKING:
    import torch

SEED = 0
DATA = resources.files("mlops_cli") / "data"
WORDPIECE_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
BPE_SPECIAL = "<|endoftext|>"


@dataclass(frozen=True)
class ZooEntry:
    """One built-in model: how to build it and what it is."""

    name: str
    kind: str  # "hf" or "module"
    description: str
    inputs: tuple[str, ...]  # --input specs for plain modules; empty for HF models (derived from config)


def corpus_lines() -> list[str]:
    """The bundled mixed Chinese/English corpus (tokenizer training, bench-tokenizers default)."""
    return [line for line in (DATA / "corpus.txt").read_text(encoding="utf-8").splitlines() if line.strip()]


# ---------------------------------------------------------------- plain modules (the tips' CNNs)


_CNN_CLASSES: dict[str, type] = {}  # defined on first use, so importing the zoo never imports torch


def _define_cnns() -> dict[str, type]:
    if _CNN_CLASSES:
        return _CNN_CLASSES
    import torch.nn as nn

    class ConvNet(nn.Module):
        """The MNIST-sized ConvNet of the tips (§4): two conv blocks and three linear layers."""

        def __init__(self, num_classes: int = 10) -> None:
            super().__init__()
            self.conv1 = nn.Sequential(nn.Conv2d(1, 16, 3, 1, 1), nn.ReLU(), nn.AvgPool2d(2, 2))
            self.conv2 = nn.Sequential(nn.Conv2d(16, 32, 3, 1, 1), nn.ReLU(), nn.MaxPool2d(2, 2))
            self.fc = nn.Sequential(nn.Linear(32 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU())
            self.out = nn.Linear(64, num_classes)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.conv2(self.conv1(x))
            return self.out(self.fc(x.flatten(1)))

    class LeNet(nn.Module):
        """LeNet-5 on 1x32x32 images (the tips' visualisation example)."""

        def __init__(self, num_classes: int = 10) -> None:
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(1, 6, 5), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
            )
            self.classifier = nn.Sequential(
                nn.Linear(16 * 5 * 5, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, num_classes),
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.classifier(self.features(x).flatten(1))

    ConvNet.__module__ = LeNet.__module__ = __name__
    _CNN_CLASSES.update(ConvNet=ConvNet, LeNet=LeNet)
    return _CNN_CLASSES


def ConvNet(num_classes: int = 10) -> Any:
    """Factory for `--arch mlops_cli.core.zoo:ConvNet`."""
    return _define_cnns()["ConvNet"](num_classes)


def LeNet(num_classes: int = 10) -> Any:
    """Factory for `--arch mlops_cli.core.zoo:LeNet`."""
    return _define_cnns()["LeNet"](num_classes)


# ---------------------------------------------------------------- tokenizers


def wordpiece_vocab() -> dict[str, int]:
    lines = (DATA / "wordpiece-vocab.txt").read_text(encoding="utf-8").splitlines()
    return {token: index for index, token in enumerate(lines)}


def bpe_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    vocab = json.loads((DATA / "bpe-vocab.json").read_text(encoding="utf-8"))
    lines = (DATA / "bpe-merges.txt").read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split(" ", 1)) for line in lines if line and not line.startswith("#")]
    return vocab, merges  # type: ignore[return-value]


def bert_tokenizer() -> Any:
    """The tiny BERT's WordPiece tokenizer (transformers' Rust-backed BertTokenizer)."""
    from transformers import BertTokenizer

    return BertTokenizer(vocab=wordpiece_vocab(), model_max_length=128)


def gpt2_tokenizer() -> Any:
    """The tiny GPT-2's byte-level BPE tokenizer (transformers' Rust-backed GPT2Tokenizer)."""
    from transformers import GPT2Tokenizer

    vocab, merges = bpe_vocab_and_merges()
    return GPT2Tokenizer(vocab=vocab, merges=merges, model_max_length=128)  # type: ignore[arg-type]


def train_tokenizer_files(out_dir: Path) -> None:
    """Regenerate the bundled tokenizer files from the corpus.

    BPE training is deterministic; WordPiece training breaks frequency ties arbitrarily from run to run, so
    the bundled files, not a fresh training, define the built-in tokenizers.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    lines = corpus_lines()
    wordpiece = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wordpiece.normalizer = normalizers.BertNormalizer(lowercase=True)
    wordpiece.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wordpiece.train_from_iterator(lines, trainers.WordPieceTrainer(vocab_size=1000, special_tokens=WORDPIECE_SPECIALS))
    by_id = sorted(wordpiece.get_vocab().items(), key=lambda item: item[1])
    (out_dir / "wordpiece-vocab.txt").write_text("".join(f"{token}\n" for token, _ in by_id), encoding="utf-8")

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(lines, trainers.BpeTrainer(
        vocab_size=800, special_tokens=[BPE_SPECIAL], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    state = json.loads(bpe.to_str())["model"]
    (out_dir / "bpe-vocab.json").write_text(json.dumps(state["vocab"], ensure_ascii=False, sort_keys=False),
                                            encoding="utf-8")
    merges = [" ".join(pair) if isinstance(pair, list) else pair for pair in state["merges"]]
    (out_dir / "bpe-merges.txt").write_text("#version: 0.2\n" + "".join(f"{m}\n" for m in merges), encoding="utf-8")


# ---------------------------------------------------------------- HF models


def _tiny_bert() -> tuple[Any, Any]:
    from transformers import BertConfig, BertForSequenceClassification

    tokenizer = bert_tokenizer()
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id,
        num_labels=2,  # type: ignore[call-arg]
        architectures=["BertForSequenceClassification"],
    )
    return BertForSequenceClassification(config), tokenizer


def _tiny_gpt2() -> tuple[Any, Any]:
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = gpt2_tokenizer()
    eos = tokenizer.convert_tokens_to_ids(BPE_SPECIAL)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=128, n_embd=32, n_layer=2, n_head=2,
        bos_token_id=eos, eos_token_id=eos, architectures=["GPT2LMHeadModel"],
    )
    return GPT2LMHeadModel(config), tokenizer


def _tiny_vit() -> tuple[Any, Any]:
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=64, num_labels=10,  # type: ignore[call-arg]
        architectures=["ViTForImageClassification"],
    )
    return ViTForImageClassification(config), None


_HF_BUILDERS: dict[str, Callable[[], tuple[Any, Any]]] = {
    "tiny-bert": _tiny_bert, "tiny-gpt2": _tiny_gpt2, "tiny-vit": _tiny_vit,
}
_MODULE_BUILDERS: dict[str, Callable[[], Any]] = {"convnet": ConvNet, "lenet": LeNet}
ARCH_PATHS = {"convnet": "mlops_cli.core.zoo:ConvNet", "lenet": "mlops_cli.core.zoo:LeNet"}

ENTRIES: dict[str, ZooEntry] = {
    entry.name: entry
    for entry in (
        ZooEntry("tiny-bert", "hf", "BERT sequence classifier (2 layers, hidden 32) + WordPiece tokenizer", ()),
        ZooEntry("tiny-gpt2", "hf", "GPT-2 causal LM (2 layers, hidden 32) + byte-level BPE tokenizer", ()),
        ZooEntry("tiny-vit", "hf", "ViT image classifier (32x32 images, patch 8, 2 layers)", ()),
        ZooEntry("convnet", "module", "The tips' MNIST ConvNet (1x28x28 -> 10 classes)",
                 ("x:float32[batch=2,1,28,28]",)),
        ZooEntry("lenet", "module", "LeNet-5 (1x32x32 -> 10 classes)", ("x:float32[batch=2,1,32,32]",)),
    )
}


def entry(name: str) -> ZooEntry:
    if name not in ENTRIES:
        raise UsageError(f"unknown built-in model {name!r}",
                         hint=f"Choose one of: {', '.join(ENTRIES)} (see `mlops zoo list`).")
    return ENTRIES[name]


def build(name: str) -> tuple[Any, Any]:
    """Build a built-in model with seeded weights, in eval mode: (module, tokenizer or None)."""
    import torch

    zoo_entry = entry(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        if zoo_entry.kind == "hf":
            model, tokenizer = _HF_BUILDERS[name]()
        else:
            model, tokenizer = _MODULE_BUILDERS[name](), None
    return model.eval(), tokenizer
