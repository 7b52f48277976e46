"""Example inputs for any model: `--input` specs, Hugging Face configs and tokenizers, several shape sets.

Inputs are numpy arrays so the same set feeds torch, TorchScript, torch.export and ONNX Runtime alike.
Text inputs are realistic on purpose: token ids inside the vocabulary, an attention mask with real
padding (never all zeros, the trap of the tips' §7), token types with two segments.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mlops_cli.core.errors import InputError, UsageError

DTYPES = {
    "float32": np.float32, "float": np.float32, "fp32": np.float32, "float16": np.float16, "fp16": np.float16,
    "float64": np.float64, "int64": np.int64, "long": np.int64, "int32": np.int32, "int": np.int32,
    "bool": np.bool_, "uint8": np.uint8, "int8": np.int8,
}
DEFAULT_DIM_SIZES = {"batch": 2, "sequence": 16, "seq": 16, "sequence_length": 16, "height": 32, "width": 32}
VISION_MODEL_TYPES = ("vit", "deit", "convnext", "resnet", "swin", "beit", "mobilenet_v2", "dinov2", "efficientnet")
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
_SPEC = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*:\s*(\w+)\s*\[([^\]]*)\]\s*$")


@dataclass(frozen=True)
class Dim:
    """One dimension of an input: a fixed size, or a named one (varied by multi-shape checks)."""

    size: int
    name: str | None = None


@dataclass(frozen=True)
class InputSpec:
    """`name:dtype[d0,d1,...]`; a dim is `N`, `name` (default size) or `name=N`."""

    name: str
    dtype: str
    dims: tuple[Dim, ...]

    def shape(self, sizes: dict[str, int] | None = None) -> tuple[int, ...]:
        sizes = sizes or {}
        return tuple(sizes.get(d.name, d.size) if d.name else d.size for d in self.dims)

    def __str__(self) -> str:
        dims = ",".join(f"{d.name}={d.size}" if d.name else str(d.size) for d in self.dims)
        return f"{self.name}:{self.dtype}[{dims}]"


@dataclass(frozen=True)
class InputSet:
    """One set of example inputs fed to a model, labelled by its shape (e.g. 'batch=3,sequence=24')."""

    label: str
    tensors: dict[str, np.ndarray]
    sizes: dict[str, int]


def parse_input_spec(text: str) -> InputSpec:
    """Parse `x:float32[batch,3,224,224]`. Unnamed first dims become the named dim `batch`."""
    match = _SPEC.match(text)
    if not match:
        raise UsageError(f"--input {text!r} is not of the form name:dtype[d0,d1,...]",
                         hint="Example: --input x:float32[batch=2,3,224,224]")
    name, dtype, dims_text = match.groups()
    if dtype not in DTYPES:
        raise UsageError(f"--input {text!r}: unknown dtype {dtype!r}", hint=f"Use one of: {', '.join(DTYPES)}.")
    dims = []
    for raw in (part.strip() for part in dims_text.split(",") if part.strip()):
        dim_name, _, size_text = raw.partition("=")
        if raw.isdigit():
            dims.append(Dim(int(raw)))
        elif size_text.isdigit() and dim_name.isidentifier():
            dims.append(Dim(int(size_text), dim_name))
        elif raw.isidentifier() and raw in DEFAULT_DIM_SIZES:
            dims.append(Dim(DEFAULT_DIM_SIZES[raw], raw))
        else:
            raise UsageError(f"--input {text!r}: dim {raw!r} needs a size", hint=f"Write it as {dim_name}=N.")
    if dims and not any(d.name for d in dims):
        dims[0] = Dim(dims[0].size, "batch")  # the first dim is the one later checks vary by default
    return InputSpec(name, DTYPES[dtype].__name__, tuple(dims))


# ---------------------------------------------------------------- specs from models


def specs_for(loaded: Any, explicit: list[str] | None = None) -> list[InputSpec]:
    """Input specs for a model: --input specs, else the model's known specs, else from its HF config."""
    if explicit:
        return [parse_input_spec(text) for text in explicit]
    if loaded.input_specs:
        return [parse_input_spec(text) for text in loaded.input_specs]
    if loaded.config is not None:
        return hf_input_specs(loaded.config, loaded.module)
    if loaded.kind.value == "onnx" and loaded.path is not None:
        return onnx_input_specs(loaded.path)
    raise UsageError(f"{loaded.reference}: mlops cannot tell what inputs this model takes",
                     hint="Describe them with --input name:dtype[d0,d1,...], "
                          "e.g. --input x:float32[batch=2,3,224,224].")


