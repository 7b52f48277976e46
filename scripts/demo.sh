#!/usr/bin/env bash
# `make demo`: the main job on the built-in models. Runs every step in scripts/demo.d/ in order, in a
# fresh demo-out/ folder, and stops at the first failure.
set -euo pipefail
cd "$(dirname "$0")/.."
export COLUMNS="${COLUMNS:-120}"
rm -rf demo-out && mkdir -p demo-out
for step in scripts/demo.d/*.sh; do
    printf '\n\033[1m==> %s\033[0m\n' "$(basename "$step" .sh)"
    DEMO_OUT="$PWD/demo-out" bash "$step"
done
printf '\nDemo finished; artefacts are in demo-out/\n'
