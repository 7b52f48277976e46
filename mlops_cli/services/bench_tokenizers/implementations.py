"""A tokenizer's files -> every implementation that can be built from them (`files.py` finds the files).

One tokenizer (a WordPiece vocab.txt, a byte-level BPE vocab.json + merges.txt, a tokenizer.json, a
SentencePiece .model, a Hugging Face folder or builtin:NAME) can usually be run by several libraries:
the pure-Python transformers classes, the Rust-backed transformers classes, the `tokenizers` library
called directly, tiktoken and sentencepiece. Each is wrapped in an `Implementation` with the same four
operations (one text, one pair, a padded and truncated batch of pairs, decode), so a benchmark can time
them side by side and check that they agree. An implementation that cannot be built is returned as a
`Skipped` entry with the reason, never dropped silently.

Traps handled here (each named in a note on the implementation it concerns):
- transformers 5 `AutoTokenizer.from_pretrained(..., use_fast=False)` silently returns the Rust-backed
  class; the pure-Python WordPiece class is built explicitly (`BertTokenizerLegacy`) and checked.
- `BertTokenizerLegacy` omits `token_type_ids` unless asked: they are requested explicitly.
- transformers 5 has no pure-Python byte-level BPE class: tiktoken and `tokenizers` are compared instead.
- tiktoken ranks merges by token id; a vocabulary whose ids are not in merge order tokenizes differently.
- a SentencePiece Unigram model loaded through a BPE class (e.g. LlamaTokenizer) tokenizes silently wrong.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from mlops_cli.core.contract import ModelRef
from mlops_cli.core.errors import InputError, UsageError
from mlops_cli.services.bench_tokenizers.files import TokenizerFiles, read_json, resolve_files, spm_model_type

PAD_CANDIDATES = ("[PAD]", "<pad>", "<|pad|>", "<|endoftext|>", "</s>", "<eos>")
# The pre-tokenizer regex of GPT-2's byte-level BPE (tokenizers' ByteLevel(use_regex=True) uses the same).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
IMPLEMENTATION_NAMES = ("transformers-python", "transformers", "tokenizers", "tiktoken", "sentencepiece")


# ---------------------------------------------------------------- results of one call


@dataclass(frozen=True)
class Encoded:
    """One encoded text (or pair): what a model is fed. Fields an implementation does not return are None."""

    ids: tuple[int, ...]
    attention_mask: tuple[int, ...] | None = None
    token_type_ids: tuple[int, ...] | None = None

    def content(self, template_ids: frozenset[int]) -> tuple[int, ...]:
        """The ids of the text itself: padding (mask 0) and the template's special tokens removed."""
        mask = self.attention_mask or (1,) * len(self.ids)
        return tuple(i for i, m in zip(self.ids, mask, strict=True) if m and i not in template_ids)

    @property
    def real_tokens(self) -> int:
        return sum(self.attention_mask) if self.attention_mask is not None else len(self.ids)


def _tuple(values: Any) -> tuple[int, ...] | None:
    return None if values is None else _ids(values)


def _ids(values: Any) -> tuple[int, ...]:
    return tuple(int(v) for v in values)


# ---------------------------------------------------------------- implementations


class Implementation:
    """One library's way of running the tokenizer. Subclasses fill in the four timed operations.

    The timed operations return the library's own result objects (converting them would be timed too);
    `encoded()` turns a result into `Encoded` rows for the agreement check, outside the timing.
    `template` says whether the implementation adds the model's special tokens ([CLS] ... [SEP]) itself;
    tiktoken and sentencepiece do not, so they are compared on the text's own ids.
    """

    name = ""
    backend = ""
    template = True

    def __init__(self, library: str, class_name: str, notes: Sequence[str] = ()) -> None:
        self.library = library
        self.class_name = class_name
        self.notes = list(notes)
        self.max_length = 0
        self.pad_id = 0
        self.threads = 1
        self.pair_specials = 0  # special tokens the reference adds to a pair (truncation budget for others)
        self.padding_side = "right"

    def configure_batch(self, max_length: int, pad_id: int, threads: int, pair_specials: int,
                        padding_side: str = "right") -> None:
        """Settings of the batch workload: pad to and truncate at max_length (longest-first), padding on the
        reference's side (decoder models pad on the left)."""
        self.max_length, self.pad_id, self.threads, self.pair_specials = max_length, pad_id, threads, pair_specials
        self.padding_side = padding_side

    def single(self, text: str) -> Any:
        raise NotImplementedError

    def pair(self, first: str, second: str) -> Any:
        raise NotImplementedError

    def batch(self, pairs: Sequence[tuple[str, str]]) -> Any:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def encoded(self, result: Any) -> list[Encoded]:
        """A timed operation's result as Encoded rows (one for single/pair, one per pair for batch)."""
        raise NotImplementedError

    def template_ids(self) -> frozenset[int]:
        """Ids this implementation adds around any text: found by encoding empty texts."""
        rows = self.encoded(self.single("")) + self.encoded(self.pair("", ""))
        return frozenset(i for row in rows for i in row.ids)

    def pair_special_count(self) -> int:
        """How many special tokens a pair gets (so template-free libraries truncate to the same budget)."""
        return 0


