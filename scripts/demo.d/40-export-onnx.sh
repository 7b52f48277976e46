# Export the tiny BERT to ONNX (verified at shapes other than the example's, optimised, each pass
# re-verified), then show the trap a fixed-shape export falls into: verify-parity exits 6.
set -euo pipefail
mlops export onnx "$DEMO_OUT/tiny-bert" -o "$DEMO_OUT/tiny-bert.onnx" --optimize all --repeats 5
mlops export onnx "$DEMO_OUT/convnet" -o "$DEMO_OUT/convnet-static.onnx" --static --exporter legacy --quiet --json \
    > /dev/null
status=0
mlops verify-parity "$DEMO_OUT/convnet" "$DEMO_OUT/convnet-static.onnx" --no-timing || status=$?
[ "$status" -eq 6 ] || { echo "expected exit 6 from verify-parity, got $status" >&2; exit 1; }
echo "verify-parity exited 6 as expected: the static export only runs at batch 2"
