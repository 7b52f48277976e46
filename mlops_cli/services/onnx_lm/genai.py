"""ONNX Runtime GenAI folders: recognise and check one, open it with `onnxruntime_genai`, run it.

A genai folder is what the model builder of `onnxruntime-genai` writes (`export onnx --task causal-lm --engine
genai`): `genai_config.json`, whose `model.decoder.filename` names the decoder graph, the graph and its weights,
and the tokenizer files. The runtime (`og.Model`, `og.Generator`) owns the KV cache and the search (greedy,
sampling, beams); we drive it one token at a time so each token is timed, and read the logits it computed
(`get_logits` for the next token's, `get_output("logits")` for a whole pass) for parity checks.

`onnxruntime_genai` is an optional dependency (the `extras`): it is imported here, lazily, and a missing install
is an InputError saying how to add it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from mlops_cli.core.errors import InputError, UsageError

GENAI_CONFIG = "genai_config.json"
INSTALL_HINT = ("Install it: pip install 'onnxruntime-genai>=0.18' (or the project's extras: "
                "pip install 'mlops-cli[extras]').")


def require_genai() -> ModuleType:
    """The `onnxruntime_genai` module, or an InputError (exit 3) saying how to install it."""
    try:
        import onnxruntime_genai as og
    except ImportError as exc:
        raise InputError(f"ONNX Runtime GenAI (onnxruntime-genai) is not installed: {exc}", hint=INSTALL_HINT) from exc
    return og


@dataclass(frozen=True)
class GenaiFolder:
    """A checked genai folder: its decoder graph lies inside it, and the ids generation needs."""

    folder: Path
    model_file: Path
    model_type: str
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    context_length: int | None


def looks_like_genai_folder(path: Path | None) -> bool:
    """A folder holding genai_config.json, or ONNX graphs without an HF config.json (a genai folder that lost its
    config: `read_genai_folder` then says what is missing rather than the loader saying 'not an HF folder')."""
    if path is None or not path.is_dir():
        return False
    if (path / GENAI_CONFIG).exists():
        return True
    return not (path / "config.json").exists() and any(path.glob("*.onnx"))


def read_genai_folder(folder: Path) -> GenaiFolder:
    """Check a genai folder before the runtime sees it: the config is there and readable, and the decoder file
    it names is a plain file inside the folder (a config pointing at `../x.onnx` or an absolute path is refused:
    a folder copied from elsewhere must not make the runtime load files outside it)."""
    config_path = folder / GENAI_CONFIG
    if not config_path.is_file():
        raise InputError(f"{folder} has no {GENAI_CONFIG}: it is not an ONNX Runtime GenAI folder",
                         hint="Build one with `mlops export onnx MODEL --task causal-lm --engine genai -o FOLDER`, "
                              "or give a .onnx decoder file exported with --task causal-lm.")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
        model = config["model"]
        name = model["decoder"]["filename"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{config_path} is not a readable genai config (model.decoder.filename): {exc}",
                         hint="Rebuild the folder with `mlops export onnx --engine genai`.") from exc
    model_file = _inside(folder, str(name), config_path)
    eos = model.get("eos_token_id")
    eos_ids = tuple(int(e) for e in (eos if isinstance(eos, list) else [] if eos is None else [eos]))
    pad = model.get("pad_token_id")
    context = model.get("context_length")
    return GenaiFolder(folder, model_file, str(model.get("type", "?")), eos_ids,
                       int(pad) if pad is not None else (eos_ids[0] if eos_ids else 0),
                       int(context) if isinstance(context, int) else None)


def _inside(folder: Path, name: str, config_path: Path) -> Path:
    """`name` (from the config) as a file of `folder`, refusing absolute paths, `..` and links leading out."""
    candidate = Path(name)
    root = folder.resolve()
    resolved = (folder / candidate).resolve()
    if candidate.is_absolute() or ".." in candidate.parts or not resolved.is_relative_to(root):
        raise InputError(f"{config_path} names the model file {name!r}, outside the folder {folder}",
                         hint="A genai folder must hold its own model: rebuild it, or fix model.decoder.filename "
                              "to a file name inside the folder.")
    if not resolved.is_file():
        raise InputError(f"{config_path} names the model file {name!r}, which is not in {folder}",
                         hint="Copy the whole folder the builder wrote, or rebuild it.")
    return resolved


def open_model(folder: GenaiFolder, threads: int | None = None, device: str = "cpu") -> Any:
    """`og.Model` on CPU (or CUDA where the installed runtime has it), with `threads` intra-op threads (the genai
    config's session options, overlaid in memory: the folder is not changed; the runtime takes no ONNX Runtime
    session config entries, so thread spinning stays the runtime's choice)."""
    og = require_genai()
    config = og.Config(str(folder.folder))
    config.clear_providers()
    if device.startswith("cuda"):
        if not og.is_cuda_available():
            raise UsageError("the installed onnxruntime-genai has no CUDA support", hint="Use --device cpu.")
        config.append_provider("cuda")
    if threads:
        session = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
        config.overlay(json.dumps({"model": {"decoder": {"session_options": session}}}))
    try:
        return og.Model(config)
    except Exception as exc:
        raise InputError(f"ONNX Runtime GenAI cannot load {folder.folder}: {str(exc).strip().splitlines()[0]}",
                         hint="Rebuild the folder with `mlops export onnx --engine genai`.") from exc


def new_generator(model: Any, max_length: int, **search: Any) -> Any:
    """An `og.Generator` whose search stops at `max_length` tokens (prompt included)."""
    og = require_genai()
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=max_length, **search)
    return og.Generator(model, params)


