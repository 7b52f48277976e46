"""`mlops generate`: decoding strategies side by side, explained step by step, measured properly.

A session places the model (device, dtype, `--device-map`) and encodes the prompts once; each strategy then
runs `--warmup` untimed and `--repeat` measured times on its engine (`model.generate`, or our KV-cache loop
in `services/decoding.py` for greedy and sampling), each run seeded the same way, so sampling repeats run to
run and `--strategy all` compares strategies on the same prompt and seed. How a run is measured, and what
each figure means, is in `services/generate_measure.py`.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from transformers import StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from mlops_cli.core.contract import ModelRef, Report, ServiceOptions
from mlops_cli.core.errors import InputError, UsageError
from mlops_cli.core.loading import LoadedModel, ModelKind, load_model, wants_placement
from mlops_cli.services.decoding import DecodingParams, decode, logits_processors
from mlops_cli.services.generate_measure import (
    ClockCriterion,
    MemoryProbe,
    Metrics,
    RunRecord,
    StepClock,
    run_metrics,
    summarize_runs,
)

STRATEGIES = ("greedy", "beam", "sample", "beam-sample")
BEAM_STRATEGIES = ("beam", "beam-sample")
ENGINES = ("generate", "loop")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Called with (strategy, text piece) while streaming, and (strategy, None) when that run ends.
TextCallback = Callable[[str, str | None], None]


@dataclass(frozen=True, kw_only=True)
class GenerateOptions(ServiceOptions):
    """Everything `mlops generate` can be asked; validated by `check_options`. With `stream`, `on_text` is
    called with each piece of the first run's text as it is produced."""

    prompts: tuple[str, ...]
    strategy: str = "greedy"  # one of STRATEGIES, or "all"
    max_new_tokens: int = 32
    num_beams: int = 4
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    seed: int = 0
    stop: tuple[str, ...] = ()
    chat: bool = False
    fixed_length: bool = False
    repeat: int = 1
    warmup: int = 1
    engine: str = "generate"
    cache: str = "dynamic"  # or "static" (CUDA)
    compile: bool = False
    device: str = "auto"
    dtype: str = "fp32"
    explain: bool = False
    candidates: int = 5
    stream: bool = False
    tokenizer: Path | None = None  # ONNX models: the folder holding the tokenizer (default: the file's folder)
    on_text: TextCallback | None = field(default=None, compare=False, repr=False)

    @property
    def strategies(self) -> tuple[str, ...]:
        return STRATEGIES if self.strategy == "all" else (self.strategy,)


@dataclass(frozen=True)
class GeneratedText:
    """One prompt's result for one strategy."""

    prompt: str
    text: str
    new_token_ids: tuple[int, ...]
    new_tokens: int
    stop_reason: str  # "eos", "stop string", "max_new_tokens"


@dataclass(frozen=True)
class StrategyResult:
    strategy: str
    engine: str
    settings: dict[str, Any]  # the generation parameters this strategy ran with
    outputs: tuple[GeneratedText, ...]
    metrics: Metrics
    reproducible: bool  # every measured run produced the same tokens
    fixed_length_ok: bool | None  # --fixed-length: every row has exactly max_new_tokens new tokens


@dataclass(frozen=True)
class Candidate:
    token_id: int
    token: str
    probability: float


@dataclass(frozen=True)
class ExplainStep:
    step: int
    text_before: str  # the text generated before this step
    chosen: Candidate
    candidates: tuple[Candidate, ...]  # the top-k, most probable first


@dataclass(frozen=True)
class Explanation:
    """Greedy decoding step by step (first prompt): probabilities after the logits processors."""

    prompt: str
    steps: tuple[ExplainStep, ...]
    text: str
    matches_greedy: bool | None  # the chosen tokens equal the greedy run's (None: no single-prompt greedy run)


@dataclass(frozen=True, kw_only=True)
class GenerateReport(Report):
    model: str
    architecture: str
    device: str
    dtype: str
    engine: str
    cache: str
    compiled: bool
    batch_size: int
    max_new_tokens: int
    seed: int
    memory_measure: str
    results: tuple[StrategyResult, ...]
    explanation: Explanation | None
    notes: tuple[str, ...] = ()  # how the run was set up (e.g. where --device-map put the model)
    device_map: dict[str, str] | None = None  # where --device-map put each part (accelerate's hf_device_map)


