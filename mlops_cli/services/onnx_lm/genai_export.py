"""`export onnx MODEL --task causal-lm --engine genai`: ONNX Runtime GenAI's model builder, verified.

The builder (`onnxruntime_genai.models.builder.create_model`, offline, from a local HF folder) writes a folder:
`model.onnx` (+ `model.onnx.data`) with its fused attention (GroupQueryAttention, rotary embedding in the graph),
`genai_config.json` and the tokenizer files. A built-in or otherwise loaded model is first saved as an HF folder
in a scratch folder. The folder is built in a temporary folder beside the output and moved into place only once
built and verified against the PyTorch model (greedy tokens and per-pass logits with the cache, as
`verify-parity --generate` checks them); a failed build leaves nothing behind. An fp32 build that does not match
is still moved into place, for inspection, and the report does not pass (the command exits 6).

Precisions: fp32, and the builder's weight-only int8/int4 (MatMulNBits) on CPU; fp16/bf16 builds are for CUDA
and DirectML (the builder refuses fp16 for the CPU provider). A family the builder does not support (GPT-2, for
one) is an InputError naming it; the torch engine (`export_with_past`) exports it.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from mlops_cli.core.contract import ModelRef, OutputOptions, Report
from mlops_cli.core.errors import InputError, UsageError
from mlops_cli.core.parity import Tolerances
from mlops_cli.services.onnx_lm.genai import read_genai_folder, require_genai
from mlops_cli.services.onnx_lm.quality import DEFAULT_PROMPTS, PromptParity, generation_verdict

GENAI_PRECISIONS = ("fp32", "int8", "int4")  # what the builder makes for the CPU provider


@dataclass(frozen=True, kw_only=True)
class GenaiExportOptions(OutputOptions):
    """The output is a folder; `prompts`/`max_new_tokens` drive the verification."""

    precision: str = "fp32"
    prompts: tuple[str, ...] = DEFAULT_PROMPTS
    max_new_tokens: int = 8
    engine_reason: str = "--engine genai"  # why this engine ran (shown in the report)
    keep_unverified: bool = True  # an fp32 build that does not match is kept for inspection (False: discarded)


@dataclass(frozen=True, kw_only=True)
class GenaiExportReport(Report):
    model: str
    output: str
    engine: str  # "genai": ONNX Runtime GenAI's model builder
    engine_reason: str
    family: str  # the HF model_type
    architecture: str  # the HF architecture the builder dispatched on
    precision: str
    files: dict[str, int]  # file name -> bytes, everything in the folder
    build_seconds: float
    verified_tokens: int  # greedy tokens compared with PyTorch's
    prompts: tuple[PromptParity, ...]
    passed: bool  # an fp32 build matches the model; int8/int4 builds are reported, not judged
    verdict: str


class GenaiUnsupported(InputError):
    """The builder cannot build this model: no recipe for its architecture, no tokenizer, or the build failed
    (`--engine auto` then uses the torch exporter)."""


class GenaiUnverified(InputError):
    """An fp32 build did not match the model and was discarded (`keep_unverified=False`)."""


def run(ref: ModelRef, options: GenaiExportOptions) -> GenaiExportReport:
    """Load MODEL as a causal LM, build its genai folder, verify it, move it into place."""
    from mlops_cli.core.io import atomic_dir, check_output

    _check(options)
    require_genai()
    check_output(options.output, options.force, ref.sources)  # before loading: an existing output fails fast
    loaded = _load(ref, options)
    family = str(getattr(loaded.config, "model_type", None) or type(loaded.module).__name__)
    architecture = next(iter(getattr(loaded.config, "architectures", None) or []), type(loaded.module).__name__)
    with tempfile.TemporaryDirectory(prefix="mlops-genai-") as scratch:
        source = _hf_folder(ref, loaded, Path(scratch))
        with atomic_dir(options.output, options.force, ref.sources) as temp:
            options.on_step("building with ONNX Runtime GenAI's model builder")
            start = time.perf_counter()
            build(source, temp, options.precision, family, architecture, Path(scratch) / "cache")
            seconds = time.perf_counter() - start
            options.on_step("verifying the folder against the model")
            prompts = verify(temp, loaded.module, loaded.tokenizer, options)
            matches = all(p.passed for p in prompts)
            if not matches and options.precision == "fp32" and not options.keep_unverified:
                raise GenaiUnverified(f"the genai build of {ref} does not match the model: "
                                      f"{generation_verdict(prompts)}")
            files = {p.name: p.stat().st_size for p in sorted(temp.iterdir()) if p.is_file()}
    passed = matches or options.precision != "fp32"
    warnings = list(loaded.warnings)
    if not matches and options.precision != "fp32":
        warnings.append(f"the {options.precision} build drifts from the fp32 model (expected of weight-only "
                        "quantisation): see the verdict")
    return GenaiExportReport(
        model=str(ref), output=str(options.output), engine="genai", engine_reason=options.engine_reason,
        family=family, architecture=architecture, precision=options.precision, files=files, build_seconds=seconds,
        verified_tokens=sum(len(p.candidate_tokens) for p in prompts), prompts=prompts, passed=passed,
        verdict=generation_verdict(prompts), warnings=tuple(warnings))


def _check(options: GenaiExportOptions) -> None:
    if options.precision not in GENAI_PRECISIONS:
        raise UsageError(f"--precision {options.precision!r} with --engine genai: the builder makes "
                         f"{', '.join(GENAI_PRECISIONS)} models for the CPU", hint="Use one of them.")
    if Path(options.output).suffix == ".onnx":
        raise UsageError(f"the genai builder writes a folder (model.onnx, genai_config.json, tokenizer), not the file "
                         f"{options.output}", hint="Give -o a folder name, e.g. -o lm-genai (or export a .onnx file "
                                                   "with --engine torch and quantise it with `mlops compress int4`).")


def _load(ref: ModelRef, options: GenaiExportOptions) -> Any:
    from mlops_cli.core.loading import ModelKind, load_model

    loaded = load_model(ref, options.load if options.load.task else replace(options.load, task="causal-lm"))
    if loaded.kind != ModelKind.HF or loaded.module is None:
        raise InputError(f"{ref} is not a transformers model ({loaded.kind.value}); the genai builder needs one",
                         hint="Pass a Hugging Face folder holding a causal LM.")
    if loaded.tokenizer is None:
        raise GenaiUnsupported(f"{ref} has no tokenizer: a genai folder carries one, and verification generates "
                               "text",
                         hint="Save the tokenizer files (tokenizer.json, tokenizer_config.json...) beside the model.")
    loaded.module.float().eval()
    return loaded


def _hf_folder(ref: ModelRef, loaded: Any, scratch: Path) -> Path:
    """The HF folder the builder reads: the model's own, or (built-in models) the model saved into `scratch`."""
    if ref.path is not None and ref.path.is_dir() and (ref.path / "config.json").is_file():
        return ref.path
    folder = scratch / "hf"
    loaded.module.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    return folder


