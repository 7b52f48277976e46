# Decoding strategies side by side on the saved tiny GPT-2 (random weights, so the text is gibberish: the
# point is the table), then greedy decoding explained step by step on our KV-cache loop.
set -euo pipefail
PROMPT="The model is exported to ONNX and"
mlops generate "$DEMO_OUT/tiny-gpt2" --prompt "$PROMPT" --strategy all --max-new-tokens 16 \
    --no-repeat-ngram-size 2 --repeat 3
mlops generate "$DEMO_OUT/tiny-gpt2" --prompt "$PROMPT" --engine loop --explain --candidates 4 --max-new-tokens 8