# ---------------------------------------------------------------- options


def read_prompts(path: str | Path) -> tuple[str, ...]:
    """Prompts for a batch: one per line, blank lines skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"--prompts {path} could not be read: {exc}") from exc
    prompts = tuple(line for line in (raw.strip() for raw in text.splitlines()) if line)
    if not prompts:
        raise InputError(f"--prompts {path} holds no prompt", hint="Write one prompt per line.")
    return prompts


def check_options(options: GenerateOptions) -> None:
    """Refuse contradictory or out-of-range options before anything loads (exit 2)."""
    problems = [
        (not options.prompts or any(not p.strip() for p in options.prompts), "the prompt is empty"),
        (options.strategy not in (*STRATEGIES, "all"), f"unknown --strategy {options.strategy!r}"),
        (options.engine not in ENGINES, f"unknown --engine {options.engine!r}"),
        (options.dtype not in DTYPES, f"unknown --dtype {options.dtype!r}"),
        (options.cache not in ("dynamic", "static"), f"unknown --cache {options.cache!r}"),
        (options.max_new_tokens < 1, "--max-new-tokens must be at least 1"),
        (options.temperature <= 0, "--temperature must be > 0 (use --strategy greedy for deterministic output)"),
        (options.top_k < 0, "--top-k must be >= 0 (0 disables it)"),
        (not 0 < options.top_p <= 1, "--top-p must be in (0, 1]"),
        (options.repetition_penalty <= 0, "--repetition-penalty must be > 0 (1 disables it)"),
        (options.no_repeat_ngram_size < 0, "--no-repeat-ngram-size must be >= 0 (0 disables it)"),
        (options.repeat < 1, "--repeat must be at least 1"),
        (options.warmup < 0, "--warmup must be >= 0"),
        (options.candidates < 1, "--candidates must be at least 1"),
    ]
    for failed, message in problems:
        if failed:
            raise UsageError(message)
    if options.num_beams < 2 and any(s in BEAM_STRATEGIES for s in options.strategies):
        raise UsageError("beam strategies need --num-beams >= 2")
    if options.fixed_length and options.stop:
        raise UsageError("--fixed-length and --stop contradict each other",
                         hint="--fixed-length generates exactly --max-new-tokens tokens; drop one of them.")
    if options.engine == "loop" and options.strategy in BEAM_STRATEGIES:
        raise UsageError(f"--engine loop does greedy and sampling only, not {options.strategy}",
                         hint="Use --engine generate for beam search.")
    if options.engine == "loop" and (options.cache == "static" or options.compile):
        raise UsageError("--cache static and --compile apply to --engine generate",
                         hint="Our loop uses a dynamic KV cache; drop --engine loop to compare them.")
    if options.compile and options.cache != "static":
        raise UsageError("--compile needs --cache static (compiled decoding needs fixed shapes)")
    if options.stream and len(options.prompts) > 1:
        raise UsageError("--stream shows one prompt; it cannot be combined with --prompts for a batch")
    if options.stream and options.strategy in BEAM_STRATEGIES:
        raise UsageError("beam search cannot stream: it chooses its tokens only at the end")


# ---------------------------------------------------------------- session: model, device, prompts


@dataclass
class Session:
    """A model placed on its device with encoded prompts: what every run of every strategy shares."""

    loaded: LoadedModel
    model: Any
    tokenizer: Any
    options: GenerateOptions
    device: str
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    cache: str
    compiled: bool
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # settings that do not mean here what they say
    configs: dict[str, Any] = field(default_factory=dict)  # generation config per strategy, built once
    memory: MemoryProbe = field(init=False)

    def __post_init__(self) -> None:
        self.memory = MemoryProbe(self.uses_cuda)

    @property
    def is_encoder_decoder(self) -> bool:
        return bool(getattr(self.model.config, "is_encoder_decoder", False))

    @property
    def batch_size(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def uses_cuda(self) -> bool:
        return self.device.startswith("cuda")


def prepare(loaded: LoadedModel, options: GenerateOptions) -> Session:
    """Check the model can generate, place it (device, dtype, device map) and encode the prompts."""
    check_options(options)
    model, tokenizer = loaded.module, loaded.tokenizer
    if model is None or not callable(getattr(model, "generate", None)) or not _can_generate(model):
        raise InputError(f"{loaded.reference} is not a text-generation model ({type(model).__name__})",
                         hint="Pass a causal LM (GPT-2, Llama-style...) or a seq2seq model; for a folder "
                              "holding LM weights under another head, pass --task causal-lm.")
    if tokenizer is None:
        raise InputError(f"{loaded.reference} has no tokenizer, and generate works on text",
                         hint="Copy the tokenizer files (tokenizer.json, tokenizer_config.json...) into the folder.")
    notes: list[str] = []
    warnings: list[str] = []
    device, cache, compiled = _place_model(loaded, options, notes, warnings)
    if getattr(model.config, "is_encoder_decoder", False) and (options.engine == "loop" or options.explain):
        raise UsageError("our decoding loop (--engine loop, --explain) handles decoder-only models",
                         hint="Use --engine generate, without --explain, for seq2seq models.")
    input_ids, attention_mask = _encode(tokenizer, model, options)
    _check_context(model, int(input_ids.shape[1]), options.max_new_tokens)
    input_device = _input_device(model, device)
    return Session(loaded, model, tokenizer, options, device, input_ids.to(input_device),
                   attention_mask.to(input_device), cache, compiled, notes, warnings)


def _can_generate(model: Any) -> bool:
    can = getattr(model, "can_generate", None)
    return bool(can()) if callable(can) else True


def _place_model(loaded: LoadedModel, options: GenerateOptions, notes: list[str],
                 warnings: list[str]) -> tuple[str, str, bool]:
    """Device and dtype (a model placed by `--device-map` stays where it was loaded, in the --dtype it was loaded
    in; a --device naming another device is refused, as by every command); returns (device, cache, compiled)
    actually in effect."""
    from mlops_cli.core.runtimes import placement_note, run_device, stays_put

    model = loaded.module
    device = run_device(loaded, options.device)
    if stays_put(loaded):
        notes.extend(filter(None, [placement_note(model)]))
    else:
        model.to(device=device, dtype=DTYPES[options.dtype])
    model.eval()
    on_cuda = device.startswith("cuda")
    if options.dtype != "fp32" and not on_cuda:
        warnings.append(f"--dtype {options.dtype} on CPU: half-precision matmuls are emulated and far slower than "
                     "fp32 here; these timings say nothing about GPU speed")
    cache, compiled = options.cache, options.compile
    if (cache == "static" or compiled) and not on_cuda:
        warnings.append("--cache static / --compile are CUDA optimisations (fixed shapes for CUDA graphs); on CPU they "
                     "bring nothing, so this run used the dynamic cache without compilation")
        cache, compiled = "dynamic", False
    return device, cache, compiled


def _input_device(model: Any, device: str) -> torch.device:
    from mlops_cli.core.runtimes import input_device

    return torch.device(input_device(model, device))


def _encode(tokenizer: Any, model: Any, options: GenerateOptions) -> tuple[torch.Tensor, torch.Tensor]:
    texts = [_chat_text(tokenizer, p) for p in options.prompts] if options.chat else list(options.prompts)
    if len(texts) > 1:
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        if not getattr(model.config, "is_encoder_decoder", False):
            tokenizer.padding_side = "left"  # decoder-only models continue from the last position
    encoded = tokenizer(texts, return_tensors="pt", padding=len(texts) > 1,
                        add_special_tokens=not options.chat)  # a chat template writes its own special tokens
    if encoded["input_ids"].shape[1] == 0:
        raise UsageError("the prompt encodes to no tokens")
    mask = encoded.get("attention_mask")
    return encoded["input_ids"], mask if mask is not None else torch.ones_like(encoded["input_ids"])


def _chat_text(tokenizer: Any, prompt: str) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise UsageError("--chat: this model's tokenizer has no chat template",
                         hint="Drop --chat, or use an instruction-tuned model whose tokenizer_config.json "
                              "(or chat_template.jinja) defines one.")
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)


def _check_context(model: Any, prompt_length: int, max_new_tokens: int) -> None:
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        return
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and prompt_length + max_new_tokens > limit:
        raise UsageError(f"the prompt ({prompt_length} tokens) + --max-new-tokens {max_new_tokens} exceed the "
                         f"model's {limit} positions",
                         hint=f"Use --max-new-tokens {max(1, limit - prompt_length)} or a shorter prompt.")


# ---------------------------------------------------------------- strategies


def engine_for(strategy: str, requested: str) -> str:
    """Our loop does greedy and sampling; beam strategies always run on `model.generate`."""
    return "generate" if strategy in BEAM_STRATEGIES else requested


def strategy_settings(strategy: str, options: GenerateOptions) -> dict[str, Any]:
    """The generation parameters a strategy runs with (also what the report shows)."""
    settings: dict[str, Any] = {
        "do_sample": strategy in ("sample", "beam-sample"),
        "num_beams": options.num_beams if strategy in BEAM_STRATEGIES else 1,
        "max_new_tokens": options.max_new_tokens,
        "repetition_penalty": options.repetition_penalty,
        "no_repeat_ngram_size": options.no_repeat_ngram_size,
    }
    if settings["do_sample"]:
        settings.update(temperature=options.temperature, top_k=options.top_k, top_p=options.top_p)
    return settings


def _eos_ids(session: Session) -> tuple[int, ...]:
    """EOS ids as `generate` sees them: from the generation config only (not the tokenizer)."""
    eos = session.model.generation_config.eos_token_id
    if eos is None:
        return ()
    return tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))


def _pad_id(session: Session) -> int:
    for candidate in (session.model.generation_config.pad_token_id, session.tokenizer.pad_token_id):
        if candidate is not None:
            return int(candidate)
    eos = _eos_ids(session)
    return eos[0] if eos else 0


def generation_config(session: Session, strategy: str) -> Any:
    """A copy of the model's own generation config (EOS, pad, what the checkpoint sets) with this strategy's
    settings on top: every option we expose is set explicitly, so a checkpoint's sampling defaults never
    override the command line. Built once per strategy."""
    if strategy not in session.configs:
        session.configs[strategy] = _build_generation_config(session, strategy)
    return session.configs[strategy]


def _build_generation_config(session: Session, strategy: str) -> Any:
    options = session.options
    config = copy.deepcopy(session.model.generation_config)
    config.update(**strategy_settings(strategy, options), pad_token_id=_pad_id(session))
    if options.fixed_length:
        config.eos_token_id = None  # generate fills None from the model's config: see `ignoring_eos`
    if options.stop:
        config.stop_strings = list(options.stop)
    if session.cache == "static":
        config.cache_implementation = "static"
        if session.compiled:
            from transformers import CompileConfig

            config.compile_config = CompileConfig()
        else:
            config.disable_compile = True
    return config


def decoding_params(session: Session, strategy: str) -> DecodingParams:
    """The same settings for our loop."""
    settings = strategy_settings(strategy, session.options)
    return DecodingParams(
        max_new_tokens=settings["max_new_tokens"], do_sample=settings["do_sample"],
        temperature=settings.get("temperature", 1.0), top_k=settings.get("top_k"), top_p=settings.get("top_p"),
        repetition_penalty=settings["repetition_penalty"], no_repeat_ngram_size=settings["no_repeat_ngram_size"],
        eos_token_ids=() if session.options.fixed_length else _eos_ids(session), pad_token_id=_pad_id(session),
        stop_strings=session.options.stop)


def check_loop_matches_generate(session: Session, strategy: str) -> None:
    """Refuse `--engine loop` when the model's generation config turns on processors our loop lacks (e.g.
    suppress_tokens, min_length): its output would differ from `model.generate`'s."""
    builder = getattr(session.model, "_get_logits_processor", None)
    if builder is None:
        return
    config = generation_config(session, strategy)
    try:  # a private transformers method: if it changes, skip the check rather than fail
        expected = builder(generation_config=config, input_ids_seq_length=int(session.input_ids.shape[1]),
                           device=session.input_ids.device, model_kwargs={"attention_mask": None})
    except Exception:
        return
    ours = [type(p).__name__ for p in logits_processors(decoding_params(session, strategy))]
    theirs = [type(p).__name__ for p in expected]
    if ours != theirs:
        raise UsageError(f"our decoding loop (--engine loop, --explain) would not match model.generate here: the "
                         f"model's generation config uses {', '.join(sorted(set(theirs) - set(ours))) or theirs}",
                         hint="Use --engine generate, without --explain, for this model.")