def hf_input_specs(config: Any, module: Any = None) -> list[InputSpec]:
    """The inputs a Hugging Face model takes, from its config (and forward signature when known)."""
    accepted = set(inspect.signature(module.forward).parameters) if module is not None else set()
    is_vision = getattr(config, "model_type", "") in VISION_MODEL_TYPES or (
        hasattr(config, "num_channels") and hasattr(config, "image_size") and not hasattr(config, "vocab_size"))
    if is_vision:
        size = int(getattr(config, "image_size", 224))
        channels = int(getattr(config, "num_channels", 3))
        return [InputSpec("pixel_values", "float32",
                          (Dim(2, "batch"), Dim(channels), Dim(size, "height"), Dim(size, "width")))]
    text_dims = (Dim(2, "batch"), Dim(16, "sequence"))
    specs = [InputSpec("input_ids", "int64", text_dims), InputSpec("attention_mask", "int64", text_dims)]
    if getattr(config, "type_vocab_size", 0) and (not accepted or "token_type_ids" in accepted):
        specs.append(InputSpec("token_type_ids", "int64", text_dims))
    if getattr(config, "is_encoder_decoder", False) and (not accepted or "decoder_input_ids" in accepted):
        # encoder-decoder models (T5, BART, Marian) also need what the decoder has produced so far
        specs.append(InputSpec("decoder_input_ids", "int64", (Dim(2, "batch"), Dim(8, "decoder_sequence"))))
    return specs


