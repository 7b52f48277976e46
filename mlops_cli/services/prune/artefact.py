"""Writing the result like the input (HF folder, weights folder, safetensors or torch file), and loading it
back through mlops to prove it works: the output is the same kind of artefact as the input."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mlops_cli.core.contract import LoadOptions, ModelRef
from mlops_cli.core.formats import Format, read_safetensors_header
from mlops_cli.core.io import copy_extras
from mlops_cli.core.loading import LoadedModel, ModelKind, load_model
from mlops_cli.core.pruned import REBUILD_ARCH
from mlops_cli.services.prune.options import PruneOptions
from mlops_cli.services.prune.shrink import rebuild_kwargs


def output_kind(ref: ModelRef, loaded: LoadedModel, options: PruneOptions) -> str:
    """'hf-folder', 'weights-folder', 'safetensors' or 'torch': the artefact kind written for this input."""
    if loaded.kind == ModelKind.HF:
        return "hf-folder"
    if ref.path is None or ref.path.is_dir() or options.structured_shrink:
        return "weights-folder"  # a shrunk module has new shapes: it needs mlops.json to be rebuilt
    return "safetensors" if loaded.format == Format.SAFETENSORS else "torch"


def output_paths(ref: ModelRef, options: PruneOptions) -> dict[float, Path]:
    """One output per amount: OUT itself, or OUT with `-<amount>` before its suffix for a sweep."""
    output = options.output
    if output is None:
        return {}
    if len(options.amounts) == 1:
        return {options.amounts[0]: output}
    from mlops_cli.core.formats import WEIGHT_FORMATS, detect_format

    writes_file = ref.path is not None and not options.structured_shrink and detect_format(ref.path) in WEIGHT_FORMATS
    suffix = output.suffix if writes_file else ""
    stem = output.name[: len(output.name) - len(suffix)] if suffix else output.name
    return {amount: output.with_name(f"{stem}-{amount:g}{suffix}") for amount in options.amounts}


def source_paths(ref: ModelRef, loaded: LoadedModel) -> list[Path]:
    """What an output must never overwrite: the MODEL argument and the file it loaded from."""
    return ref.sources + ([loaded.path] if loaded.path is not None else [])


def save(ref: ModelRef, loaded: LoadedModel, options: PruneOptions, module: Any, state: dict[str, Any],
         output: Path, amount: float) -> dict[str, int]:
    """Write one pruned model; returns the files written and their sizes."""
    from mlops_cli.core.io import atomic_dir, save_safetensors, save_torch

    kind = output_kind(ref, loaded, options)
    sources = source_paths(ref, loaded)
    if kind == "safetensors":
        save_safetensors(state, output, _safetensors_metadata(loaded), options.force, sources)
        return {output.name: output.stat().st_size}
    if kind == "torch":
        content = {loaded.state_key: state, **loaded.checkpoint_extras} if loaded.state_key else state
        save_torch(content, output, options.force, sources)
        return {output.name: output.stat().st_size}
    with atomic_dir(output, options.force, sources) as folder:
        if kind == "hf-folder":
            _write_hf_folder(loaded, module, folder)
        else:
            info = {"method": options.method, "amount": amount, "seed": options.seed,
                    "structured_shrink": options.structured_shrink}
            _write_weights_folder(ref, loaded, options, module, state, folder, info)
        return written_sizes(folder)


def written_sizes(folder: Path) -> dict[str, int]:
    """Files and folders written (a folder as `name/` with the bytes of everything inside it)."""
    sizes = {}
    for path in sorted(folder.iterdir()):
        if path.is_dir():
            sizes[f"{path.name}/"] = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        else:
            sizes[path.name] = path.stat().st_size
    return sizes


def _safetensors_metadata(loaded: LoadedModel) -> dict[str, str]:
    """The input's metadata, unchanged: safetensors writes metadata keys in hash order, so adding a key
    would make the bytes differ from run to run (what was pruned is recorded by the report instead)."""
    if loaded.path is not None and loaded.format == Format.SAFETENSORS:
        _, metadata = read_safetensors_header(loaded.path)
        if metadata:
            return metadata
    return {"format": "pt"}


def _write_hf_folder(loaded: LoadedModel, module: Any, folder: Path) -> None:
    """Tokenizer and every other file and folder copied from the input; config and weights written by
    save_pretrained."""
    source = loaded.path
    if source is not None and source.is_dir():
        copy_extras(source, folder, rewritten=("config.json",))
    elif loaded.tokenizer is not None:
        loaded.tokenizer.save_pretrained(folder)
    module.save_pretrained(folder)


def _write_weights_folder(ref: ModelRef, loaded: LoadedModel, options: PruneOptions, module: Any,
                          state: dict[str, Any], folder: Path, info: dict[str, Any]) -> None:
    from mlops_cli.core import zoo
    from mlops_cli.core.io import save_safetensors, save_torch
    from mlops_cli.core.sidecar import SIDECAR, read_sidecar, write_sidecar

    source = ref.path if ref.path is not None and ref.path.is_dir() else None
    sidecar: dict[str, Any] = read_sidecar(source) if source is not None else {}
    if source is not None:
        copy_extras(source, folder, rewritten=(SIDECAR,))
    arch = loaded.arch or zoo.ARCH_PATHS.get(ref.builtin or "", "")
    weights = str(sidecar.get("weights", "model.safetensors"))
    if options.structured_shrink:
        weights = "model.safetensors"
        sidecar.update(arch=REBUILD_ARCH, arch_kwargs=rebuild_kwargs(loaded, module, arch))
    else:
        sidecar.update(arch=arch, arch_kwargs=loaded.arch_kwargs)
    sidecar.update(weights=weights, inputs=list(options.inputs.specs or loaded.input_specs), pruned=info)
    if weights.endswith(".safetensors"):
        save_safetensors(state, folder / weights, metadata={"format": "pt"})  # what was done: in mlops.json
    else:
        save_torch(state, folder / weights)
    write_sidecar(folder, sidecar)


def reload_check(loaded: LoadedModel, load: LoadOptions, output: Path, candidate: Any, example: dict[str, Any],
                 device: str) -> str:
    """Load the written artefact back through mlops and compare it with the in-memory result."""
    import numpy as np

    from mlops_cli.core.runtimes import runner_for
    from mlops_cli.core.sidecar import read_sidecar

    options = LoadOptions(arch=loaded.arch, arch_kwargs=loaded.arch_kwargs, key=loaded.state_key)
    if output.is_dir():
        options = LoadOptions(task=load.task, trust_remote_code=load.trust_remote_code)
        sidecar = read_sidecar(output)
        if sidecar.get("arch") == REBUILD_ARCH and not str(loaded.arch).startswith("mlops_cli."):
            # the user trusted this architecture for this run (--arch); later loads need it said again
            options = LoadOptions(arch=REBUILD_ARCH, arch_kwargs={**sidecar["arch_kwargs"], "trust_code": True})
    reloaded = load_model(str(output), options)
    for name in reloaded.module.state_dict():
        if name.endswith(("_orig", "_mask")):
            raise AssertionError(f"{output} carries pruning re-parametrisation tensor {name}")
    runner = runner_for(reloaded, device)
    expected, actual = candidate(example), runner(example)
    worst = max((float(np.abs(actual[k].astype(np.float64) - v.astype(np.float64)).max())
                 for k, v in expected.items() if k in actual and actual[k].shape == v.shape), default=None)
    if worst is None:
        return "loads back, but its outputs could not be matched to the pruned model's"
    if worst == 0.0:
        return "loads back through mlops; outputs identical to the pruned model"
    return f"loads back through mlops; outputs differ from the pruned model by at most {worst:.3g} (dtype)"
