# TorchScript and torch.export artefacts, each loaded back and verified at several shapes; then the trap a
# trace falls into: a model whose Python code branches on the batch size is caught (exit 6, shape named).
set -euo pipefail
mlops export jit "$DEMO_OUT/tiny-bert" -o "$DEMO_OUT/tiny-bert.pt" --repeats 3 --quiet
python examples/run_torchscript.py "$DEMO_OUT/tiny-bert.pt" --batch 3 --sequence 8
mlops export pt2 "$DEMO_OUT/tiny-gpt2" -o "$DEMO_OUT/tiny-gpt2.pt2" --repeats 3

cat > "$DEMO_OUT/batch_branch.py" <<'PY'
import torch
from torch import nn


class BatchBranch(nn.Module):
    """Doubles its output when the batch holds more than 2 rows: a trace at batch 2 never sees that branch."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, x):
        y = self.linear(x)
        if x.shape[0] > 2:
            y = y * 2
        return y
PY
python - "$DEMO_OUT" <<'PY'
import sys

import torch
from safetensors.torch import save_file

sys.path.insert(0, sys.argv[1])
from batch_branch import BatchBranch

torch.manual_seed(0)
save_file(BatchBranch().state_dict(), f"{sys.argv[1]}/batch_branch.safetensors")
PY
status=0
mlops export jit "$DEMO_OUT/batch_branch.safetensors" --arch "$DEMO_OUT/batch_branch.py:BatchBranch" \
    --input "x:float32[batch=2,4]" -o "$DEMO_OUT/batch_branch.pt" --repeats 0 --quiet --discard-failed || status=$?
[ "$status" -eq 6 ] || { echo "expected exit 6 from export jit, got $status" >&2; exit 1; }
[ ! -e "$DEMO_OUT/batch_branch.pt" ] || { echo "--discard-failed left $DEMO_OUT/batch_branch.pt behind" >&2; exit 1; }
echo "export jit exited 6 as expected: the trace is wrong at batch=3, and (--discard-failed) no file was written"
mlops export jit "$DEMO_OUT/batch_branch.safetensors" --arch "$DEMO_OUT/batch_branch.py:BatchBranch" \
    --input "x:float32[batch=2,4]" -o "$DEMO_OUT/batch_branch.pt" --mode script --repeats 0 --quiet --json \
    | python -c 'import json, sys; print("--mode script keeps the branch: passed =", json.load(sys.stdin)["passed"])'
