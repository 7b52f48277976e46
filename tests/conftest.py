"""Shared fixtures: a CliRunner with stable output, and built-in models saved as files once per session."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

os.environ.setdefault("COLUMNS", "160")
os.environ["NO_COLOR"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Hermetic caches: trained built-in models and remembered optimisation passes live in a folder of this session,
# so no test depends on (or writes into) the user's ~/.cache/mlops.
os.environ["MLOPS_CACHE_DIR"] = tempfile.mkdtemp(prefix="mlops-test-cache-")


class Cli:
    """Invoke `mlops` in-process; `.json()` parses --json output."""

    def __init__(self) -> None:
        self.runner = CliRunner()

    def __call__(self, *args: Any) -> Any:
        from mlops_cli.app import app

        result = self.runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "160", "NO_COLOR": "1"})
        result.json = lambda: json.loads(result.stdout)  # type: ignore[attr-defined]
        return result


@pytest.fixture(scope="session")
def cli() -> Cli:
    return Cli()


@pytest.fixture(scope="session")
def zoo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every built-in model saved once per session with `zoo save` (read-only use in tests, please)."""
    from mlops_cli.core import zoo
    from mlops_cli.services.zoo import save_model

    root = tmp_path_factory.mktemp("zoo")
    for name in zoo.ENTRIES:
        save_model(name, root / name)
    return root


@pytest.fixture(scope="module")
def one_torch_thread() -> Any:
    """torch at one thread for a module (LM tests: tiny models run no slower and no less reproducibly on one
    thread, and the other core stays free); the thread count is restored afterwards."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
