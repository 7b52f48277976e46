"""What every command shares: one option vocabulary (the same names, choices and help everywhere), the
model-loading options (`@model_options`), tolerance parsing, and progress for a service's named steps.

Choices come from the constants of core and the services, so a new precision or preset shows up everywhere.
Typed errors are mapped to exit codes once, in `app.py`. Nothing here imports torch: `mlops --help` must stay fast.
"""

from __future__ import annotations

import functools
import inspect
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from mlops_cli import render
from mlops_cli.core.errors import UsageError

F = TypeVar("F", bound=Callable[..., Any])
TOLERANCE_HELP = "An element passes when |candidate - reference| <= atol + rtol * |reference|."


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


# Precisions a candidate can have, and so the tolerance presets (core/compare.py PRESETS has the same keys).
PRECISIONS = ("fp32", "fp16", "bf16", "int8")
Precision = Enum("Precision", {name: name for name in PRECISIONS}, type=str)  # type: ignore[misc]
HalfPrecision = Enum("HalfPrecision", {name: name for name in ("fp16", "bf16")}, type=str)  # type: ignore[misc]
Preset = Enum("Preset", {name: name for name in ("auto", *PRECISIONS)}, type=str)  # type: ignore[misc]
# Weight precisions of an exported LLM (ONNX Runtime GenAI's builder on CPU: fp32, weight-only int8/int4).
WEIGHT_PRECISIONS = ("fp32", "int8", "int4")
WeightPrecision = Enum("WeightPrecision", {name: name for name in WEIGHT_PRECISIONS}, type=str)  # type: ignore[misc]


ModelArg = Annotated[str, typer.Argument(
    metavar="MODEL", show_default=False,
    help="Model reference: a Hugging Face folder, a weights file (+ --arch), a TorchScript (.pt, needs "
         "--trust-code) or torch.export .pt2 file, an .onnx file, or builtin:NAME (see `mlops zoo list`).")]
OutputOpt = Annotated[Path, typer.Option("--output", "-o", help="Where to write the result.", show_default=False)]
ForceOpt = Annotated[bool, typer.Option("--force", help="Overwrite the output if it exists.")]
DeviceOpt = Annotated[Device, typer.Option("--device", help="Where to run: auto (CUDA when visible), cpu, cuda.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout instead of tables.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or hints.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed for generated inputs and random choices.")]
InputOpt = Annotated[list[str] | None, typer.Option(
    "--input", show_default=False,
    help="Input spec name:dtype\\[d0,d1,...], repeatable; a dim may be named (batch, sequence=32). Named dims "
         "(the first by default) are varied by multi-shape checks. Example: --input x:float32\\[batch=2,3,224,224]")]
TextOpt = Annotated[list[str] | None, typer.Option(
    "--text", show_default=False,
    help="A real text, tokenized with the model's tokenizer (repeatable: one padded batch of all texts).")]
RepeatsOpt = Annotated[int, typer.Option(
    "--repeats", min=0, help="Timed runs per measured item, after warm-up (median and p90 reported); 0 skips timing.")]
WarmupOpt = Annotated[int, typer.Option("--warmup", min=0, help="Untimed runs before timing.")]
ThreadsOpt = Annotated[int | None, typer.Option(
    "--threads", min=1, show_default=False,
    help="CPU threads for torch and ONNX Runtime (default: chosen to avoid oversubscription, and reported).")]
BatchSizeOpt = Annotated[int | None, typer.Option(
    "--batch-size", min=1, show_default=False,
    help="Size of the inputs' 'batch' dim for the first input set (the others vary from it).")]
SeqLenOpt = Annotated[int | None, typer.Option(
    "--seq-len", min=1, show_default=False,
    help="Size of the inputs' 'sequence' dim for the first input set (text models; the others vary from it).")]
PresetOpt = Annotated[Preset, typer.Option(
    "--preset", help="Tolerances for the kind of candidate: auto (from what was produced), fp32, fp16, bf16, int8; "
                     "--atol/--rtol override them.")]
IncludePaddingOpt = Annotated[bool, typer.Option(
    "--include-padding", help="Also compare positions the attention mask marks as padding (excluded by default: "
                              "they legitimately differ).")]
AtolOpt = Annotated[list[str] | None, typer.Option(
    "--atol", show_default=False,
    help=f"Absolute tolerance, or NAME=VALUE for one output (repeatable). {TOLERANCE_HELP}")]
RtolOpt = Annotated[list[str] | None, typer.Option(
    "--rtol", show_default=False, help=f"Relative tolerance, or NAME=VALUE for one output. {TOLERANCE_HELP}")]

# Perplexity of causal LMs (services/perplexity.py): the same options wherever a command changes a causal LM.
EvalTextOpt = Annotated[Path | None, typer.Option(
    "--eval-text", rich_help_panel="Causal LMs", show_default=False,
    help="Causal LMs: UTF-8 text whose sliding-window perplexity (and greedy next-token agreement) is measured on "
         "the original and the result (default: the bundled corpus; its first 512 tokens).")]
EvalOpt = Annotated[bool, typer.Option(
    "--eval/--no-eval", rich_help_panel="Causal LMs",
    help="Causal LMs: measure the perplexity change (a dozen forward passes per model); --no-eval skips it.")]


def evaluation_text(eval_text: Path | None, evaluate: bool) -> Any:
    """`EvaluationText` for --eval-text (the bundled corpus by default), or None for --no-eval."""
    from mlops_cli.services.perplexity import EvaluationText

    if not evaluate:
        if eval_text is not None:
            raise UsageError("--eval-text and --no-eval contradict each other", hint="Drop one of them.")
        return None
    return EvaluationText(text_file=eval_text) if eval_text is not None else EvaluationText()


