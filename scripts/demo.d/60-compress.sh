# Smaller checkpoints with their drift measured: fp16 (HF folder, streamed), bf16 with per-layer drift
# (the ConvNet), and dynamic int8 with latency before/after on this CPU (tiny GPT-2), whose packed int8
# weights summarize then counts.
set -euo pipefail
mlops compress half "$DEMO_OUT/tiny-bert" -o "$DEMO_OUT/tiny-bert-fp16"
mlops compress half "$DEMO_OUT/convnet" -o "$DEMO_OUT/convnet-bf16" --dtype bf16 --per-layer
mlops compress int8 "$DEMO_OUT/tiny-gpt2" -o "$DEMO_OUT/tiny-gpt2-int8" --repeats 10
mlops summarize "$DEMO_OUT/tiny-gpt2-int8" --repeats 3 --json | python -c '
import json, sys
report = json.load(sys.stdin)
print("tiny-gpt2-int8 parameters by dtype:",
      {d["dtype"]: d["elements"] for d in report["parameters"]["by_dtype"]}, "MACs:", report["compute"]["macs"])'
