# Prune: a sweep to choose an amount (sparsity, raw vs gzip size, drift, latency), one pruned BERT written
# like its input, then a real structural shrink whose parameters and MACs drop and which loads back; last,
# an int8 model (60-compress) is refused with the way round: prune the float model, then quantise.
set -euo pipefail
mlops prune "$DEMO_OUT/convnet" --method l1 --amount 0.1,0.3,0.5,0.7 --repeats 10
mlops prune "$DEMO_OUT/tiny-bert" -o "$DEMO_OUT/tiny-bert-pruned" --method global --amount 0.5 --repeats 10 --force
mlops prune "$DEMO_OUT/convnet" -o "$DEMO_OUT/convnet-shrunk" --structured-shrink --amount 0.5 --repeats 10 --force
status=0
mlops prune "$DEMO_OUT/tiny-gpt2-int8" --repeats 1 || status=$?
[ "$status" -eq 3 ] || { echo "expected exit 3 from prune on an int8 model, got $status" >&2; exit 1; }
echo "prune exited 3 as expected: int8 weights are packed kernels; prune the float checkpoint, then quantise"