# ---------------------------------------------------------------- one timed run


class TextStream:
    """Incremental detokenisation: emits each new piece of text once its bytes form whole characters."""

    def __init__(self, tokenizer: Any, emit: Callable[[str], None]) -> None:
        self.tokenizer, self.emit = tokenizer, emit
        self.ids: list[int] = []
        self.printed = 0

    def push(self, token_ids: Sequence[int]) -> None:
        self.ids.extend(int(t) for t in token_ids)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # a multi-byte character is not complete yet
            return
        if len(text) > self.printed:
            self.emit(text[self.printed:])
            self.printed = len(text)

    def flush(self) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if len(text) > self.printed:
            self.emit(text[self.printed:])
        self.printed = len(text)


class _GenerateStreamer(BaseStreamer):
    """Adapter for `model.generate(streamer=...)`: its first put() carries the prompt, which is skipped."""

    def __init__(self, stream: TextStream) -> None:
        self.stream = stream
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.stream.push(value.reshape(-1).tolist()[:1])

    def end(self) -> None:
        self.stream.flush()


def seed_everything(seed: int, cuda: bool) -> None:
    """Each run starts from the same global RNG state, the one `model.generate` samples from (sampling
    repeats run to run). Cheaper than torch.manual_seed, which visits every backend."""
    torch.default_generator.manual_seed(seed)
    if cuda:
        torch.cuda.manual_seed_all(seed)