class TransformersImplementation(Implementation):
    """A transformers tokenizer object (Python or Rust backend), called the way models are fed."""

    def __init__(self, tokenizer: Any, name: str, backend: str, notes: Sequence[str] = (),
                 type_ids: bool | None = None, template: bool = True) -> None:
        super().__init__(_version("transformers"), type(tokenizer).__name__, notes)
        self.name, self.backend, self.template = name, backend, template
        self.tokenizer = tokenizer
        self.type_ids = "token_type_ids" in tokenizer.model_input_names if type_ids is None else type_ids

    def configure_batch(self, max_length: int, pad_id: int, threads: int, pair_specials: int,
                        padding_side: str = "right") -> None:
        super().configure_batch(max_length, pad_id, threads, pair_specials, padding_side)
        self.tokenizer.padding_side = padding_side
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self._token_for(pad_id)
            self.notes.append(f"no pad token: padding with {self.tokenizer.pad_token!r} "
                              f"(id {self.tokenizer.pad_token_id})")

    def _token_for(self, token_id: int) -> str:
        """The reference's pad id as a token of this tokenizer (its own eos/unk when it has no such id)."""
        try:
            return str(self.tokenizer.convert_ids_to_tokens(token_id))
        except (IndexError, KeyError, ValueError):
            return str(self.tokenizer.eos_token or self.tokenizer.unk_token or self.tokenizer.convert_ids_to_tokens(0))

    def single(self, text: str) -> Any:
        return self.tokenizer(text, return_token_type_ids=self.type_ids)

    def pair(self, first: str, second: str) -> Any:
        return self.tokenizer(first, second, return_token_type_ids=self.type_ids)

    def batch(self, pairs: Sequence[tuple[str, str]]) -> Any:
        firsts, seconds = [a for a, _ in pairs], [b for _, b in pairs]
        max_length = self.max_length if self.template else self.max_length - self.pair_specials
        return self.tokenizer(firsts, seconds, padding="max_length", truncation="longest_first",
                              max_length=max_length, return_token_type_ids=self.type_ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def template_ids(self) -> frozenset[int]:
        named = (getattr(self.tokenizer, f"{role}_token_id", None) for role in ("bos", "eos", "cls", "sep"))
        return super().template_ids() | {int(i) for i in named if i is not None}

    def pair_special_count(self) -> int:
        return int(self.tokenizer.num_special_tokens_to_add(pair=True)) if self.template else 0

    def encoded(self, result: Any) -> list[Encoded]:
        ids, mask, types = result["input_ids"], result.get("attention_mask"), result.get("token_type_ids")
        if ids and isinstance(ids[0], list):
            return [Encoded(_ids(row), _tuple(mask[i]) if mask else None, _tuple(types[i]) if types else None)
                    for i, row in enumerate(ids)]
        return [Encoded(_ids(ids), _tuple(mask), _tuple(types))]


class TokenizersImplementation(Implementation):
    """The `tokenizers` library called directly: no transformers wrapper around the Rust pipeline."""

    name = "tokenizers"
    backend = "Rust (direct)"

    def __init__(self, pipeline_json: str, notes: Sequence[str] = ()) -> None:
        from tokenizers import Tokenizer

        super().__init__(_version("tokenizers"), "tokenizers.Tokenizer", notes)
        self.plain = Tokenizer.from_str(pipeline_json)
        self.plain.no_truncation()
        self.plain.no_padding()
        self.batched = Tokenizer.from_str(pipeline_json)

    def configure_batch(self, max_length: int, pad_id: int, threads: int, pair_specials: int,
                        padding_side: str = "right") -> None:
        super().configure_batch(max_length, pad_id, threads, pair_specials, padding_side)
        pad_token = self.batched.id_to_token(pad_id) or ""
        self.batched.enable_truncation(max_length, strategy="longest_first")
        self.batched.enable_padding(direction=padding_side, pad_id=pad_id, pad_token=pad_token, length=max_length)

    def single(self, text: str) -> Any:
        return self.plain.encode(text)

    def pair(self, first: str, second: str) -> Any:
        return self.plain.encode(first, second)

    def batch(self, pairs: Sequence[tuple[str, str]]) -> Any:
        return self.batched.encode_batch(list(pairs))

    def decode(self, ids: Sequence[int]) -> str:
        return self.plain.decode(list(ids), skip_special_tokens=True)

    def pair_special_count(self) -> int:
        return int(self.plain.num_special_tokens_to_add(True))

    def encoded(self, result: Any) -> list[Encoded]:
        rows = result if isinstance(result, list) else [result]
        return [Encoded(tuple(r.ids), tuple(r.attention_mask), tuple(r.type_ids)) for r in rows]


class _TemplateFreeImplementation(Implementation):
    """Libraries that encode plain text only (tiktoken, sentencepiece): a pair is the two texts' ids one
    after the other, and the batch is truncated longest-first (as `tokenizers` does) and padded here."""

    template = False

    def __init__(self, library: str, class_name: str, notes: Sequence[str] = ()) -> None:
        super().__init__(library, class_name, [*notes, "no pairs, truncation or padding in the library: the batch "
                                                       "workload truncates and pads in Python (timed too)"])

    def encode_many(self, texts: list[str]) -> list[list[int]]:
        raise NotImplementedError

    def pair(self, first: str, second: str) -> Any:
        return self.single(first) + self.single(second)

    def batch(self, pairs: Sequence[tuple[str, str]]) -> Any:
        encoded = self.encode_many([text for pair in pairs for text in pair])
        budget = self.max_length - self.pair_specials
        rows = []
        for first, second in zip(encoded[0::2], encoded[1::2], strict=True):
            kept_first, kept_second = truncation_lengths(len(first), len(second), budget)
            ids = first[:kept_first] + second[:kept_second]
            pads, ones = [self.pad_id] * max(0, budget - len(ids)), [1] * len(ids)
            if self.padding_side == "left":
                rows.append((pads + ids, [0] * len(pads) + ones))
            else:
                rows.append((ids + pads, ones + [0] * len(pads)))
        return rows

    def encoded(self, result: Any) -> list[Encoded]:
        if result and isinstance(result[0], tuple):
            return [Encoded(tuple(ids), tuple(mask)) for ids, mask in result]
        return [Encoded(tuple(result))]


def truncation_lengths(first: int, second: int, budget: int) -> tuple[int, int]:
    """Longest-first truncation of a pair as `tokenizers` does it: when both must be cut and the budget is
    odd, the longer one (the second on a tie) keeps the extra token. (transformers' Python tokenizers give
    it to the first: one of the differences the agreement check finds.)"""
    if first + second <= budget:
        return first, second
    short = min(first, second)
    long_kept = short if short > budget else max(short, budget - short)
    if short + long_kept > budget:
        short, long_kept = budget // 2, budget // 2 + budget % 2
    return (long_kept, short) if first > second else (short, long_kept)


class TiktokenImplementation(_TemplateFreeImplementation):
    name = "tiktoken"
    backend = "Rust (tiktoken)"

    def __init__(self, encoding: Any, notes: Sequence[str] = ()) -> None:
        super().__init__(_version("tiktoken"), "tiktoken.Encoding", notes)
        self.encoding = encoding

    def single(self, text: str) -> Any:
        return self.encoding.encode(text, allowed_special="all")

    def encode_many(self, texts: list[str]) -> list[list[int]]:
        return self.encoding.encode_batch(texts, num_threads=self.threads, allowed_special="all")

    def decode(self, ids: Sequence[int]) -> str:
        return self.encoding.decode(list(ids))


class SentencePieceImplementation(_TemplateFreeImplementation):
    name = "sentencepiece"
    backend = "C++ (sentencepiece)"

    def __init__(self, model_path: Path, notes: Sequence[str] = ()) -> None:
        import sentencepiece

        super().__init__(_version("sentencepiece"), "SentencePieceProcessor", notes)
        self.processor = sentencepiece.SentencePieceProcessor(model_file=str(model_path))

    def single(self, text: str) -> Any:
        return self.processor.encode(text)

    def encode_many(self, texts: list[str]) -> list[list[int]]:
        return self.processor.encode(texts, num_threads=self.threads)

    def decode(self, ids: Sequence[int]) -> str:
        return self.processor.decode(list(ids))


# ---------------------------------------------------------------- building them


@dataclass(frozen=True)
class Skipped:
    """An implementation that could not be built from these files, and why."""

    name: str
    reason: str


class _Skip(Exception):
    """Raised by a builder: the implementation does not apply to this tokenizer (the message says why)."""


@dataclass
class TokenizerSuite:
    """Every implementation built for one tokenizer, the ones skipped, and what was noticed on the way."""

    files: TokenizerFiles
    implementations: list[Implementation]
    skipped: list[Skipped]
    warnings: list[str]
    model_type: str  # WordPiece, BPE, Unigram... (of the reference implementation)

    def get(self, name: str) -> Implementation:
        for implementation in self.implementations:
            if implementation.name == name:
                return implementation
        reason = next((s.reason for s in self.skipped if s.name == name), "not one of " + ", ".join(
            IMPLEMENTATION_NAMES))
        raise UsageError(f"implementation {name!r} is not available for this tokenizer: {reason}",
                         hint="Available: " + ", ".join(i.name for i in self.implementations))

    @property
    def default_reference(self) -> str:
        """What the model is normally fed by: transformers for model folders, the library itself otherwise."""
        order: tuple[str, ...] = ("sentencepiece",) if self.files.kind == "sentencepiece" else ()
        order += ("transformers", "tokenizers", "sentencepiece", "transformers-python", "tiktoken")
        available = {i.name for i in self.implementations}
        return next(name for name in order if name in available)


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' per-call warnings (the longest_first notice, long-sequence notices)."""
    from transformers.utils import logging as hf_logging

    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)