# Loading options shared by every command that takes a MODEL (added by @model_options).
_LOAD_PARAMETERS: list[tuple[str, Any, Any]] = [
    ("arch", Annotated[str | None, typer.Option(
        "--arch", rich_help_panel="Loading", show_default=False,
        help="Architecture for a weights file: module.path:Factory or path/to/file.py:Factory (runs that code).")],
     None),
    ("arch_kwargs", Annotated[str | None, typer.Option(
        "--arch-kwargs", rich_help_panel="Loading", show_default=False,
        help='Keyword arguments for --arch: JSON (\'{"num_classes": 10}\') or k=v,k=v.')], None),
    ("key", Annotated[str | None, typer.Option(
        "--key", rich_help_panel="Loading", show_default=False,
        help="Key of the state_dict inside a training checkpoint (found automatically: state_dict, model, net...).")],
     None),
    ("strip_prefix", Annotated[str | None, typer.Option(
        "--strip-prefix", rich_help_panel="Loading", show_default=False,
        help="Drop this prefix from weight names (e.g. 'module.' from DataParallel).")], None),
    ("task", Annotated[str | None, typer.Option(
        "--task", rich_help_panel="Loading", show_default=False,
        help="Hugging Face head to load (sequence-classification, causal-lm, ...) instead of config.architectures.")],
     None),
    ("trust_code", Annotated[bool, typer.Option(
        "--trust-code", rich_help_panel="Loading", help="Allow code-carrying files (TorchScript archives).")], False),
    ("trust_remote_code", Annotated[bool, typer.Option(
        "--trust-remote-code", rich_help_panel="Loading",
        help="Allow Hugging Face models whose repository ships custom code.")], False),
    ("device_map", Annotated[str | None, typer.Option(
        "--device-map", rich_help_panel="Placement", show_default=False,
        help="Hugging Face folders: let accelerate place the model: auto, balanced, balanced_low_0, sequential "
             "(spread over GPUs, then CPU, then disk), or all of it on cpu, cuda or cuda:N. See docs/scaling.md.")],
     None),
    ("max_memory", Annotated[str | None, typer.Option(
        "--max-memory", rich_help_panel="Placement", show_default=False,
        help="Most memory per device for --device-map, e.g. 0=20GiB,1=20GiB,cpu=60GiB; what does not fit is "
             "offloaded to disk. Implies --device-map auto when given alone.")], None),
    ("offload_folder", Annotated[Path | None, typer.Option(
        "--offload-folder", rich_help_panel="Placement", show_default=False,
        help="Where disk-offloaded weights go (default: a private temporary folder removed after the run).")],
     None),
    ("tp_plan", Annotated[str | None, typer.Option(
        "--tp-plan", rich_help_panel="Placement", show_default=False,
        help="auto: transformers' tensor parallelism over the processes of `torchrun --nproc-per-node N` "
             "(exit 2 when not launched by torchrun). See docs/scaling.md.")], None),
]


def parse_arch_kwargs(text: str | None) -> dict[str, Any]:
    """`{"a": 1}` or `a=1,b=x` -> dict (values parsed as JSON where they can be)."""
    if not text:
        return {}
    stripped = text.strip()
    if stripped.startswith("{"):
        try:
            value = json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise UsageError(f"--arch-kwargs is not valid JSON: {exc}") from exc
        if not isinstance(value, dict):
            raise UsageError("--arch-kwargs must be a JSON object")
        return value
    result: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in stripped.split(","))):
        name, sep, raw = part.partition("=")
        if not sep or not name.strip().isidentifier():
            raise UsageError(f"--arch-kwargs: {part!r} is not NAME=VALUE")
        try:
            result[name.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            result[name.strip()] = raw
    return result


def model_options(fn: F) -> F:
    """Add the shared loading options to a command; it receives them as `load: LoadOptions`."""
    try:  # resolve string annotations (modules using `from __future__ import annotations`) for Typer
        signature = inspect.signature(fn, eval_str=True)
    except NameError:
        signature = inspect.signature(fn)
    names = [name for name, _, _ in _LOAD_PARAMETERS]
    extra = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
             for name, annotation, default in _LOAD_PARAMETERS]
    kept = [p for p in signature.parameters.values() if p.name != "load"]

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from mlops_cli.core.loading import LoadOptions, parse_device_map, parse_max_memory

        values = {name: kwargs.pop(name) for name in names}
        values["arch_kwargs"] = parse_arch_kwargs(values["arch_kwargs"])
        values["device_map"] = parse_device_map(values["device_map"])
        values["max_memory"] = parse_max_memory(values["max_memory"])
        return fn(*args, load=LoadOptions(**values), **kwargs)

    wrapper.__signature__ = signature.replace(parameters=kept + extra)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {k: v for k, v in fn.__annotations__.items() if k != "load"}
    return wrapper  # type: ignore[return-value]


def parse_tolerances(atol: list[str] | None, rtol: list[str] | None, default: tuple[float, float] | str) -> Any:
    """`--atol 1e-4 --atol logits=1e-3` -> Tolerances (global value plus per-output overrides).

    `default` is a preset name or its PRESETS pair: without a global --atol/--rtol that preset's scale-aware
    bound and criteria apply; given values are used as given (core/parity.py ToleranceRequest)."""
    from mlops_cli.core.parity import ToleranceRequest

    return ToleranceRequest.parse(atol, rtol).resolve(default)


@contextmanager
def progress_steps(title: str, quiet: bool = False) -> Iterator[Callable[[str], None]]:
    """Progress for a service run: yields the `on_step` callback to put in its options; each step a service
    names shows as `title: step` on stderr (a terminal only, and not with --quiet)."""
    with render.progress(title, quiet=quiet) as advance:
        yield lambda step: advance(0, description=f"{title}: {step}")