def token_array(rows: Sequence[Sequence[int]]) -> np.ndarray:
    return np.asarray(rows, dtype=np.int32)


def greedy_with_scores(model: Any, prompt: Sequence[int], max_new_tokens: int) -> tuple[list[int], list[np.ndarray]]:
    """Greedy new tokens and the raw logits each was chosen from: the argmax of the runtime's logits appended to
    its own cache, exactly `max_new_tokens` of them (an EOS is a token like any other here, as on the reference
    side of a parity check, where the runtime's search would stop or mask it)."""
    generator = new_generator(model, len(prompt) + max_new_tokens)
    generator.append_tokens(token_array([prompt]))
    tokens: list[int] = []
    scores: list[np.ndarray] = []
    while len(tokens) < max_new_tokens:
        scores.append(np.asarray(generator.get_logits(), dtype=np.float32).reshape(-1))
        tokens.append(int(scores[-1].argmax()))
        if len(tokens) < max_new_tokens:
            generator.append_tokens(token_array([[tokens[-1]]]))
    return tokens, scores


def teacher_forced_passes(model: Any, prompt: Sequence[int], tokens: Sequence[int]) -> list[np.ndarray]:
    """Logits of the prompt pass (every position), then of one cached pass per token of `tokens` but the last:
    the same passes as `quality.torch_passes`, the tokens appended to the runtime's own cache."""
    generator = new_generator(model, len(prompt) + len(tokens) + 1)
    generator.append_tokens(token_array([prompt]))
    results = [np.asarray(generator.get_output("logits"), dtype=np.float32)]
    for token in tokens[:-1]:
        generator.append_tokens(token_array([[token]]))
        results.append(np.asarray(generator.get_output("logits"), dtype=np.float32))
    return results


def pass_logits(model: Any, ids: np.ndarray) -> np.ndarray:
    """Logits of one pass over `ids` [1, L] from an empty cache, every position: a `quality.LogitsFn` for the
    sliding-window perplexity of a genai folder."""
    generator = new_generator(model, int(ids.shape[1]) + 1)
    generator.append_tokens(ids.astype(np.int32))
    return np.asarray(generator.get_output("logits"), dtype=np.float32)
