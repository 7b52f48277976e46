"""Review findings on `export onnx` of causal LMs (the KV-cache default, --engine auto/genai) and on compressing
the files it writes: options the KV-cache export would ignore are refused, auto falls back to a folder holding
model.onnx and the tokenizer, int4/int8/half work on a genai folder's model.onnx, messages name the right flags.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest


@pytest.mark.parametrize(("extra", "expected"), [
    (["--device", "cpu"], "--device"),
    (["--seed", "3"], "--seed"),
    (["--opset", "18"], "opset 17 at most"),
    (["--engine", "genai", "--opset", "17"], "--opset applies to --engine torch"),
    (["--engine", "genai", "--external-data"], "--external-data applies to --engine torch"),
])
def test_options_the_kv_cache_export_would_ignore_are_refused(cli: Any, tmp_path: Path, extra: list[str],
                                                              expected: str) -> None:
    """Before: --device and --seed were ignored, --opset above 17 silently clamped to 17, and the genai engine
    ignored --opset and --external-data."""
    result = cli("export", "onnx", "builtin:tiny-gpt2", "-o", tmp_path / "lm", *extra)
    assert result.exit_code == 2, result.output
    assert expected in result.stderr
    assert list(tmp_path.iterdir()) == []
