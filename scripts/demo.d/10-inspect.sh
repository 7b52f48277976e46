# Save the built-in models as ordinary checkpoint folders, then inspect what they hold.
set -euo pipefail
mlops zoo list
mlops zoo save tiny-bert "$DEMO_OUT/tiny-bert"
mlops zoo save tiny-gpt2 "$DEMO_OUT/tiny-gpt2"
mlops zoo save convnet "$DEMO_OUT/convnet"
mlops inspect "$DEMO_OUT/tiny-bert"
mlops inspect "$DEMO_OUT/convnet/model.safetensors"
