"""The docs stay true: captured outputs are regenerated and compared, every command has a page, the README is short."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = ROOT / "docs" / "commands"
BOX = re.compile(r"[┏┃┡│└━]")


@pytest.fixture(scope="module")
def gen_docs():
    """scripts/gen_docs.py as a module (importing it runs nothing)."""
    spec = importlib.util.spec_from_file_location("gen_docs", ROOT / "scripts" / "gen_docs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gen_docs"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    del sys.modules["gen_docs"]


def command_tree():
    from typer.main import get_command

    from mlops_cli.app import app

    return get_command(app)


def outside_generated_blocks(text: str) -> str:
    return re.sub(r"<!-- generated: .*? -->.*?<!-- /generated -->", "", text, flags=re.S)


@pytest.mark.slow
def test_generated_docs_are_up_to_date() -> None:
    """docs/cli.md and every generated block in docs/commands/ are exactly what scripts/gen_docs.py produces now."""
    result = subprocess.run([sys.executable, "scripts/gen_docs.py", "--check"], capture_output=True, text=True,
                            cwd=ROOT, timeout=600)
    assert result.returncode == 0, f"docs are stale or an example failed: run `make docs`\n{result.stderr}"


def test_readme_is_short_and_names_the_two_commands() -> None:
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 250
    assert "make demo" in text and "make test" in text
    assert not BOX.search(text), "README shows captured output: put it in a generated block of a docs/commands page"


def test_every_command_has_a_page_linked_from_the_readme() -> None:
    readme = README.read_text(encoding="utf-8")
    commands = set(command_tree().commands)
    pages = {page.stem for page in PAGES.glob("*.md")}
    assert commands - pages == set(), "commands without a docs/commands page"
    assert pages - commands == set(), "docs/commands pages naming no command"
    for name in commands:
        assert f"(docs/commands/{name}.md)" in readme, f"README does not link docs/commands/{name}.md"


def test_every_page_captures_the_help_of_its_commands() -> None:
    for name, command in command_tree().commands.items():
        text = (PAGES / f"{name}.md").read_text(encoding="utf-8")
        paths = [f"{name} {sub}" for sub in getattr(command, "commands", {})] or [name]
        for path in paths:
            assert f"<!-- generated: mlops {path} --help -->" in text, f"{name}.md lacks `mlops {path} --help`"


def test_captured_output_appears_only_in_generated_blocks() -> None:
    for page in PAGES.glob("*.md"):
        text = page.read_text(encoding="utf-8")
        assert text.count("<!-- generated: ") == text.count("<!-- /generated -->"), f"{page.name}: unclosed block"
        assert not BOX.search(outside_generated_blocks(text)), f"{page.name}: hand-pasted output outside a block"


def test_relative_links_resolve() -> None:
    for doc in [README, *PAGES.glob("*.md")]:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", doc.read_text(encoding="utf-8")):
            assert (doc.parent / target).exists(), f"{doc.name} links to missing {target}"


def test_normalise_puts_placeholders_in_timing_columns_and_realigns_the_table(gen_docs, tmp_path: Path) -> None:
    output = "\n".join([
        f"wrote {tmp_path}/model.onnx (1.00 KiB) in 12.5 ms",
        f"wrote {tmp_path}/model.pt2 (876.06 KiB)",  # archives embed the checkout's path: their size varies
        "warning: load average 5.43 exceeds the 2 cores: timings are unreliable",
        "latency was noisy (p90 over 1.5x p50 in some runs): treat small speed-ups or slow-downs as noise, or",
        "rerun with more --repeats on an idle machine",
        "warning: the machine is busy: 3 other runnable thread(s) on 2 usable core(s); timings are inflated and",
        "noisy",
        "┏━━━━━━━━┳━━━━━━━━━━━━┳━━━━━━━━━┓",
        "┃ stage  ┃ max |diff| ┃ seconds ┃",
        "┡━━━━━━━━╇━━━━━━━━━━━━╇━━━━━━━━━┩",
        "│ export │   1.49e-08 │   12.17 │",
        "│ verify │      0.250 │    0.19 │",
        "└────────┴────────────┴─────────┘",
    ])
    assert gen_docs.normalise(output, tmp_path).splitlines() == [
        "wrote model.onnx (1.00 KiB) in <timing>",
        "wrote model.pt2 (<size>)",
        "┏━━━━━━━━┳━━━━━━━━━━━━┳━━━━━━━━━━┓",
        "┃ stage  ┃ max |diff| ┃  seconds ┃",
        "┡━━━━━━━━╇━━━━━━━━━━━━╇━━━━━━━━━━┩",
        "│ export │      <1e-5 │ <timing> │",
        "│ verify │      0.250 │ <timing> │",
        "└────────┴────────────┴──────────┘",
    ]


def test_an_example_that_fails_stops_the_script_naming_the_command(gen_docs, tmp_path: Path) -> None:
    with pytest.raises(gen_docs.DocsError, match=r"`mlops inspect missing\.pt` exited 3"):
        gen_docs.run_block("mlops inspect missing.pt", tmp_path, "page.md")
    assert gen_docs.run_block('mlops inspect missing.pt; echo "exit $?"', tmp_path, "page.md").endswith("exit 3")
    with pytest.raises(gen_docs.DocsError, match=r"runs `mlops \.\.\.` commands"):
        gen_docs.parse_steps("python -c pass", "page.md")