def onnx_input_specs(path: Path) -> list[InputSpec]:
    """Specs from an ONNX graph's inputs: symbolic dims become named dims."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {init.name for init in graph.initializer}
    specs = []
    for value in graph.input:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)).name
        dims = []
        for index, dim in enumerate(tensor_type.shape.dim):
            if dim.HasField("dim_value") and dim.dim_value > 0:
                dims.append(Dim(int(dim.dim_value)))
            else:
                symbol = _normalise_dim_name(dim.dim_param or ("batch" if index == 0 else f"dim{index}"), index)
                dims.append(Dim(DEFAULT_DIM_SIZES.get(symbol, 8), symbol))
        specs.append(InputSpec(value.name, dtype, tuple(dims)))
    return specs


def _normalise_dim_name(symbol: str, index: int) -> str:
    """Map exporter-generated symbols (s0, s1, unk__0...) onto the dims our checks vary."""
    lowered = symbol.lower()
    if "batch" in lowered:
        return "batch"
    if "seq" in lowered or "length" in lowered:
        return "sequence"
    if re.fullmatch(r"s\d+|unk__\d+|dynamic.*|n", lowered) and index <= 1:
        return "batch" if index == 0 else "sequence"
    return symbol


# ---------------------------------------------------------------- generation


def make_inputs(specs: list[InputSpec], sizes: dict[str, int] | None = None, *, seed: int = 0,
                vocab_size: int | None = None, pad_token_id: int | None = None, pad: bool = True) -> InputSet:
    """Random but realistic inputs for `specs` at `sizes` (named dims override their defaults)."""
    rng = np.random.default_rng(seed)
    sizes = dict(sizes or {})
    for spec in specs:
        for dim in spec.dims:
            if dim.name:
                sizes.setdefault(dim.name, dim.size)
    tensors: dict[str, np.ndarray] = {}
    lengths: np.ndarray | None = None
    for spec in specs:
        shape = spec.shape(sizes)
        dtype = np.dtype(spec.dtype)
        if spec.name == "attention_mask" and len(shape) == 2:
            lengths = padded_lengths(shape[0], shape[1]) if pad else np.full(shape[0], shape[1])
            tensors[spec.name] = (np.arange(shape[1])[None, :] < lengths[:, None]).astype(dtype)
        elif spec.name == "token_type_ids" and len(shape) == 2:
            tensors[spec.name] = (np.arange(shape[1])[None, :] >= shape[1] // 2).repeat(shape[0], 0).astype(dtype)
        elif spec.name == "position_ids":
            tensors[spec.name] = np.broadcast_to(np.arange(shape[-1]), shape).astype(dtype).copy()
        elif np.issubdtype(dtype, np.integer):
            high = vocab_size if (vocab_size and spec.name == "input_ids") else 100
            low = min(5, high - 1)  # keep clear of the special tokens at the start of most vocabularies
            tensors[spec.name] = rng.integers(low, high, size=shape, dtype=dtype)
        elif dtype == np.bool_:
            tensors[spec.name] = np.ones(shape, dtype=bool)
        else:
            tensors[spec.name] = rng.standard_normal(shape).astype(dtype)
    if lengths is not None and "input_ids" in tensors and pad_token_id is not None:
        ids = tensors["input_ids"]
        ids[np.arange(ids.shape[1])[None, :] >= lengths[:, None]] = pad_token_id
    label = ",".join(f"{name}={size}" for name, size in sizes.items())
    return InputSet(label or "example", tensors, sizes)


def padded_lengths(batch: int, sequence: int) -> np.ndarray:
    """Per-row lengths with real padding: row 0 full, later rows shorter (at least 1 token, never 0)."""
    if batch == 1:
        return np.array([sequence])
    return np.array([max(1, sequence - (i * sequence) // (batch + 1)) for i in range(batch)])


def varied_sizes(base: dict[str, int], max_sequence: int | None = None) -> list[dict[str, int]]:
    """The sizes multi-shape checks run at: `base` (the user's sizes, or the specs' defaults) first, then sizes
    derived from it: batch 1 with a shorter sequence, a larger batch with a longer one (never past the model's
    maximum), so a graph fixed to the first shape, or a trace specialised to batch 1, is caught."""
    sizes = [dict(base)]
    batch, sequence = base.get("batch"), base.get("sequence")
    if batch is not None and sequence is not None:
        longest = max_sequence or max(2 * sequence, sequence + 8)
        sizes.append({**base, "batch": 1, "sequence": max(1, sequence // 2)})
        sizes.append({**base, "batch": batch + 1, "sequence": min(longest, max(2 * sequence, sequence + 8))})
    elif batch is not None:
        sizes += [{**base, "batch": 1}, {**base, "batch": batch + 1}]
    unique: list[dict[str, int]] = []
    for candidate in sizes:
        if candidate not in unique:
            unique.append(candidate)
    return unique


@dataclass(frozen=True)
class InputRequest:
    """What the user asked for: `--input` specs, `--text`, `--inputs FILE`, `--batch-size`/`--seq-len`."""

    specs: tuple[str, ...] = ()
    texts: tuple[str, ...] = ()
    file: str | None = None
    batch_size: int | None = None
    seq_len: int | None = None
    samples: int = 1  # random draws of every shape set
    seed: int = 0

    def __post_init__(self) -> None:
        if sum(map(bool, (self.file, self.specs, self.texts))) > 1:
            raise UsageError("--inputs FILE, --input specs and --text cannot be combined", hint="Use one of them.")
        for name, value in (("--batch-size", self.batch_size), ("--seq-len", self.seq_len)):
            if value is not None and value < 1:
                raise UsageError(f"{name} must be at least 1")
        if self.samples < 1:
            raise UsageError("--samples must be at least 1")


@dataclass(frozen=True)
class InputPlan:
    """The inputs of one run, resolved once and passed down: specs, and the input sets every step uses.

    `sets[0]` is at the user's sizes (or the specs' defaults); the others vary the named dims from there.
    """

    specs: tuple[InputSpec, ...]
    sets: tuple[InputSet, ...]
    source: str
    vocab_size: int | None = None
    pad_token_id: int | None = None

    @property
    def example(self) -> InputSet:
        return self.sets[0]

    def at(self, sizes: dict[str, int], seed: int = 0) -> InputSet:
        """The same inputs at other sizes (e.g. an export example whose dynamic dims must be >= 2)."""
        if not self.specs:
            return self.example
        return make_inputs(list(self.specs), sizes, seed=seed, vocab_size=self.vocab_size,
                           pad_token_id=self.pad_token_id)

    def export_example(self, dims: tuple[str, ...]) -> InputSet:
        """The example to export with: `example`, with each of the dynamic `dims` of size 1 raised to 2.
        Exporters specialise size-1 dims to constants (torch.export's 0/1 specialisation), so a batch-1 example
        would fix the batch; `sets` still hold the user's sizes, so the artefact is verified at size 1 too."""
        sizes = {name: 2 if name in dims and size == 1 else size for name, size in self.example.sizes.items()}
        return self.example if sizes == self.example.sizes else self.at(sizes)


def plan_inputs(loaded: Any, request: InputRequest | None = None) -> InputPlan:
    """Resolve a request against a model: real inputs (file, texts), or random draws at several shapes."""
    request = request or InputRequest()
    if request.file:
        return InputPlan((), (load_inputs_file(request.file),), f"file {Path(request.file).name}")
    if request.texts:
        texts = list(request.texts)
        return InputPlan((), (from_texts(loaded, texts, request.seq_len),),
                         f"{len(texts)} text(s), tokenizer of {loaded.reference}")
    specs = specs_for(loaded, list(request.specs) or None)
    vocab, pad_id, max_positions = text_properties(loaded)
    base = {dim.name: dim.size for spec in specs for dim in spec.dims if dim.name}
    for name, value in (("batch", request.batch_size), ("sequence", request.seq_len)):
        if value is not None:
            if name not in base:
                raise UsageError(f"--{'batch-size' if name == 'batch' else 'seq-len'} was given but the inputs of "
                                 f"{loaded.reference} have no {name} dim",
                                 hint="Name the dim in --input, e.g. x:float32[batch=2,3,32,32].")
            base[name] = value
    sets: list[InputSet] = []
    for sample in range(request.samples):
        for index, sizes in enumerate(varied_sizes(base, max_positions)):
            drawn = make_inputs(specs, sizes, seed=request.seed + 1000 * sample + index, vocab_size=vocab,
                                pad_token_id=pad_id)
            label = drawn.label if request.samples == 1 else f"{drawn.label} #{sample + 1}"
            sets.append(InputSet(label, drawn.tensors, drawn.sizes))
    origin = "--input specs" if request.specs else f"shapes of {loaded.reference}"
    draws = f", {request.samples} random draw(s)" if request.samples > 1 else ""
    return InputPlan(tuple(specs), tuple(sets), f"{origin}{draws}, seed {request.seed}", vocab, pad_id)


def text_properties(loaded: Any) -> tuple[int | None, int | None, int | None]:
    """(vocab size, pad token id, max positions) from a model's config and tokenizer."""
    config = loaded.config
    vocab = getattr(config, "vocab_size", None) if config is not None else None
    pad_id = getattr(config, "pad_token_id", None) if config is not None else None
    if pad_id is None and loaded.tokenizer is not None:
        pad_id = loaded.tokenizer.pad_token_id
    if pad_id is None and config is not None:
        pad_id = getattr(config, "eos_token_id", None)
    max_positions = None
    if config is not None:
        max_positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return vocab, (int(pad_id) if isinstance(pad_id, int) else None), max_positions


def from_texts(loaded: Any, texts: list[str], max_length: int | None = None) -> InputSet:
    """Tokenize real texts with the model's tokenizer (`--text`)."""
    if loaded.tokenizer is None:
        raise UsageError(f"{loaded.reference} has no tokenizer, so --text cannot be used",
                         hint="Use --input specs instead.")
    tokenizer = loaded.tokenizer
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    encoded = tokenizer(texts, padding=True, truncation=max_length is not None, max_length=max_length,
                        return_tensors="np")
    accepted = set(inspect.signature(loaded.module.forward).parameters) if loaded.module is not None else None
    tensors = {k: np.asarray(v).astype(np.int64) for k, v in encoded.items() if accepted is None or k in accepted}
    batch, sequence = tensors["input_ids"].shape
    return InputSet(f"text:batch={batch},sequence={sequence}", tensors, {"batch": batch, "sequence": sequence})


def load_inputs_file(path: str | Path) -> InputSet:
    """Real inputs from an .npz or .safetensors file (`--inputs FILE`)."""
    from mlops_cli.core.formats import Format, detect_format

    target = Path(path)
    fmt = detect_format(target)
    if fmt == Format.NPZ:
        with np.load(target, allow_pickle=False) as archive:
            tensors = {name: archive[name] for name in archive.files}
    elif fmt == Format.SAFETENSORS:
        from safetensors.numpy import load_file

        tensors = load_file(str(target))
    else:
        raise InputError(f"--inputs {target} is {fmt.value}; expected .npz or .safetensors")
    first = next(iter(tensors.values()), None)
    sizes = {"batch": int(first.shape[0])} if first is not None and first.ndim else {}
    return InputSet(f"file:{target.name}", tensors, sizes)