def load_suite(ref: ModelRef, scratch: Path) -> TokenizerSuite:
    """Build every applicable implementation of `ref` (scratch: a folder for derived files)."""
    files = resolve_files(ref, scratch)
    warnings: list[str] = []
    with quiet_transformers():
        rust = _build(lambda: _transformers_rust(files, scratch, warnings))
        builders: dict[str, Callable[[], Implementation]] = {
            "transformers-python": lambda: _transformers_python(files, scratch, _unwrap(rust)),
            "transformers": lambda: _unwrap(rust),
            "tokenizers": lambda: _tokenizers_direct(files, rust),
            "tiktoken": lambda: _tiktoken(files, _unwrap(rust), warnings),
            "sentencepiece": lambda: _sentencepiece(files),
        }
        implementations, skipped = [], []
        for name, builder in builders.items():
            built = _build(builder)
            if isinstance(built, Implementation):
                implementations.append(built)
            else:
                skipped.append(Skipped(name, str(built)))
    if not implementations:
        raise InputError(f"no implementation could load {ref}",
                         hint="; ".join(f"{s.name}: {s.reason}" for s in skipped))
    return TokenizerSuite(files, implementations, skipped, warnings, _model_type(files, rust))


def _build(builder: Callable[[], Implementation]) -> Implementation | _Skip:
    try:
        return builder()
    except _Skip as skip:
        return skip
    except (InputError, UsageError):
        raise
    except Exception as exc:  # a library refusing these files is a reason to skip, shown to the user
        return _Skip(f"failed to load: {type(exc).__name__}: {exc}")


