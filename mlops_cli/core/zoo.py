"""Built-in tiny models for demos and tests, created locally and deterministically (no model hub needed).

Hugging Face BERT/GPT-2/ViT with tokenizers trained on the bundled corpus, and the tips' ConvNet and LeNet
as plain nn.Modules. So that a newcomer sees output that means something, two are trained here for a few
seconds on the bundled corpus (fixed seed, one thread, fixed steps: the same weights on every build):
- tiny-gpt2 learns the corpus lines, so greedy generation from the start of a line continues it;
- tiny-bert learns to tell English lines from Chinese ones (config.id2label: english, chinese).
Only the first build pays for the training: the weights are cached in memory and on disk
(`$MLOPS_CACHE_DIR`, else `$XDG_CACHE_HOME/mlops`, else `~/.cache/mlops`; under `zoo/`), keyed by a hash of
this module, the corpus, the tokenizer files and the torch/transformers versions. The others keep seeded
random weights. `mlops zoo save` writes any of them as an ordinary checkpoint folder.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlops_cli.core.errors import OutputError, UsageError
from mlops_cli.core.io import cache_dir

if TYPE_CHECKING:
    import torch

SEED = 0
DATA = resources.files("mlops_cli") / "data"
WORDPIECE_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
BPE_SPECIAL = "<|endoftext|>"
LANGUAGES = ("english", "chinese")  # tiny-bert's labels: config.id2label
_CJK = re.compile(r"[\u4e00-\u9fff]")


@dataclass(frozen=True)
class ZooEntry:
    """One built-in model: how to build it and what it is."""

    name: str
    kind: str  # "hf" or "module"
    description: str
    inputs: tuple[str, ...]  # --input specs for plain modules; empty for HF models (derived from config)
    task: str | None = None  # "causal-lm" for the LM (export onnx gives it a KV cache by default)


def corpus_lines() -> list[str]:
    """The bundled mixed Chinese/English corpus (tokenizer and model training, bench-tokenizers default)."""
    return [line for line in (DATA / "corpus.txt").read_text(encoding="utf-8").splitlines() if line.strip()]


def language_of(text: str) -> int:
    """Index into LANGUAGES: a text with Chinese characters is Chinese (even with a few Latin words in it)."""
    return LANGUAGES.index("chinese") if _CJK.search(text) else LANGUAGES.index("english")


def classifier_split() -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(training, held-out) corpus lines with their language: every fifth line of each language is held out, so
    the classifier's accuracy on lines it never saw can be measured."""
    by_language: dict[int, list[str]] = {}
    for line in corpus_lines():
        by_language.setdefault(language_of(line), []).append(line)
    training: list[tuple[str, int]] = []
    held_out: list[tuple[str, int]] = []
    for label, lines in sorted(by_language.items()):
        for index, line in enumerate(lines):
            (held_out if index % 5 == 2 else training).append((line, label))
    return training, held_out


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
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,  # it learns a tiny corpus: no dropout
        id2label=dict(enumerate(LANGUAGES)), label2id={name: i for i, name in enumerate(LANGUAGES)},
        architectures=["BertForSequenceClassification"],
    )
    return BertForSequenceClassification(config), tokenizer


def _tiny_gpt2() -> tuple[Any, Any]:
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = gpt2_tokenizer()
    eos = tokenizer.convert_tokens_to_ids(BPE_SPECIAL)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=128, n_embd=32, n_layer=2, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,  # it memorises a tiny corpus: no dropout
        bos_token_id=eos, eos_token_id=eos, architectures=["GPT2LMHeadModel"],
    )
    return GPT2LMHeadModel(config), tokenizer


