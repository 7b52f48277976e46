# `make demo` and `make test` set everything up first (idempotent: a second run does nothing slow).
# torch comes first and pinned to the CPU build (`+cpu`), so no dependency can pull a multi-GB CUDA build.
# Where that wheel is not on local disk, name PyTorch's CPU index:
#   make setup TORCH_INDEX=https://download.pytorch.org/whl/cpu
# GPU boxes: make setup TORCH_SPEC=torch==2.13.0 TORCH_INDEX=https://download.pytorch.org/whl/cu128
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0+cpu
TORCH_INDEX ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint bench clean conformance

setup: $(STAMP)

# The stamp depends on pyproject.toml, so a dependency change reinstalls and nothing else does.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC) $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install --quiet -e '.[dev,extras]'
	$(BIN)/python scripts/conformance.py --install  # trained weights for the conformance tests (--no-deps)
	touch $(STAMP)

demo: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" bash scripts/demo.sh

test: setup
	$(BIN)/python -m pytest -q

# ruff (style, and no heavy module-level import in the CLI layers), mypy, and the layer contract
# (import-linter: app -> commands -> render -> services -> core; no typer/rich below commands).
lint: setup
	$(BIN)/ruff check mlops_cli tests benchmarks scripts
	$(BIN)/mypy mlops_cli
	$(BIN)/lint-imports --no-cache

# Regenerate every captured output in the docs (docs/cli.md, the generated blocks of docs/commands/*.md).
.PHONY: docs
docs: setup
	$(BIN)/python scripts/gen_docs.py

bench: setup
	for script in benchmarks/*.py; do $(BIN)/python $$script || exit 1; done

# The conformance matrix (issue #13) as a report: exit code, verdict and wall time per model and command
# (setup installs pyproject's `conformance` packages, --no-deps; `make test` runs a representative part of it).
conformance: setup
	$(BIN)/python scripts/conformance.py

clean:
	rm -rf $(VENV) demo-out .pytest_cache .ruff_cache .mypy_cache