def _unwrap(built: Implementation | _Skip) -> Any:
    if isinstance(built, _Skip):
        raise _Skip(f"needs the transformers tokenizer, which could not be built ({built})")
    return built


def _model_type(files: TokenizerFiles, rust: Implementation | _Skip) -> str:
    if isinstance(rust, TransformersImplementation) and hasattr(rust.tokenizer, "backend_tokenizer"):
        return type(rust.tokenizer.backend_tokenizer.model).__name__
    if files.spm_model is not None:
        return spm_model_type(files.spm_model)
    return {"wordpiece": "WordPiece", "bpe": "BPE"}.get(files.kind, "unknown")


def _version(package: str) -> str:
    try:
        return f"{package} {metadata.version(package)}"
    except metadata.PackageNotFoundError:
        return package


# ---- transformers, Rust-backed


def _transformers_rust(files: TokenizerFiles, scratch: Path, warnings: list[str]) -> Implementation:
    from transformers import AutoTokenizer, BertTokenizer, GPT2Tokenizer, TokenizersBackend

    notes: list[str] = []
    if files.folder is not None:
        tokenizer = AutoTokenizer.from_pretrained(files.folder, local_files_only=True, trust_remote_code=False)
    elif files.kind == "wordpiece":
        tokenizer = BertTokenizer(vocab=str(files.wordpiece_vocab))
        notes.append("BertTokenizer defaults: lowercase, Chinese characters split, [CLS]/[SEP] template")
    elif files.kind == "bpe":
        vocab = read_json(files.bpe_vocab)
        tokenizer = GPT2Tokenizer(vocab=vocab, merges=_read_merges(files.bpe_merges))  # type: ignore[arg-type]
    else:  # a bare tokenizer.json or .model: the generic class, through a scratch folder
        folder = scratch / "transformers"
        folder.mkdir(exist_ok=True)
        source = files.tokenizer_json or files.spm_model
        assert source is not None
        shutil.copyfile(source, folder / ("tokenizer.json" if files.tokenizer_json else "tokenizer.model"))
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
        notes.append(f"generic {type(tokenizer).__name__}: no tokenizer_config.json, so no model-specific settings")
    if not isinstance(tokenizer, TokenizersBackend):
        raise _Skip(f"transformers loaded {type(tokenizer).__name__}, which is not Rust-backed")
    _ensure_pad_token(tokenizer, notes, files)
    _check_spm_class(files, tokenizer, warnings)
    return TransformersImplementation(tokenizer, "transformers", "Rust (transformers)", notes)


