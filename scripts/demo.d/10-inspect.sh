# Save the built-in models as ordinary checkpoint folders, then inspect what they hold. tiny-gpt2 and tiny-bert
# were trained for a few seconds on the bundled corpus (the first build trains, later ones read a cache).
set -euo pipefail
mlops zoo list
mlops zoo save tiny-bert "$DEMO_OUT/tiny-bert"
mlops zoo save tiny-gpt2 "$DEMO_OUT/tiny-gpt2"
mlops zoo save convnet "$DEMO_OUT/convnet"
mlops inspect "$DEMO_OUT/tiny-bert"
mlops inspect "$DEMO_OUT/convnet/model.safetensors"
# The saved tiny-bert is an ordinary Hugging Face classifier whose labels mean something: English or Chinese
# (scores top out at 0.9: it was trained with label smoothing, which keeps its fp16 and int8 copies accurate).
python - "$DEMO_OUT/tiny-bert" <<'PY'
import sys

from transformers import pipeline
from transformers.utils import logging

logging.disable_progress_bar()
classify = pipeline("text-classification", model=sys.argv[1], device="cpu")
for text in ("Quantization makes the model smaller and faster.", "今天晚上我们一起去吃火锅吧"):
    best = classify(text)[0]
    print(f"tiny-bert: {text!r} -> {best['label']} ({best['score']:.2f})")
PY
