"""`mlops --help` must stay fast: importing the app must not import the heavy libraries."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("torch", "transformers", "onnx", "onnxruntime", "tokenizers", "safetensors", "numpy")


def test_app_import_does_not_load_heavy_libraries() -> None:
    code = ("import sys, mlops_cli.app; "
            f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


def test_help_runs_as_module_and_lists_commands() -> None:
    result = subprocess.run([sys.executable, "-m", "mlops_cli", "--help"], capture_output=True, text=True,
                            env={"COLUMNS": "160", "NO_COLOR": "1", "PATH": ""})
    assert result.returncode == 0, result.stderr
    for command in ("inspect", "zoo"):
        assert command in result.stdout


def test_version(cli) -> None:
    from mlops_cli import __version__

    result = cli("--version")
    assert result.exit_code == 0
    assert result.stdout.strip() == f"mlops {__version__}"


def test_every_command_has_help_with_an_example(cli) -> None:
    from typer.main import get_command

    from mlops_cli.app import app

    group = get_command(app)

    def walk(command, path):
        if hasattr(command, "commands"):  # a group: its subcommands carry the examples
            for name, sub in command.commands.items():
                yield from walk(sub, [*path, name])
        else:
            yield path

    paths = list(walk(group, []))
    assert ["inspect"] in paths and ["zoo", "save"] in paths
    for path in paths:
        result = cli(*path, "--help")
        assert result.exit_code == 0, path
        assert "Example" in result.stdout, f"`mlops {' '.join(path)} --help` shows no example"
