# What to know before shipping a model: parameters (tied weights found), a layer table with real MACs
# (attention included), MACs per example, activation memory and the warm forward time.
set -euo pipefail
mlops summarize "$DEMO_OUT/tiny-bert" --batch-size 1 --seq-len 128 --repeats 5
mlops summarize "$DEMO_OUT/convnet" --batch-size 1 --depth 2 --repeats 5
mlops summarize "$DEMO_OUT/tiny-gpt2" --depth 1 --repeats 3 --json | python -c '
import json, sys
report = json.load(sys.stdin)
print("tiny-gpt2 tied weights:", report["parameters"]["tied"])
print("tiny-gpt2 MACs per example:", report["compute"]["macs_per_example"])'