def build(source: Path, output: Path, precision: str, family: str, architecture: str, cache: Path) -> None:
    """Run the builder from `source` into `output` (its progress output captured, not printed)."""
    require_genai()
    from onnxruntime_genai.models import builder  # imports torch and transformers: only here

    from mlops_cli.core.onnx_export import quiet_exporters

    with quiet_exporters() as captured, contextlib.redirect_stderr(captured):
        try:
            extra = builder.parse_extra_options("", str(source), str(output), precision, "cpu", str(cache), [])
            builder.create_model("", str(source), str(output), precision, "cpu", str(cache), **extra)
        except NotImplementedError as exc:
            quantise = "" if precision == "fp32" else f", then `mlops compress int4 lm.onnx -o lm-{precision}.onnx`"
            raise GenaiUnsupported(
                f"ONNX Runtime GenAI's model builder does not support the {family!r} family ({architecture})",
                hint=f"--engine torch exports it: `mlops export onnx MODEL --engine torch -o lm.onnx`{quantise}."
            ) from exc
        except Exception as exc:
            log = captured.getvalue().strip().splitlines()[-3:]
            raise GenaiUnsupported(f"ONNX Runtime GenAI's model builder failed on the {family!r} model: "
                             f"{type(exc).__name__}: {str(exc).strip()[:300]}",
                             hint=f"--engine torch exports it without the builder. Builder log: {' | '.join(log)}"
                             ) from exc
    shutil.rmtree(cache, ignore_errors=True)


