"""The one service contract: every operation is `run(ref: ModelRef, options: XOptions) -> XReport`.

- `ModelRef` parses a MODEL argument once (`builtin:NAME` or a path); nobody else looks at the raw string.
- `XOptions` subclasses `ServiceOptions` (loading options inside) or `OutputOptions` (plus output and force);
  all fields are keyword-only, so a subclass adds its own with or without defaults.
- `XReport` subclasses `Report`: a frozen dataclass whose `warnings` are the only way a service tells the user
  something went sideways (the render layer shows them, one way, for every command).

Services never print and never import typer/rich; commands build the options, call `run`, render the report.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlops_cli.core.errors import UsageError

BUILTIN_PREFIX = "builtin:"


@dataclass(frozen=True)
class ModelRef:
    """A MODEL argument, parsed once: a built-in zoo model or a path (file or folder, detected by content later)."""

    text: str
    builtin: str | None = None

    @classmethod
    def parse(cls, text: str | ModelRef) -> ModelRef:
        if isinstance(text, ModelRef):
            return text
        value = str(text).strip()
        if not value:
            raise UsageError("MODEL is empty", hint="Give a path, or builtin:NAME (see `mlops zoo list`).")
        if value.startswith(BUILTIN_PREFIX):
            name = value[len(BUILTIN_PREFIX):]
            if not name:
                raise UsageError("builtin: needs a name", hint="See `mlops zoo list`.")
            return cls(value, name)
        return cls(value)

    @property
    def is_builtin(self) -> bool:
        return self.builtin is not None

    @property
    def path(self) -> Path | None:
        """The file or folder named, or None for a built-in model."""
        return None if self.builtin is not None else Path(self.text)

    @property
    def sources(self) -> list[Path]:
        """What an output must never overwrite (nothing for a built-in model)."""
        return [] if self.path is None else [self.path]

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True)
class LoadOptions:
    """How to load a MODEL reference; mirrors the shared loading options of every command."""

    arch: str | None = None
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    key: str | None = None
    strip_prefix: str | None = None
    task: str | None = None
    trust_code: bool = False
    trust_remote_code: bool = False
    # Placement of a Hugging Face model by accelerate (core/loading.py, docs/scaling.md): a strategy (auto,
    # balanced, balanced_low_0, sequential) or one device (cpu, cuda, cuda:N); bytes per device (GPU index or
    # "cpu"); where layers that fit nowhere go (None: a private temporary folder removed after the run).
    device_map: str | None = None
    max_memory: dict[int | str, int] | None = None
    offload_folder: Path | None = None
    dtype: str | None = None  # fp32/fp16/bf16 for a device-mapped load (None: the checkpoint's own)
    tp_plan: str | None = None  # "auto": transformers' tensor parallelism, under torchrun


StepCallback = Callable[[str], None]


def ignore_step(name: str) -> None:
    """The default `on_step`: nobody is watching."""


@dataclass(frozen=True, kw_only=True)
class ServiceOptions:
    """What every service takes: how to load its MODEL, and whom to tell which step is running.

    `on_step("exporting")` names a step that may take a while; the command shows it as progress (services never
    print). It is not part of the options' identity (not compared, not shown).
    """

    load: LoadOptions = field(default_factory=LoadOptions)
    threads: int | None = None  # CPU threads for torch and ONNX Runtime (None: core/runtimes.use_threads decides)
    on_step: StepCallback = field(default=ignore_step, compare=False, repr=False)


@dataclass(frozen=True, kw_only=True)
class OutputOptions(ServiceOptions):
    """A service that writes an artefact: where, and whether it may replace an existing one."""

    output: Path
    force: bool = False


@dataclass(frozen=True, kw_only=True)
class Report:
    """Base of every report: warnings are shown by the render layer (stderr, or inside the JSON object)."""

    warnings: tuple[str, ...] = ()