def _tiny_llama() -> tuple[Any, Any]:
    """A Llama-family LM (rotary positions, RMSNorm, SwiGLU, grouped-query attention: 4 query heads share 2
    key/value heads), the family ONNX Runtime GenAI's model builder knows; same tokenizer and corpus as tiny-gpt2."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = gpt2_tokenizer()
    eos = tokenizer.convert_tokens_to_ids(BPE_SPECIAL)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=eos, eos_token_id=eos, architectures=["LlamaForCausalLM"],
    )
    return LlamaForCausalLM(config), tokenizer


def _tiny_vit() -> tuple[Any, Any]:
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=64, num_labels=10,  # type: ignore[call-arg]
        architectures=["ViTForImageClassification"],
    )
    return ViTForImageClassification(config), None


_HF_BUILDERS: dict[str, Callable[[], tuple[Any, Any]]] = {
    "tiny-bert": _tiny_bert, "tiny-gpt2": _tiny_gpt2, "tiny-llama": _tiny_llama, "tiny-vit": _tiny_vit,
}
_MODULE_BUILDERS: dict[str, Callable[[], Any]] = {"convnet": ConvNet, "lenet": LeNet}
ARCH_PATHS = {"convnet": "mlops_cli.core.zoo:ConvNet", "lenet": "mlops_cli.core.zoo:LeNet"}

ENTRIES: dict[str, ZooEntry] = {
    entry.name: entry
    for entry in (
        ZooEntry("tiny-bert", "hf", "BERT classifier telling English from Chinese (2 layers, hidden 32, trained on "
                 "the bundled corpus) + WordPiece tokenizer", ()),
        ZooEntry("tiny-gpt2", "hf", "GPT-2 causal LM (2 layers, hidden 32) that learned the bundled corpus + "
                 "byte-level BPE tokenizer", (), task="causal-lm"),
        ZooEntry("tiny-llama", "hf", "Llama causal LM (2 layers, hidden 64, grouped-query attention) that learned the "
                 "bundled corpus + the same tokenizer", (), task="causal-lm"),
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


def build(name: str, trained: bool = True) -> tuple[Any, Any]:
    """Build a built-in model with seeded (and, for the trained ones, trained) weights, in eval mode:
    (module, tokenizer or None). The caller's random stream and thread count are left as they were.
    `trained=False`: the architecture only (what a build on the meta device wants: it has no values to train)."""
    import torch

    zoo_entry = entry(name)
    # built where a caller may be in inference mode (a parity check, generation): the trained built-ins train
    # here, and parameters made in inference mode cannot be
    with torch.random.fork_rng(devices=[]), torch.inference_mode(False), torch.enable_grad():
        torch.manual_seed(SEED)
        if zoo_entry.kind == "hf":
            model, tokenizer = _HF_BUILDERS[name]()
        else:
            model, tokenizer = _MODULE_BUILDERS[name](), None
        if trained and name in RECIPES:
            _load_parameters(model, trained_parameters(name, model, tokenizer))
    return model.eval(), tokenizer


# ---------------------------------------------------------------- training (tiny-gpt2, tiny-bert)


@dataclass(frozen=True)
class Recipe:
    """Full-batch AdamW for a fixed number of steps: no sampling, so the seed and the data decide the weights.

    Label smoothing keeps the classifier's two logits close (|logit| < 2): its fp16 and int8 copies then drift
    within the default tolerances. The LM is not smoothed: it must recite its corpus (its int8 copy drifts by
    about 0.9 on the logits, more than the int8 preset allows: a real finding about a trained 32-wide model).
    """

    steps: int
    learning_rate: float
    label_smoothing: float = 0.0


RECIPES = {"tiny-gpt2": Recipe(steps=60, learning_rate=1.5e-2), "tiny-llama": Recipe(steps=60, learning_rate=1.5e-2),
           "tiny-bert": Recipe(steps=40, learning_rate=1e-2, label_smoothing=0.2)}
SYNTHETIC_SENTENCES = 30  # per language, for the classifier (see classifier_batch)
_MEMORY: dict[str, dict[str, Any]] = {}  # cache key -> trained parameters, for the builds of this process


def trained_parameters(name: str, model: Any, tokenizer: Any) -> dict[str, Any]:
    """The trained parameters of `model` (freshly built, seeded): from this process's memory, else the disk
    cache, else trained now (and cached; a cache that cannot be written only costs the next build a training)."""
    key = cache_key(name)
    if key in _MEMORY:
        return _MEMORY[key]
    path = cache_dir() / "zoo" / f"{name}-{key}.safetensors"
    parameters = _read_cached(path, model)
    if parameters is None:
        with _one_thread():
            _fit(model, _BATCHES[name](tokenizer), RECIPES[name])
        parameters = {n: p.detach().clone() for n, p in model.named_parameters()}  # tied weights once
        _write_cached(path, parameters)
    _MEMORY[key] = parameters
    return parameters


def cache_key(name: str) -> str:
    """What the trained weights depend on: this module (builders and recipes), the corpus and tokenizer files,
    and the versions of the libraries that compute them."""
    import torch
    import transformers

    digest = hashlib.sha256(f"{name}|torch {torch.__version__}|transformers {transformers.__version__}".encode())
    digest.update(Path(__file__).read_bytes())
    for data_file in ("corpus.txt", "bpe-vocab.json", "bpe-merges.txt", "wordpiece-vocab.txt"):
        digest.update((DATA / data_file).read_bytes())
    return digest.hexdigest()[:16]


def _read_cached(path: Path, model: Any) -> dict[str, Any] | None:
    """The cached parameters when the file holds exactly the model's, shaped alike; None otherwise."""
    if not path.is_file():
        return None
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except (OSError, SafetensorError):
        return None
    expected = {n: tuple(p.shape) for n, p in model.named_parameters()}
    return tensors if {n: tuple(t.shape) for n, t in tensors.items()} == expected else None


