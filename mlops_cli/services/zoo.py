"""`mlops zoo`: list the built-in models and save one as an ordinary checkpoint folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mlops_cli.core import zoo
from mlops_cli.core.contract import BUILTIN_PREFIX, ModelRef, OutputOptions, Report
from mlops_cli.core.errors import UsageError
from mlops_cli.core.io import atomic_dir
from mlops_cli.core.sidecar import write_sidecar


@dataclass(frozen=True)
class ZooModel:
    name: str
    reference: str
    kind: str
    description: str


@dataclass(frozen=True, kw_only=True)
class ZooListing(Report):
    models: tuple[ZooModel, ...]


@dataclass(frozen=True, kw_only=True)
class ZooSaveOptions(OutputOptions):
    """`zoo save NAME DIR`: where to write the folder (loading options do not apply to built-in models)."""


@dataclass(frozen=True, kw_only=True)
class ZooSaveReport(Report):
    name: str
    path: str
    files: dict[str, int]
    parameters: int
    usage: str  # how to pass the saved folder to other commands


def list_models() -> ZooListing:
    """`zoo list` takes no MODEL reference, so it is the one operation here outside `run(ref, options)`."""
    return ZooListing(models=tuple(ZooModel(e.name, f"{BUILTIN_PREFIX}{e.name}", e.kind, e.description)
                                   for e in zoo.ENTRIES.values()))


def run(ref: ModelRef, options: ZooSaveOptions) -> ZooSaveReport:
    """`zoo save`: `ref` names a built-in model (`ModelRef.parse("builtin:NAME")`)."""
    if ref.builtin is None:
        raise UsageError(f"{ref} is not a built-in model", hint="See `mlops zoo list`.")
    return save_model(ref.builtin, options.output, options.force)


def save_model(name: str, output: Path, force: bool = False) -> ZooSaveReport:
    """Write a built-in model as a Hugging Face folder (HF models) or safetensors + mlops.json (modules)."""
    entry = zoo.entry(name)
    module, tokenizer = zoo.build(name)
    with atomic_dir(output, force) as folder:
        if entry.kind == "hf":
            module.save_pretrained(folder, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(folder)
            usage = f"mlops summarize {output}"
        else:
            from safetensors.torch import save_file

            state = {k: v.contiguous() for k, v in module.state_dict().items()}
            save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
            sidecar = {"weights": "model.safetensors", "arch": zoo.ARCH_PATHS[name], "arch_kwargs": {},
                       "inputs": list(entry.inputs)}
            write_sidecar(folder, sidecar)
            usage = (f"mlops summarize {output}   (or: mlops summarize {output}/model.safetensors "
                     f"--arch {zoo.ARCH_PATHS[name]} --input {entry.inputs[0]})")
        files = {p.name: p.stat().st_size for p in sorted(folder.iterdir())}
    parameters = sum(p.numel() for p in module.parameters())
    return ZooSaveReport(name=name, path=str(output), files=files, parameters=parameters, usage=usage)
