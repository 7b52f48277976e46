# The saved tiny GPT-2 learned the bundled corpus in a few seconds: greedy decoding from the start of a corpus
# line continues that line and stops at EOS, in English or Chinese.
set -euo pipefail
for prompt in "The quick brown" "Export the trained" "今天天气"; do
    mlops generate "$DEMO_OUT/tiny-gpt2" --prompt "$prompt" --max-new-tokens 32 --warmup 0 --json | python -c '
import json, sys
output = json.load(sys.stdin)["results"][0]["outputs"][0]
print("tiny-gpt2 greedy: %r -> %r (%s)" % (output["prompt"], output["text"], output["stop_reason"]))'
done
# Decoding strategies side by side on one prompt and seed: the model is so sure of its corpus that greedy and
# beam search recite the line; sampling at --temperature 2 wanders off it. Then greedy decoding explained step
# by step (the candidates and their probabilities) on our KV-cache loop.
mlops generate "$DEMO_OUT/tiny-gpt2" --prompt "Greedy decoding always" --strategy all --temperature 2 \
    --max-new-tokens 16 --repeat 3
mlops generate "$DEMO_OUT/tiny-gpt2" --prompt "Export the trained" --engine loop --explain --candidates 4 \
    --max-new-tokens 8
