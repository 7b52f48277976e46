# A causal LM on ONNX Runtime: exported with its KV cache (checked against the model before it is written),
# generating on ONNX Runtime with the same figures as PyTorch, its greedy generation compared token by token
# with the model's (the logits of the prompt pass and of every cached step too), then int4 weights with the
# perplexity before/after measured on the bundled corpus.
set -euo pipefail
mlops export onnx "$DEMO_OUT/tiny-gpt2" --task causal-lm -o "$DEMO_OUT/lm/decoder.onnx" --force
mlops generate "$DEMO_OUT/lm/decoder.onnx" --tokenizer "$DEMO_OUT/tiny-gpt2" --prompt "The quick brown" \
    --max-new-tokens 16 --warmup 0
mlops verify-parity "$DEMO_OUT/tiny-gpt2" "$DEMO_OUT/lm/decoder.onnx" --generate --max-new-tokens 8 \
    --prompt "The quick brown" --prompt "今天天气"
mlops compress int4 "$DEMO_OUT/lm/decoder.onnx" -o "$DEMO_OUT/lm/decoder-int4.onnx" \
    --tokenizer "$DEMO_OUT/tiny-gpt2" --force