def _write_cached(path: Path, parameters: dict[str, Any]) -> None:
    from mlops_cli.core.io import save_safetensors

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_safetensors(parameters, path, force=True)
    except (OSError, OutputError):
        pass  # a read-only home: the next process trains again, nothing else changes


def _load_parameters(model: Any, parameters: dict[str, Any]) -> None:
    import torch

    with torch.no_grad():
        for name, parameter in model.named_parameters():
            parameter.copy_(parameters[name])


@contextmanager
def _one_thread() -> Iterator[None]:
    """Training runs on one thread (the same sums in the same order on every machine, and no oversubscription
    of a busy box); the caller's thread count is restored."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _fit(model: Any, batch: dict[str, Any], recipe: Recipe) -> None:
    import torch
    import torch.nn.functional as F

    inputs = {name: value for name, value in batch.items() if name != "labels"}
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.learning_rate, weight_decay=0.0)
    for _ in range(recipe.steps):
        logits, targets = model(**inputs).logits, batch["labels"]
        if logits.dim() == 3:  # a causal LM: position t predicts token t + 1
            logits, targets = logits[:, :-1], targets[:, 1:]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100,
                               label_smoothing=recipe.label_smoothing)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def lm_batch(tokenizer: Any) -> dict[str, Any]:
    """Every corpus line from position 0, ended by EOS (GPT-2's positions are absolute: a prompt that starts a
    line is continued by that line, then stops); padding is masked out of attention and loss."""
    import torch

    eos = tokenizer.convert_tokens_to_ids(BPE_SPECIAL)
    rows = [[*tokenizer(line).input_ids, eos] for line in corpus_lines()]
    width = max(map(len, rows))
    input_ids = torch.full((len(rows), width), eos)
    labels = torch.full((len(rows), width), -100)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for index, row in enumerate(rows):
        input_ids[index, :len(row)] = labels[index, :len(row)] = torch.tensor(row)
        attention_mask[index, :len(row)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def classifier_batch(tokenizer: Any) -> dict[str, Any]:
    """The training lines of `classifier_split`, plus sentences drawn from the WordPiece vocabulary (Chinese
    characters, English words): held-out lines hold characters no training line has, and these sentences give
    every character and word of the vocabulary an embedding that knows its language."""
    import torch

    texts_and_labels = list(classifier_split()[0])
    vocab = sorted(wordpiece_vocab())
    pools = {LANGUAGES.index("chinese"): ("", [t for t in vocab if _CJK.fullmatch(t)]),
             LANGUAGES.index("english"): (" ", [t for t in vocab if re.fullmatch(r"[a-z]{2,}", t)])}
    generator = torch.Generator().manual_seed(SEED)
    for _ in range(SYNTHETIC_SENTENCES):
        for label, (separator, pool) in pools.items():
            picks = torch.randint(0, len(pool), (8,), generator=generator).tolist()
            texts_and_labels.append((separator.join(pool[i] for i in picks), label))
    texts, labels = zip(*texts_and_labels, strict=True)
    # a copy pads: a fast tokenizer keeps padding switched on after a padded call, and the built-in model's
    # tokenizer must save the same files whether it was just trained with or loaded from the cache
    encoded = copy.deepcopy(tokenizer)(list(texts), padding=True, return_tensors="pt")
    return {**encoded, "labels": torch.tensor(labels)}


_BATCHES: dict[str, Callable[[Any], dict[str, Any]]] = {"tiny-gpt2": lm_batch, "tiny-llama": lm_batch,
                                                        "tiny-bert": classifier_batch}