def run_once(session: Session, strategy: str, engine: str | None = None,
             on_text: Callable[[str], None] | None = None) -> RunRecord:
    """One timed generation with `strategy` on `engine` (default: the session's choice for it)."""
    engine = engine or engine_for(strategy, session.options.engine)
    clock = StepClock(session.uses_cuda)
    memory = session.memory
    stream = TextStream(session.tokenizer, on_text) if on_text else None
    seed_everything(session.options.seed, session.uses_cuda)
    memory.begin()
    clock.begin()
    if engine == "loop":
        sequences = _run_loop(session, strategy, clock, stream)
    else:
        sequences = _run_generate(session, strategy, clock, stream)
    if clock.sync:
        clock.sync()
    end = time.perf_counter()
    return RunRecord(sequences, clock.start, clock.ticks, end, memory.peak())


@contextlib.contextmanager
def ignoring_eos(model: Any, active: bool = True) -> Iterator[None]:
    """`--fixed-length`: `generate` replaces an unset eos_token_id by the model's own, so the model's is unset
    for the duration of the call (and restored after it)."""
    if not active:
        yield
        return
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = None
    try:
        yield
    finally:
        model.generation_config.eos_token_id = saved


def _run_generate(session: Session, strategy: str, clock: StepClock, stream: TextStream | None) -> torch.Tensor:
    extra: dict[str, Any] = {}
    if session.options.stop:
        extra["tokenizer"] = session.tokenizer
    if stream is not None:
        extra["streamer"] = _GenerateStreamer(stream)
    with torch.inference_mode(), ignoring_eos(session.model, session.options.fixed_length):
        return session.model.generate(
            input_ids=session.input_ids, attention_mask=session.attention_mask,
            generation_config=generation_config(session, strategy),
            stopping_criteria=StoppingCriteriaList([ClockCriterion(clock)]), **extra)