def verify(folder: Path, model: Any, tokenizer: Any, options: GenaiExportOptions) -> tuple[PromptParity, ...]:
    """Greedy tokens and per-pass logits of the built folder against the PyTorch model (one thread each)."""
    from mlops_cli.services.onnx_lm.genai import open_model
    from mlops_cli.services.onnx_lm.genai_parity import compare_genai_generation

    tolerances = Tolerances.for_preset("fp32" if options.precision == "fp32" else "int8")
    genai_model = open_model(read_genai_folder(folder), options.threads or 1)
    return compare_genai_generation(model, genai_model, tokenizer, options.prompts, options.max_new_tokens,
                                    tolerances)


# ---------------------------------------------------------------- --engine auto

# Measured with benchmarks/bench_onnx_lm.py --genai (SmolLM-135M's shape, fp32, one thread, 64 new tokens, three
# interleaved runs on a loaded 2-core machine): the genai folder decodes with 1.09-1.34x less CPU time per token
# than our loop on the torch export (0.88-1.46x wall clock), and builds in 2-7 s instead of 23-56 s.
AUTO_GENAI_REASON = ("auto: the builder supports the family, and ONNX Runtime GenAI decodes faster than the torch "
                     "export (benchmarks/bench_onnx_lm.py) and builds in seconds")


def run_auto(ref: ModelRef, options: GenaiExportOptions, torch_options: Any, *, torch_only: tuple[str, ...] = ()
             ) -> GenaiExportReport | Any:
    """`--engine auto`: the genai folder when -o names a folder, the runtime is installed, the builder supports
    the family and the fp32 build verifies; otherwise the torch exporter's single file (`torch_options`, an
    `ExportWithPastOptions` with the same output), the reason said in the report. `torch_only`: options the user
    gave that only the torch exporter takes (--opset, --external-data): they choose it."""
    if options.precision != "fp32":  # only the builder quantises while exporting
        if torch_only:
            raise UsageError(f"{', '.join(torch_only)} apply to the torch exporter, --precision "
                             f"{options.precision} to the genai builder", hint="Drop one or the other.")
        return run(ref, replace(options, engine_reason=f"auto: --precision {options.precision} is the builder's"))
    if torch_only:
        return _torch_export(ref, torch_options, f"auto: the torch exporter takes {', '.join(torch_only)}")
    if Path(options.output).suffix == ".onnx":
        return _torch_export(ref, torch_options, "auto: -o names a .onnx file (the genai builder writes a folder)")
    try:
        require_genai()
    except InputError:
        return _torch_export(ref, torch_options, "auto: onnxruntime-genai is not installed")
    try:
        return run(ref, replace(options, engine_reason=AUTO_GENAI_REASON, keep_unverified=False))
    except GenaiUnsupported as exc:
        return _torch_export(ref, torch_options, f"auto: {exc.message}")
    except GenaiUnverified as exc:
        report = _torch_export(ref, torch_options, "auto: the genai build did not verify")
        return replace(report, warnings=(*report.warnings, f"{exc.message} (discarded; the torch export was used)"))


def _torch_export(ref: ModelRef, options: Any, reason: str) -> Any:
    """The torch exporter's file; when -o names a folder (meant for genai), FOLDER/model.onnx with the config and
    tokenizer beside it, so that `generate FOLDER/model.onnx` finds them."""
    from mlops_cli.core.io import atomic_dir
    from mlops_cli.services.onnx_lm.export_with_past import run as export_run

    if Path(options.output).suffix == ".onnx":
        return replace(export_run(ref, options), engine_reason=reason)
    model = Path(options.output) / "model.onnx"
    with atomic_dir(options.output, options.force, ref.sources) as temp:
        report = export_run(ref, replace(options, output=temp / model.name, force=False, text_side=True))
    return replace(report, output=str(model), engine_reason=f"{reason}; written as {model} with the tokenizer")
