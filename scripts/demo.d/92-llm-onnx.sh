# A causal LM on ONNX Runtime: exported with its KV cache (checked against the model before it is written),
# generating on ONNX Runtime with the same figures as PyTorch, its greedy generation compared token by token
# with the model's (the logits of the prompt pass and of every cached step too), then int4 weights with the
# perplexity before/after measured on the bundled corpus.
set -euo pipefail
mlops export onnx "$DEMO_OUT/tiny-gpt2" -o "$DEMO_OUT/lm/decoder.onnx" --force  # a causal LM: with its KV cache
mlops generate "$DEMO_OUT/lm/decoder.onnx" --tokenizer "$DEMO_OUT/tiny-gpt2" --prompt "The quick brown" \
    --max-new-tokens 16 --warmup 0
mlops verify-parity "$DEMO_OUT/tiny-gpt2" "$DEMO_OUT/lm/decoder.onnx" --generate --max-new-tokens 8 \
    --prompt "The quick brown" --prompt "今天天气"
mlops compress int4 "$DEMO_OUT/lm/decoder.onnx" -o "$DEMO_OUT/lm/decoder-int4.onnx" \
    --tokenizer "$DEMO_OUT/tiny-gpt2" --force
# The same path through ONNX Runtime GenAI: a Llama-family model (tiny-llama, trained like tiny-gpt2, grouped-query
# attention) exported to a folder is built by the runtime's model builder (--engine auto picks it for the families
# it knows: it decodes faster), verified against the model before it is moved into place, then run by og.Generator.
mlops zoo save tiny-llama "$DEMO_OUT/tiny-llama" --force > /dev/null
mlops export onnx "$DEMO_OUT/tiny-llama" -o "$DEMO_OUT/llama-genai" --force
mlops generate "$DEMO_OUT/llama-genai" --prompt "The quick brown" --max-new-tokens 12 --warmup 0
mlops verify-parity "$DEMO_OUT/tiny-llama" "$DEMO_OUT/llama-genai" --generate --max-new-tokens 8 \
    --prompt "The quick brown" --prompt "今天天气"
