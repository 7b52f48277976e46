# Diff and average: what did pruning (70-prune) touch, layer by layer, without building either model; a copy
# passes the `--expect-same` CI gate and the fp16 conversion (60-compress) does not (exit 6); then a soup of
# the BERT and its pruned copy (with the drift of the average from each), an EMA over an ordered list, and
# checkpoints that do not match refused with their names (exit 3).
set -euo pipefail
mlops diff "$DEMO_OUT/tiny-bert" "$DEMO_OUT/tiny-bert-pruned" --top 8
cp -r "$DEMO_OUT/tiny-bert" "$DEMO_OUT/tiny-bert-copy"
mlops diff "$DEMO_OUT/tiny-bert" "$DEMO_OUT/tiny-bert-copy" --expect-same
status=0
mlops diff "$DEMO_OUT/tiny-bert" "$DEMO_OUT/tiny-bert-fp16" --expect-same --top 3 || status=$?
[ "$status" -eq 6 ] || { echo "expected exit 6 from diff --expect-same on an fp16 copy, got $status" >&2; exit 1; }
echo "diff --expect-same exited 6 as expected: the fp16 conversion changed dtypes and values"
mlops average "$DEMO_OUT/tiny-bert" "$DEMO_OUT/tiny-bert-pruned" -o "$DEMO_OUT/tiny-bert-soup" --eval --force
mlops average "$DEMO_OUT/tiny-bert" "$DEMO_OUT/tiny-bert-copy" "$DEMO_OUT/tiny-bert-pruned" \
    -o "$DEMO_OUT/tiny-bert-ema" --ema 0.9 --force
status=0
mlops average "$DEMO_OUT/convnet" "$DEMO_OUT/convnet-shrunk" -o "$DEMO_OUT/convnet-mix" || status=$?
[ "$status" -eq 3 ] || { echo "expected exit 3 from average on mismatched checkpoints, got $status" >&2; exit 1; }
echo "average exited 3 as expected: the shrunk ConvNet's tensors have other shapes"
