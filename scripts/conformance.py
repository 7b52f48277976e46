"""The conformance matrix as a report (`make conformance`): every command on every model of
tests/conformance_models.py, with exit code, verdict and wall time per (model, command).

Unlike tests/test_conformance.py (which runs a representative subset in CI), this runs the whole matrix,
including the registry packages with trained weights (silero-vad, facenet-pytorch) and timm when they are
installed. Exit status: 0 when every step gave its expected exit code, 1 otherwise.

    python scripts/conformance.py [--json] [--only NAME ...] [--work DIR]
    python scripts/conformance.py --install   # pyproject's `conformance` packages, --no-deps, idempotent
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tests.conformance_models import Outcome, Subject, all_subjects, run_step  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these models")
    parser.add_argument("--work", type=Path, help="folder for the built models and outputs (default: a temp dir)")
    parser.add_argument("--install", action="store_true",
                        help="install pyproject's `conformance` packages (--no-deps) where missing, then stop")
    args = parser.parse_args()
    if args.install:
        return install()
    with tempfile.TemporaryDirectory(prefix="mlops-conformance-") as scratch:
        work = args.work or Path(scratch)
        subjects = [s for s in all_subjects(work) if not args.only or s.name in args.only]
        rows, unavailable = run_matrix(subjects, progress=not args.json)
    if args.json:
        print(json.dumps({"results": [asdict(row) | {"as_expected": row.as_expected} for row in rows],
                          "unavailable": unavailable}, indent=2))
    else:
        print_table(rows, unavailable)
    return 0 if all(row.as_expected for row in rows) else 1


def install() -> int:
    """pip install --no-deps the pinned `conformance` packages that are not installed at their pinned version.

    --no-deps: their declared requirements would replace the CPU torch (see pyproject.toml)."""
    pinned = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["conformance"]
    missing = [spec for spec in pinned if _installed(spec.split("==")[0]) != spec.split("==")[1]]
    if not missing:
        print("conformance packages already installed: " + ", ".join(pinned), file=sys.stderr)
        return 0
    return subprocess.call([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", *missing])


def _installed(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def run_matrix(subjects: list[Subject], progress: bool) -> tuple[list[Outcome], dict[str, str]]:
    rows: list[Outcome] = []
    unavailable: dict[str, str] = {}
    for subject in subjects:
        if subject.unavailable:
            unavailable[subject.name] = subject.unavailable
            continue
        start = time.perf_counter()
        if subject.prepare:
            subject.prepare()
        if progress:
            print(f"{subject.name}: built in {time.perf_counter() - start:.1f}s", file=sys.stderr, flush=True)
        for step in subject.steps:
            rows.append(run_step(subject.name, step))
            if progress:
                print(f"  {_row(rows[-1])}", file=sys.stderr, flush=True)
    return rows, unavailable


def _row(row: Outcome) -> str:
    mark = "ok " if row.as_expected else "BAD"
    verdict = row.verdict if len(row.verdict) <= 110 else row.verdict[:107] + "..."
    return (f"{mark} {row.subject:22} {row.command:26} exit {row.exit_code} (expected {row.expected})"
            f" {row.seconds:7.1f}s  {verdict}")


def print_table(rows: list[Outcome], unavailable: dict[str, str]) -> None:
    print(f"{'':3} {'model':22} {'command':26} {'exit':22} {'wall':>8}  verdict")
    for row in rows:
        print(_row(row))
    for name, why in unavailable.items():
        print(f"--- {name:22} not run: {why}")
    wrong = [row for row in rows if not row.as_expected]
    total = sum(row.seconds for row in rows)
    print(f"\n{len(rows) - len(wrong)}/{len(rows)} steps as expected, {len(unavailable)} model(s) unavailable, "
          f"{total:.0f}s in commands")


if __name__ == "__main__":
    raise SystemExit(main())
