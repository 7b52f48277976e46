"""Causal LMs on ONNX Runtime (issue #15): export with a KV cache, generate, parity, perplexity.

Entry points, each following the service contract `run(ref, options) -> report`:
- `export_run` (`export onnx --task causal-lm`): a decoder graph with `past_key_values.*` / `present.*`;
- `generate_run` (`generate model.onnx`): greedy or seeded sampling on ONNX Runtime with the cache;
"""

from __future__ import annotations

from mlops_cli.services.onnx_lm.export_with_past import ExportWithPastOptions, ExportWithPastReport
from mlops_cli.services.onnx_lm.export_with_past import run as export_run
from mlops_cli.services.onnx_lm.generate_onnx import OnnxGenerateOptions, OnnxGenerateReport
from mlops_cli.services.onnx_lm.generate_onnx import run as generate_run

__all__ = ["ExportWithPastOptions", "ExportWithPastReport", "OnnxGenerateOptions", "OnnxGenerateReport",
           "export_run", "generate_run"]