def _run_loop(session: Session, strategy: str, clock: StepClock, stream: TextStream | None) -> torch.Tensor:
    observers: list[Callable[[int, torch.Tensor, torch.Tensor], None]] = [lambda *_: clock.tick()]
    if stream is not None:
        observers.append(lambda _step, tokens, _scores: stream.push(tokens.tolist()[:1]))
    sequences = decode(session.model, session.input_ids, session.attention_mask, decoding_params(session, strategy),
                       tokenizer=session.tokenizer, observers=observers)
    if stream is not None:
        stream.flush()
    return sequences


# ---------------------------------------------------------------- from runs to a report


def _new_token_start(session: Session) -> int:
    """Where new tokens begin in an output row: after the prompt, or after the decoder start token."""
    return 1 if session.is_encoder_decoder else int(session.input_ids.shape[1])


def generated_texts(session: Session, sequences: torch.Tensor) -> tuple[GeneratedText, ...]:
    """Decode each row's new tokens, cut after the token that completed a stop string or after the first EOS
    (finished rows of a batch are padded, and the pad token is often the EOS token)."""
    eos = set() if session.options.fixed_length else set(_eos_ids(session))
    start = _new_token_start(session)
    stop_at = _stop_string_ends(session, sequences, start)
    results = []
    for prompt, row, stop_end in zip(session.options.prompts, sequences.tolist(), stop_at, strict=True):
        new = row[start:]
        eos_end = next((i + 1 for i, token in enumerate(new) if token in eos), None)
        if stop_end is not None and (eos_end is None or stop_end <= eos_end):
            end, reason = stop_end, "stop string"
        elif eos_end is not None:
            end, reason = eos_end, "eos"
        else:
            end, reason = len(new), "max_new_tokens"
        kept = new[:end]
        text = session.tokenizer.decode([t for t in kept if t not in eos], skip_special_tokens=True)
        results.append(GeneratedText(prompt, text, tuple(kept), len(kept), reason))
    return tuple(results)


