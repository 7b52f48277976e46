"""The JSON files mlops writes beside weights: `mlops.json` (a weights folder's architecture, weights file and
inputs) and `quantization.json` (how an HF folder's weights were quantised). One reader that validates every
field it uses, one writer; architecture names written by older versions are read under their current names.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mlops_cli.core.errors import InputError

SIDECAR = "mlops.json"
# Factories renamed since files were first written: old mlops.json files (and old --arch values) keep working.
LEGACY_ARCH_NAMES = {
    "mlops_cli.zoo:ConvNet": "mlops_cli.core.zoo:ConvNet",
    "mlops_cli.zoo:LeNet": "mlops_cli.core.zoo:LeNet",
    "mlops_cli.services.prune:rebuild": "mlops_cli.core.pruned:rebuild",
}
_FIELDS: dict[str, type] = {"weights": str, "arch": str, "arch_kwargs": dict, "inputs": list}


def canonical_arch(name: str) -> str:
    """An architecture name as this version spells it."""
    return LEGACY_ARCH_NAMES.get(name, name)


def read_sidecar(folder: Path, name: str = SIDECAR) -> dict[str, Any]:
    """A sidecar's content, validated ({} when absent); InputError (exit 3) naming the file and field otherwise."""
    sidecar = folder / name
    if not sidecar.is_file():
        return {}
    try:
        data = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{sidecar} could not be read: {exc}") from exc
    problem = "it is not a JSON object" if not isinstance(data, dict) else next(
        (f"{key!r} must be a {kind.__name__}" for key, kind in _FIELDS.items()
         if key in data and not isinstance(data[key], kind)), None)
    if problem is None and not all(isinstance(spec, str) for spec in data.get("inputs", [])):
        problem = "'inputs' must be a list of input specs such as \"x:float32[batch=2,3,32,32]\""
    if problem:
        raise InputError(f"{sidecar} is malformed: {problem}",
                         hint="Re-save the folder with mlops, or pass --arch/--input yourself.")
    if "arch" in data:
        data["arch"] = canonical_arch(data["arch"])
    nested = data.get("arch_kwargs")
    if isinstance(nested, dict) and isinstance(nested.get("arch"), str):
        data["arch_kwargs"] = {**nested, "arch": canonical_arch(nested["arch"])}
    return data


def write_sidecar(folder: Path, data: dict[str, Any], name: str = SIDECAR) -> Path:
    """Write a sidecar into a folder being built (the folder itself is moved into place atomically)."""
    path = folder / name
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path
