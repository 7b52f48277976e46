# One model across runtimes, precisions and batch sizes: eager vs ONNX Runtime (exported into a temporary folder
# and verified first) and dynamic int8, timed interleaved with eager, each speed-up with its 95% interval.
set -euo pipefail
mlops bench builtin:tiny-bert --runtime eager,onnxruntime --dtype fp32,int8 --batch 1,4 --seq-len 32 \
    --threads 1 --repeats 10 --plot "$DEMO_OUT/bench-tiny-bert.html"
# An existing artefact (the export step's ONNX file) against its original, with a PNG plot.
mlops bench "$DEMO_OUT/tiny-bert.onnx" --against "$DEMO_OUT/tiny-bert" --batch 1,8 --seq-len 32 --threads 1 \
    --repeats 10 --plot "$DEMO_OUT/bench-tiny-bert-onnx.png"