def _ensure_pad_token(tokenizer: Any, notes: list[str], files: TokenizerFiles) -> None:
    """Batches need a pad token; GPT-2 and bare files have none, so borrow one as data collators do."""
    if tokenizer.pad_token is not None:
        return
    if files.spm_model is not None and tokenizer.eos_token is None:
        import sentencepiece

        processor = sentencepiece.SentencePieceProcessor(model_file=str(files.spm_model))
        for piece_id in (processor.pad_id(), processor.eos_id(), processor.unk_id()):
            if piece_id >= 0:
                tokenizer.pad_token = processor.id_to_piece(piece_id)
                break
    elif tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    else:
        vocab = tokenizer.get_vocab()
        candidate = next((token for token in PAD_CANDIDATES if token in vocab), None)
        if candidate is not None:
            tokenizer.pad_token = candidate
    if tokenizer.pad_token is not None:
        notes.append(f"no pad token: padding with {tokenizer.pad_token!r} (id {tokenizer.pad_token_id})")


def _check_spm_class(files: TokenizerFiles, tokenizer: Any, warnings: list[str]) -> None:
    """A SentencePiece model converted by the wrong class changes its algorithm without a word."""
    if files.spm_model is None or not hasattr(tokenizer, "backend_tokenizer"):
        return
    spm_type = spm_model_type(files.spm_model)
    loaded_type = type(tokenizer.backend_tokenizer.model).__name__
    if spm_type in ("Unigram", "BPE") and loaded_type != spm_type:
        warnings.append(f"{files.spm_model.name} is a SentencePiece {spm_type} model but transformers loaded it "
                        f"as {type(tokenizer).__name__} with a {loaded_type} model: it will not tokenize as "
                        "trained (check tokenizer_class in tokenizer_config.json)")


def _read_merges(path: Path | None) -> list[tuple[str, str]]:
    assert path is not None
    lines = path.read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split(" ", 1)) for line in lines if line.strip() and not line.startswith("#version")]
    if any(len(pair) != 2 for pair in merges):
        raise InputError(f"{path} is not a BPE merges file (expected 'left right' on every line)")
    return merges  # type: ignore[return-value]


# ---- transformers, pure Python


