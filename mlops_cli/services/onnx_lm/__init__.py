"""Causal LMs on ONNX Runtime (issue #15): export with a KV cache, generate, parity, perplexity.

Entry points, each following the service contract `run(ref, options) -> report`:
- `export_run` (`export onnx --task causal-lm`): a decoder graph with `past_key_values.*` / `present.*`;
- `generate_onnx.generate` (`generate model.onnx`, through services/generate.run): greedy or seeded sampling
  on ONNX Runtime with the cache, reported like a PyTorch generation;
- `parity_run` (`verify-parity MODEL model.onnx --generate`): greedy tokens and per-pass logits compared;
- `int4_run`: weight-only int4 (MatMulNBits) of an exported decoder, sizes and perplexity before/after;
- `seq2seq_export_run` (`export onnx --task seq2seq-lm`): an encoder-decoder LM as Optimum's folder (encoder,
  decoder, decoder with past); `generate FOLDER` and `verify-parity MODEL FOLDER --generate` dispatch to
  `seq2seq_generate` and `seq2seq_quality`.
"""

from __future__ import annotations

from mlops_cli.services.onnx_lm.export_with_past import ExportWithPastOptions, ExportWithPastReport
from mlops_cli.services.onnx_lm.export_with_past import run as export_run
from mlops_cli.services.onnx_lm.int4 import Int4Options, Int4Report
from mlops_cli.services.onnx_lm.int4 import run as int4_run
from mlops_cli.services.onnx_lm.quality import GenerationParityOptions, GenerationParityReport, parity_run
from mlops_cli.services.onnx_lm.seq2seq_export import Seq2SeqExportOptions, Seq2SeqExportReport
from mlops_cli.services.onnx_lm.seq2seq_export import run as seq2seq_export_run

__all__ = [
    "ExportWithPastOptions", "ExportWithPastReport", "GenerationParityOptions", "GenerationParityReport",
    "Int4Options", "Int4Report", "Seq2SeqExportOptions", "Seq2SeqExportReport", "export_run", "int4_run",
    "parity_run", "seq2seq_export_run",
]
