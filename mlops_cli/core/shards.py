"""Sharded checkpoints: `*.safetensors.index.json` (or `pytorch_model.bin.index.json`) plus the shards it names.

The index maps every tensor name to the shard file holding it. Reading the shards' own headers alone would miss
a shard that is not there: a checkpoint missing a file looks like a smaller, complete one. This module reads
the indexes and says what they promise that the folder does not hold.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from mlops_cli.core.errors import InputError

INDEX_SUFFIX = ".index.json"


@dataclass(frozen=True)
class ShardIndex:
    """One index file: which shard holds each tensor, and the total tensor bytes it records."""

    name: str
    weight_map: dict[str, str]  # tensor name -> shard file name
    total_size: int | None

    @property
    def shards(self) -> tuple[str, ...]:
        return tuple(sorted(set(self.weight_map.values())))


def read_shard_indexes(folder: Path) -> list[ShardIndex]:
    """Every `*.index.json` of a folder, parsed (a malformed one is an input error, not a silent skip)."""
    indexes = []
    for path in sorted(folder.glob(f"*{INDEX_SUFFIX}")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(f"{path} could not be read: {exc}") from exc
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise InputError(f"{path} is not a shard index: it has no weight_map of tensor name -> file")
        metadata = data.get("metadata") or {}
        total = metadata.get("total_size") if isinstance(metadata, dict) else None
        indexes.append(ShardIndex(path.name, dict(weight_map), int(total) if isinstance(total, (int, float)) else None))
    return indexes


def shard_problems(folder: Path, tensor_names: set[str]) -> list[str]:
    """What the folder's indexes promise and its shards do not hold: missing shard files, and tensors listed
    in the index that no shard header has (`tensor_names`: the names the shards' headers hold)."""
    problems = []
    for index in read_shard_indexes(folder):
        missing = [shard for shard in index.shards if not (folder / shard).is_file()]
        if missing:
            lost = sum(1 for shard in index.weight_map.values() if shard in missing)
            problems.append(f"incomplete checkpoint: {index.name} lists {len(missing)} shard(s) not in the folder "
                            f"({_first_few(missing)}), holding {lost} tensor(s)")
        absent = [name for name, shard in index.weight_map.items()
                  if shard not in missing and name not in tensor_names]
        if absent:
            problems.append(f"{index.name} lists {len(absent)} tensor(s) that no shard holds ({_first_few(absent)})")
    return problems


def _first_few(names: list[str], shown: int = 3) -> str:
    return ", ".join(names[:shown]) + (", ..." if len(names) > shown else "")