def _stop_string_ends(session: Session, sequences: torch.Tensor, start: int) -> list[int | None]:
    """Per row, how many new tokens it took to complete a stop string: transformers' StopStringCriteria itself,
    replayed on each prefix (the string may straddle the end of the prompt)."""
    if not session.options.stop:
        return [None] * sequences.shape[0]
    from transformers import StopStringCriteria

    criterion = StopStringCriteria(session.tokenizer, list(session.options.stop))
    ends: list[int | None] = []
    for row in sequences:
        hits = (k for k in range(1, row.shape[0] - start + 1) if bool(criterion(row[None, :start + k], None)[0]))
        ends.append(next(hits, None))
    return ends


def run_strategy(session: Session, strategy: str) -> StrategyResult:
    """Warm-up runs, then `repeat` measured runs of one strategy, summarised."""
    options = session.options
    on_text = options.on_text
    engine = engine_for(strategy, options.engine)
    if engine == "loop":
        check_loop_matches_generate(session, strategy)
    records: list[RunRecord] = []
    for index in range(options.warmup + options.repeat):
        if index == 0 and on_text is not None and options.stream and strategy not in BEAM_STRATEGIES:
            record = run_once(session, strategy, engine, functools.partial(on_text, strategy))
            on_text(strategy, None)
        else:
            record = run_once(session, strategy, engine)
        if index >= options.warmup:
            records.append(record)
    outputs = generated_texts(session, records[0].sequences)
    new_tokens = sum(o.new_tokens for o in outputs)
    metrics = [run_metrics(r, new_tokens, session.batch_size) for r in records]
    fixed_ok = all(o.new_tokens == options.max_new_tokens for o in outputs) if options.fixed_length else None
    return StrategyResult(
        strategy=strategy, engine=engine, settings=strategy_settings(strategy, options), outputs=outputs,
        metrics=summarize_runs(metrics, int(session.attention_mask.sum()), options.warmup),
        reproducible=all(torch.equal(r.sequences, records[0].sequences) for r in records),
        fixed_length_ok=fixed_ok)