def _transformers_python(files: TokenizerFiles, scratch: Path, rust: TransformersImplementation) -> Implementation:
    from transformers import AutoTokenizer, BertTokenizerLegacy, TokenizersBackend

    notes = []
    if files.folder is not None:
        auto_slow = AutoTokenizer.from_pretrained(files.folder, use_fast=False, local_files_only=True,
                                                  trust_remote_code=False)
        if isinstance(auto_slow, TokenizersBackend):
            notes.append(f"AutoTokenizer(use_fast=False) returned the Rust-backed {type(auto_slow).__name__}; "
                         "the Python class is built explicitly")
    model_type = _model_type(files, rust)
    if model_type == "WordPiece":
        vocab_file, settings = _wordpiece_source(files, scratch, rust.tokenizer, notes)
        specials = {name: getattr(rust.tokenizer, name) for name in
                    ("unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
                    if getattr(rust.tokenizer, name, None) is not None}
        tokenizer: Any = BertTokenizerLegacy(vocab_file=str(vocab_file), **settings, **specials)
        notes.append("BertTokenizerLegacy omits token_type_ids unless asked: requested explicitly")
        return TransformersImplementation(tokenizer, "transformers-python", "Python", notes,
                                          type_ids=rust.type_ids)
    if files.spm_model is not None:
        from transformers import SentencePieceBackend

        tokenizer = SentencePieceBackend(vocab_file=str(files.spm_model))
        notes.append("generic SentencePieceBackend: adds no special tokens, compared on the text's own ids")
        return TransformersImplementation(tokenizer, "transformers-python", "Python", notes,
                                          type_ids=False, template=False)
    if model_type == "BPE":
        raise _Skip("transformers 5 has no pure-Python BPE tokenizer (GPT2Tokenizer and friends are "
                    "Rust-backed): compare tiktoken and tokenizers instead")
    raise _Skip(f"transformers 5 has no pure-Python class for a {model_type} tokenizer")


def _wordpiece_source(files: TokenizerFiles, scratch: Path, rust_tokenizer: Any,
                      notes: list[str]) -> tuple[Path, dict[str, Any]]:
    """The vocab.txt the Python class reads (extracted from tokenizer.json when there is none) and the
    normalisation settings of the Rust pipeline, so both run the same BERT pre-processing."""
    pipeline = json.loads(rust_tokenizer.backend_tokenizer.to_str())
    normalizer, pre_tokenizer = pipeline.get("normalizer") or {}, pipeline.get("pre_tokenizer") or {}
    if normalizer.get("type") != "BertNormalizer" or pre_tokenizer.get("type") != "BertPreTokenizer":
        raise _Skip(f"BertTokenizerLegacy only runs BERT's pipeline; this WordPiece uses "
                    f"{normalizer.get('type')} + {pre_tokenizer.get('type')}")
    settings = {"do_lower_case": bool(normalizer.get("lowercase", True)),
                "strip_accents": normalizer.get("strip_accents"),
                "tokenize_chinese_chars": bool(normalizer.get("handle_chinese_chars", True))}
    if files.wordpiece_vocab is not None:
        return files.wordpiece_vocab, settings
    vocab = pipeline["model"]["vocab"]
    path = scratch / "vocab-from-tokenizer-json.txt"
    ordered = sorted(vocab.items(), key=lambda item: item[1])
    if [index for _, index in ordered] != list(range(len(ordered))):
        raise _Skip("the WordPiece ids in tokenizer.json are not 0..N-1, so no vocab.txt can represent them")
    path.write_text("".join(f"{token}\n" for token, _ in ordered), encoding="utf-8")
    notes.append("vocab.txt extracted from tokenizer.json")
    return path, settings


# ---- tokenizers, called directly


def _tokenizers_direct(files: TokenizerFiles, rust: Implementation | _Skip) -> Implementation:
    if files.tokenizer_json is not None:
        return TokenizersImplementation(files.tokenizer_json.read_text(encoding="utf-8"),
                                        [f"pipeline from {files.tokenizer_json.name}"])
    return TokenizersImplementation(_unwrap(rust).tokenizer.backend_tokenizer.to_str(),
                                    ["pipeline as transformers converts it from " + ", ".join(
                                        Path(p).name for p in files.paths)])


# ---- tiktoken


def _tiktoken(files: TokenizerFiles, rust: TransformersImplementation, warnings: list[str]) -> Implementation:
    """A tiktoken Encoding from a byte-level BPE vocabulary: GPT-2's printable alphabet mapped back to bytes,
    the token ids used as merge ranks (no download: everything comes from the local files)."""
    if importlib.util.find_spec("tiktoken") is None:
        raise _Skip("tiktoken is not installed (pip install tiktoken)")
    import tiktoken

    pipeline = json.loads(rust.tokenizer.backend_tokenizer.to_str())
    model = pipeline.get("model") or {}
    if model.get("type") != "BPE":
        raise _Skip(f"tiktoken only runs byte-level BPE; this tokenizer is {model.get('type')}")
    if pipeline.get("normalizer"):
        raise _Skip(f"the tokenizer normalises text ({pipeline['normalizer'].get('type')}); tiktoken cannot")
    pattern = _byte_level_pattern(pipeline.get("pre_tokenizer") or {})
    notes = []
    if files.bpe_vocab is not None:
        vocab = read_json(files.bpe_vocab)
        notes.append(f"ranks from {files.bpe_vocab.name}")
    else:
        vocab = model["vocab"]
    special = {token["content"]: token["id"] for token in pipeline.get("added_tokens", []) if token.get("special")}
    ranks, problem = _byte_ranks(vocab, special)
    if problem:
        raise _Skip(problem)
    order_problem = _merge_order_problem(model.get("merges") or [], vocab)
    if order_problem:
        warnings.append(f"tiktoken ranks merges by token id, but {order_problem}: expect it to disagree")
    encoding = tiktoken.Encoding("mlops-local", pat_str=pattern, mergeable_ranks=ranks, special_tokens=special)
    return TiktokenImplementation(encoding, notes)


def _byte_level_pattern(pre_tokenizer: dict[str, Any]) -> str:
    kind = pre_tokenizer.get("type")
    if kind == "ByteLevel" and pre_tokenizer.get("use_regex", True):
        if pre_tokenizer.get("add_prefix_space"):
            raise _Skip("the ByteLevel pre-tokenizer adds a prefix space; tiktoken does not")
        return GPT2_PATTERN
    if kind == "Sequence":
        steps = pre_tokenizer.get("pretokenizers", [])
        if (len(steps) == 2 and steps[0].get("type") == "Split" and "Regex" in steps[0].get("pattern", {})
                and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert")
                and steps[1].get("type") == "ByteLevel" and not steps[1].get("use_regex", True)
                and not steps[1].get("add_prefix_space")):
            return steps[0]["pattern"]["Regex"]
    raise _Skip(f"tiktoken needs a byte-level BPE pre-tokenizer; this one is {kind}")


def _byte_ranks(vocab: dict[str, int], special: dict[str, int]) -> tuple[dict[bytes, int], str | None]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    to_byte = {char: byte for byte, char in bytes_to_unicode().items()}
    ranks: dict[bytes, int] = {}
    for token, index in vocab.items():
        if token in special:
            continue
        if any(char not in to_byte for char in token):
            return {}, f"token {token!r} is not in the byte-level alphabet, so this is not byte-level BPE"
        ranks[bytes(to_byte[char] for char in token)] = index
    missing = 256 - sum(1 for key in ranks if len(key) == 1)
    if missing:
        return {}, f"the vocabulary lacks {missing} of the 256 single bytes that tiktoken needs"
    return ranks, None


def _merge_order_problem(merges: list[Any], vocab: dict[str, int]) -> str | None:
    """tiktoken merges the pair whose result has the lowest id; BPE merges by merge-list position."""
    previous = -1
    for position, merge in enumerate(merges):
        left, right = merge if isinstance(merge, list) else merge.split(" ", 1)
        merged_id = vocab.get(left + right)
        if merged_id is None:
            return f"merge #{position} ({left} {right}) makes a token missing from the vocabulary"
        if merged_id < previous:
            return f"merge #{position} ({left} {right}) makes id {merged_id}, lower than an earlier merge's"
        previous = merged_id
    return None


# ---- sentencepiece


def _sentencepiece(files: TokenizerFiles) -> Implementation:
    if files.spm_model is None:
        raise _Skip(f"no SentencePiece .model file (this is a {files.kind} tokenizer)")
    if importlib.util.find_spec("sentencepiece") is None:
        raise _Skip("sentencepiece is not installed (pip install sentencepiece)")
    return SentencePieceImplementation(files.spm_model, [f"{spm_model_type(files.spm_model)} model "
                                                         f"{files.spm_model.name}"])


def rust_thread_setting() -> int:
    """Worker threads the Rust tokenizers use for batches, as the environment configures them now."""
    if os.environ.get("TOKENIZERS_PARALLELISM", "true").lower() in ("0", "false", "no", "off"):
        return 1
    configured = os.environ.get("RAYON_NUM_THREADS") or os.environ.get("RAYON_RS_NUM_CPUS")
    return int(configured) if configured and configured.isdigit() and int(configured) > 0 else (os.cpu_count() or 1)
