"""A TOKENIZER reference -> the files behind it, recognised by content (builtins are written to a scratch folder).

One tokenizer is a WordPiece vocab.txt, a byte-level BPE vocab.json + merges.txt, a tokenizer.json, a
SentencePiece .model, a Hugging Face folder, or builtin:tiny-bert / builtin:tiny-gpt2.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlops_cli.core.contract import BUILTIN_PREFIX, ModelRef
from mlops_cli.core.errors import InputError, UsageError

BUILTIN_TOKENIZERS = {"tiny-bert": "wordpiece", "tiny-gpt2": "bpe"}
SPM_NAMES = ("tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "sentencepiece.model")
BPE_MERGES_NAMES = ("merges.txt",)
SPM_MODEL_TYPES = {1: "Unigram", 2: "BPE", 3: "Word", 4: "Char"}


# ---------------------------------------------------------------- what was found on disk


@dataclass(frozen=True)
class TokenizerFiles:
    """The files behind a TOKENIZER reference (builtins are written to a scratch folder first)."""

    reference: str
    kind: str  # wordpiece | bpe | tokenizer.json | sentencepiece | hf-folder
    folder: Path | None = None  # a Hugging Face folder (loaded with AutoTokenizer)
    tokenizer_json: Path | None = None
    wordpiece_vocab: Path | None = None
    bpe_vocab: Path | None = None
    bpe_merges: Path | None = None
    spm_model: Path | None = None
    config: dict[str, Any] = field(default_factory=dict)  # tokenizer_config.json
    origin: tuple[str, ...] = ()  # what to show instead of scratch copies (builtins)

    @property
    def paths(self) -> tuple[str, ...]:
        found = (self.tokenizer_json, self.wordpiece_vocab, self.bpe_vocab, self.bpe_merges, self.spm_model)
        return tuple(str(p) for p in found if p is not None)

    @property
    def shown(self) -> tuple[str, ...]:
        return self.origin or self.paths


def resolve_files(ref: ModelRef, scratch: Path) -> TokenizerFiles:
    """Work out what kind of tokenizer `ref` names, by content; InputError (3) when it is none."""
    if ref.builtin is not None:
        return _builtin_files(ref.builtin, scratch)
    path, reference = ref.path, str(ref)
    assert path is not None
    if not path.exists():
        raise InputError(f"no such file or folder: {path}",
                         hint="Pass a tokenizer folder, tokenizer.json, vocab.txt, vocab.json, a .model "
                              "file, or builtin:tiny-bert / builtin:tiny-gpt2.")
    if path.is_dir():
        return _folder_files(reference, path)
    return _file_files(reference, path)


def _builtin_files(name: str, scratch: Path) -> TokenizerFiles:
    from mlops_cli.core import zoo

    reference = f"{BUILTIN_PREFIX}{name}"
    if name not in BUILTIN_TOKENIZERS:
        known = ", ".join(f"{BUILTIN_PREFIX}{n}" for n in BUILTIN_TOKENIZERS)
        if name in zoo.ENTRIES:
            raise UsageError(f"{reference} has no tokenizer", hint=f"Tokenizers are built in for: {known}.")
        raise UsageError(f"unknown built-in tokenizer {reference!r}", hint=f"Choose one of: {known}.")
    if BUILTIN_TOKENIZERS[name] == "wordpiece":
        vocab_path = scratch / "vocab.txt"
        ordered = sorted(zoo.wordpiece_vocab().items(), key=lambda item: item[1])
        vocab_path.write_text("".join(f"{token}\n" for token, _ in ordered), encoding="utf-8")
        return TokenizerFiles(reference, "wordpiece", wordpiece_vocab=vocab_path,
                              origin=("mlops_cli/data/wordpiece-vocab.txt (built in)",))
    vocab, merges = zoo.bpe_vocab_and_merges()
    vocab_path, merges_path = scratch / "vocab.json", scratch / "merges.txt"
    vocab_path.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_path.write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    return TokenizerFiles(reference, "bpe", bpe_vocab=vocab_path, bpe_merges=merges_path,
                          origin=("mlops_cli/data/bpe-vocab.json (built in)", "mlops_cli/data/bpe-merges.txt"))


def _folder_files(reference: str, folder: Path) -> TokenizerFiles:
    def present(name: str) -> Path | None:
        candidate = folder / name
        return candidate if candidate.is_file() else None

    spm_model = next((p for p in map(present, SPM_NAMES) if p is not None), None)
    files = TokenizerFiles(
        reference, "hf-folder", folder=folder, tokenizer_json=present("tokenizer.json"),
        wordpiece_vocab=present("vocab.txt"), bpe_vocab=present("vocab.json"), bpe_merges=present("merges.txt"),
        spm_model=spm_model, config=read_json(present("tokenizer_config.json")) or {},
    )
    if not files.paths:
        raise InputError(f"{folder} holds no tokenizer files",
                         hint="Expected tokenizer.json, vocab.txt, vocab.json + merges.txt or a SentencePiece "
                              ".model (a Hugging Face folder saved with save_pretrained has them).")
    if files.bpe_vocab and not files.bpe_merges and not files.tokenizer_json:
        raise InputError(f"{folder} has vocab.json but no merges.txt", hint="A BPE tokenizer needs both files.")
    return files


def _file_files(reference: str, path: Path) -> TokenizerFiles:
    head = path.read_bytes()[:4096]
    if not head:
        raise InputError(f"{path} is empty (0 bytes)", hint="The download or save was interrupted; redo it.")
    if head.lstrip()[:1] == b"{":
        data = read_json(path)
        if isinstance(data, dict) and "model" in data and isinstance(data["model"], dict):
            return TokenizerFiles(reference, "tokenizer.json", tokenizer_json=path)
        if isinstance(data, dict) and data and all(isinstance(v, int) for v in data.values()):
            return TokenizerFiles(reference, "bpe", bpe_vocab=path, bpe_merges=_merges_next_to(path))
        raise InputError(f"{path} is JSON but neither a tokenizer.json nor a BPE vocab.json",
                         hint="A tokenizer.json has a 'model' section; a vocab.json maps tokens to ids.")
    if _is_sentencepiece(path):
        return TokenizerFiles(reference, "sentencepiece", spm_model=path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise InputError(f"{path} is not a tokenizer file mlops understands",
                         hint="Supported: tokenizer.json, vocab.txt (WordPiece), vocab.json + merges.txt (BPE), "
                              "a SentencePiece .model, or a Hugging Face folder.") from exc
    if not any(line.startswith("##") or line in ("[UNK]", "<unk>") for line in lines):
        raise InputError(f"{path} does not look like a WordPiece vocab.txt (no [UNK], no ##pieces)",
                         hint="A WordPiece vocabulary has one token per line, e.g. [UNK] and ##ing.")
    return TokenizerFiles(reference, "wordpiece", wordpiece_vocab=path)


def _merges_next_to(vocab_path: Path) -> Path:
    """merges.txt beside a vocab.json (also NAME-merges.txt beside NAME-vocab.json)."""
    candidates = [vocab_path.with_name(vocab_path.name.replace("vocab", "merges").replace(".json", ".txt")),
                  *(vocab_path.with_name(name) for name in BPE_MERGES_NAMES)]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise InputError(f"no merges file next to {vocab_path}",
                     hint="A BPE tokenizer needs vocab.json and merges.txt in the same folder.")


def read_json(path: Path | None) -> Any:
    """A JSON file's content (None for no file); InputError when it is damaged."""
    if path is None:
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path} is not valid JSON: {exc}", hint="The file is damaged; save it again.") from exc


def _is_sentencepiece(path: Path) -> bool:
    if importlib.util.find_spec("sentencepiece") is None:
        return False
    import sentencepiece

    processor = sentencepiece.SentencePieceProcessor()
    try:
        processor.LoadFromSerializedProto(path.read_bytes())
    except (RuntimeError, OSError):
        return False
    return processor.get_piece_size() > 0


def spm_model_type(path: Path) -> str:
    """'Unigram', 'BPE', 'Word' or 'Char', read from the model's trainer spec."""
    from transformers.convert_slow_tokenizer import import_protobuf

    proto = import_protobuf().ModelProto.FromString(path.read_bytes())
    return SPM_MODEL_TYPES.get(proto.trainer_spec.model_type, str(proto.trainer_spec.model_type))