def explain_greedy(session: Session, greedy: StrategyResult | None = None) -> Explanation:
    """Greedy decoding of the first prompt with the top candidates of every step (KV-cached, our loop)."""
    check_loop_matches_generate(session, "greedy")
    k = min(session.options.candidates, int(session.model.config.get_text_config().vocab_size))
    steps: list[ExplainStep] = []

    def token(token_id: int, probability: float) -> Candidate:
        return Candidate(token_id, session.tokenizer.decode([token_id]), probability)

    def observe(step: int, next_tokens: torch.Tensor, scores: torch.Tensor) -> None:
        probabilities = torch.softmax(scores[0], dim=-1)
        top = torch.topk(probabilities, k)
        chosen = int(next_tokens[0])
        before = session.tokenizer.decode([s.chosen.token_id for s in steps], skip_special_tokens=True)
        steps.append(ExplainStep(step + 1, before, token(chosen, float(probabilities[chosen])),
                                 tuple(token(int(i), float(p)) for p, i in zip(top.values, top.indices, strict=True))))

    mask = session.attention_mask[:1]
    first = session.input_ids[:1][:, mask[0].bool()]  # the first prompt without its batch padding
    decode(session.model, first, None, decoding_params(session, "greedy"), tokenizer=session.tokenizer,
           observers=[observe])
    chosen = [s.chosen.token_id for s in steps]
    eos = set(_eos_ids(session))
    text = session.tokenizer.decode([t for t in chosen if t not in eos], skip_special_tokens=True)
    matches = None
    if greedy is not None and session.batch_size == 1:
        matches = list(greedy.outputs[0].new_token_ids) == chosen
    return Explanation(session.options.prompts[0], tuple(steps), text, matches)


def run(ref: ModelRef, options: GenerateOptions) -> GenerateReport:
    """Load the model `ref` names and generate (options are checked before anything loads)."""
    from mlops_cli.core.runtimes import use_threads
    from mlops_cli.services.onnx_lm.genai import looks_like_genai_folder

    check_options(options)
    use_threads(options.threads)
    if looks_like_genai_folder(ref.path):  # ONNX Runtime GenAI's folder (export onnx --engine genai)
        from mlops_cli.services.onnx_lm import genai_generate

        assert ref.path is not None
        return genai_generate.generate(ref.path, options)
    from mlops_cli.services.onnx_lm import seq2seq_generate

    if seq2seq_generate.is_seq2seq_folder(ref.path):  # an encoder-decoder exported with --task seq2seq-lm
        return seq2seq_generate.generate(ref, options)
    options.on_step("loading the model")
    placed = wants_placement(options.load)  # a placed model is loaded in --dtype, never converted after
    loaded = load_model(ref, replace(options.load, dtype=options.dtype) if placed else options.load)
    if loaded.kind == ModelKind.ONNX:  # an ONNX decoder exported with its KV cache (export onnx --task causal-lm)
        from mlops_cli.services.onnx_lm import generate_onnx

        report = generate_onnx.generate(loaded, options, options.tokenizer)
    else:
        report = generate(loaded, options)
    return replace(report, warnings=(*loaded.warnings, *report.warnings))


def generate(loaded: LoadedModel, options: GenerateOptions) -> GenerateReport:
    """Run every requested strategy (and `--explain`) on the prompts of a loaded model; figures per strategy."""
    from mlops_cli.core.runtimes import device_map_of

    session = prepare(loaded, options)
    results = []
    for strategy in options.strategies:
        options.on_step(f"{strategy} decoding")
        results.append(run_strategy(session, strategy))
    explanation = None
    if options.explain:
        options.on_step("explaining greedy decoding")
        greedy = next((r for r in results if r.strategy == "greedy"), None)
        explanation = explain_greedy(session, greedy)
    warnings = list(session.warnings)
    if any(not r.reproducible for r in results):
        warnings.append("some runs of the same strategy and seed produced different tokens (non-deterministic "
                        "kernels?)")
    return GenerateReport(
        model=loaded.reference, architecture=type(session.model).__name__, device=session.device,
        dtype=options.dtype, engine=options.engine, cache=session.cache, compiled=session.compiled,
        batch_size=session.batch_size, max_new_tokens=options.max_new_tokens, seed=options.seed,
        memory_measure=session.memory.kind, results=tuple(results), explanation=explanation,
        notes=tuple(session.notes), warnings=tuple(warnings), device_map=device_map_of(session.model))
