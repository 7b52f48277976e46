"""mlops: a model-ops toolbox for PyTorch checkpoints."""

import os as _os

__version__ = "0.1.0"

# No model hub, no progress bars or info chatter from libraries: what is printed is ours.
for _variable, _value in (("HF_HUB_OFFLINE", "1"), ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
                          ("TRANSFORMERS_VERBOSITY", "error"), ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")):
    _os.environ.setdefault(_variable, _value)
