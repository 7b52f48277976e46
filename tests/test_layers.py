"""The layer contract is checked by import-linter in `make lint`; these tests prove it bites."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _lint(tree: Path) -> subprocess.CompletedProcess[str]:
    env = {"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"}
    return subprocess.run([str(LINT_IMPORTS), "--no-cache", str(tree / "pyproject.toml")], cwd=tree, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    if not LINT_IMPORTS.exists():
        pytest.skip("import-linter is not installed (make setup installs it)")
    shutil.copytree(ROOT / "mlops_cli", tmp_path / "mlops_cli", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_the_tree_keeps_its_contracts(tree: Path) -> None:
    result = _lint(tree)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(("module", "line", "contract"), [
    ("core/errors.py", "import mlops_cli.services.zoo\n", "Layers point one way"),
    ("services/zoo.py", "import rich.table\n", "never print"),
    ("render/zoo.py", "import mlops_cli.commands.zoo\n", "Layers point one way"),
])
def test_an_upward_or_ui_import_breaks_the_contract(tree: Path, module: str, line: str, contract: str) -> None:
    path = tree / "mlops_cli" / module
    path.write_text(path.read_text() + "\n" + line)
    result = _lint(tree)
    assert result.returncode == 1
    assert f"{contract}" in result.stdout and "BROKEN" in result.stdout
