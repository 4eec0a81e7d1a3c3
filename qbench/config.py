"""Typed schemas for every config group, registered in Hydra's ConfigStore.

The YAML files under conf/ are validated against these dataclasses when Hydra composes them: a
misspelt key or a value of the wrong type fails at compose time with Hydra's message naming the key.
Checks that a type cannot express (a negative batch size, ``bits: 5`` for GPTQ) live in
:func:`validate`, which runs before any model is loaded.

Units live in the field names (``_s``, ``_tokens``, ``_min``) or in the comment beside each field.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, cast

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from qbench.errors import ConfigError, eval_offline, hub_offline


@dataclass
class ModelConfig:
    name: str = MISSING  # short name used in cell ids and reports, e.g. "llama3_1_8b_instruct"
    # Hub id ("meta-llama/Llama-3.1-8B-Instruct"), a local directory, or "builtin:tiny" (built here, offline)
    source: str = MISSING
    revision: Optional[str] = None  # Hub branch, tag or commit; recorded in every result
    dtype: str = MISSING  # dtype of the unquantized weights: float32 | float16 | bfloat16
    # Random-init mode: build the architecture from its config.json, no weights downloaded. For memory and
    # latency at real sizes; accuracy then sits at chance and the report says so.
    random_init: bool = MISSING
    # A config.json bundled with qbench (qbench/load/architectures/<name>.json), used by random-init mode when
    # the source is a Hub id, so that random-init works air-gapped.
    architecture: Optional[str] = None
    # Fields of config.json to override, e.g. {num_hidden_layers: 8} for a shortened model
    config_overrides: Dict[str, Any] = field(default_factory=dict)
    tokenizer: Optional[str] = None  # tokenizer source if not the model's own; null = the model's
    trust_remote_code: bool = False  # runs code from the model repo: off unless a model config turns it on
    num_gpus: int = MISSING  # GPUs one cell uses; >1 spreads the model with device_map="auto"
    seed: int = MISSING  # seed of the random-init weights


@dataclass
class MethodBase:
    """The keys every method has. Each method's own schema (``Config`` in qbench/methods/<kind>.py) adds its keys
    to these; its YAML names that schema in its defaults list, so a result records only that method's keys. Every
    value, these four included, comes from the method's YAML (conf/method/<name>.yaml)."""

    name: str = MISSING  # method id used in cell ids and reports
    kind: str = MISSING  # implementation: the module qbench/methods/<kind>.py
    dtype: str = MISSING  # dtype of what stays unquantized (embeddings, norms, lm_head) and of compute
    description: str = MISSING  # one line shown in the report


@dataclass
class BenchConfig:
    enabled: bool = MISSING  # false: skip latency (memory is always measured)
    device: str = MISSING  # auto (cuda if present, else cpu) | cuda | cpu
    batch_sizes: List[int] = MISSING
    prompt_tokens: List[int] = MISSING  # prefill lengths measured
    decode_prompt_tokens: int = MISSING  # prompt length before decode
    new_tokens: int = MISSING  # decode length, forced (min_new_tokens == max_new_tokens, EOS disabled)
    # eager (generate, dynamic cache) | static (generate, static cache compiled to CUDA graphs) | graph (static's
    # compiled decode step in a tight loop, no generate around it: the modeling code's ceiling)
    decode_paths: List[str] = MISSING
    # batch sizes at which the compiled paths (static, graph) run (null: all of batch_sizes). Each compile is a
    # one-time cost: batch 1 has a graph of its own (Dynamo specializes a size of 1), batch sizes past 1 share one
    # batch-dynamic graph (each compile's cost: docs/latency.md#what-the-defaults-cost); [1] saves the second
    compiled_batch_sizes: Optional[List[int]] = MISSING
    warmup_runs: int = MISSING  # runs discarded before timing (first-call effects, compile), at least
    # then more while each run is faster than the last by more than warmup_steady_pct %, up to this many: a
    # compiled path keeps speeding up for a few calls after its compile
    max_warmup_runs: int = MISSING
    warmup_steady_pct: float = MISSING  # %
    # Each figure repeats until the 95 % CI of its median is within target_ci_pct % of the median (null: stop at
    # min_repeats), or until max_time_per_figure_s seconds of timed runs (the figure is then flagged)
    target_ci_pct: Optional[float] = MISSING  # %
    max_time_per_figure_s: Optional[float] = MISSING  # s
    # eager decode's figures: its own cap (null: max_time_per_figure_s; 0: min_repeats runs, no more). Eager's
    # step time is the host's Python, whose median moves between fresh processes by more than one process's CI
    # says (docs/stability.md), so runs past the minimum narrow a CI that is not its real uncertainty (run.rounds)
    max_time_per_eager_figure_s: Optional[float] = MISSING  # s
    # a compiled path's first call at a batch size (torch.compile's trace and codegen) may take this long, then the
    # path is recorded unsupported with that reason (null: no limit). The default leaves room for a plain compile
    # of a 7-8B model and stops a kernel-tuning one (docs/latency.md#what-the-defaults-cost)
    max_compile_s: Optional[float] = MISSING  # s
    min_repeats: int = MISSING  # timed runs at least (6: the fewest whose order statistics give a 95 % CI of the median)
    max_repeats: int = MISSING  # timed runs at most
    min_duration_s: float = MISSING  # and at least this much time timed (s)
    # GPU cells measure their card's device-to-device copy bandwidth once (~1 s), the practical decode bound
    measure_copy_bandwidth: bool = MISSING
    cv_warn_threshold: float = MISSING  # coefficient of variation above which the cell records a warning
    seed: int = MISSING  # seed of the random prompt token ids (same prompts for every method of a sweep)
    # CPUs the cell's process is pinned to: null (the OS's choice) | gpu_local (NVML's CPUs near the cell's GPUs)
    # | a Linux cpulist such as "0-3,8" (an int 2 reads as "2"); see qbench/measure/cpu_affinity.py
    cpu_affinity: Optional[str] = MISSING
    # GPU spec overrides (name -> {mem_bandwidth_gb_s, ...}); see qbench/measure/gpu_specs.py
    gpu_spec_overrides: Dict[str, Any] = MISSING


@dataclass
class PerplexityConfig:
    enabled: bool = MISSING
    # "builtin:tiny_text", a local .txt file, or "wikitext2" (online, the GPTQ/AWQ papers' test split)
    source: str = MISSING
    seq_len_tokens: int = MISSING  # window length
    max_windows: Optional[int] = MISSING  # cap on windows scored; null = whole corpus


PERPLEXITY_HUB_SOURCES = ("wikitext2",)


@dataclass
class QualityConfig:
    """Quality against the baseline cell token by token (qbench/evaluate/quality.py, llama.cpp's conventions)."""

    enabled: bool = MISSING
    # corpus: "builtin:tiny_text" (bundled, MIT), a local .txt file, or "wikitext2" (online: its test split)
    source: str = MISSING
    ctx_tokens: int = MISSING  # window length (tokens); the second half of every window is scored
    max_windows: Optional[int] = MISSING  # windows scored at most (count); null = the whole corpus
    # windows per forward pass (count); 1: LLM.int8 and bf16 kernels give other logits in a bigger batch
    batch_size: int = MISSING
    # per scored token, each cell stores its most likely tokens until they cover this much probability ...
    coverage: float = MISSING
    # ... at most this many (count); null = no cap, so P(rest) <= 1 - coverage always holds (see quality.py)
    max_kept: Optional[int] = MISSING


@dataclass
class EvalConfig:
    """Every key is set by each conf/eval/ option (eval=none too: a result records every key). The nested blocks'
    default_factory gives their structure only: each of their keys is MISSING as well."""

    enabled: bool = MISSING
    tasks: List[str] = MISSING  # task table names (qbench/evaluate/tasks.py) or any lm-eval task
    num_fewshot: Dict[str, int] = MISSING  # per task (count); a task not named: the task table's default
    limit: Optional[float] = MISSING  # items per task (or per MMLU subject); <1.0 = fraction; null = all
    task_limits: Dict[str, float] = MISSING  # per-task override of limit, e.g. {gsm8k: 100}
    # cap on generated tokens per item of generate_until tasks (gsm8k); null = the task's own (lm-eval: 256).
    # Set, it changes the task: scores are then not comparable with published ones (recorded in settings).
    max_gen_toks: Optional[int] = MISSING
    batch_size: int = MISSING  # one fixed batch size for every method of a sweep (never "auto")
    max_length_tokens: Optional[int] = MISSING  # context length handed to lm-eval; null = model's
    seed: int = MISSING  # lm-eval's random / numpy / torch / fewshot seeds
    # Offline data: hendrycks MMLU CSVs (<data_dir>/mmlu/{dev,val,test}) and GSM8K jsonl (<data_dir>/gsm8k)
    data_dir: Optional[str] = MISSING
    offline: str = MISSING  # auto (offline if HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set) | true | false
    mmlu_subjects: List[str] = MISSING  # restrict MMLU to these subjects; [] = all 57
    log_samples: bool = MISSING  # store per-item correctness for paired statistics
    # keep offline tasks' built requests (few-shot prompts) in <run.cache_dir>/lm_eval_requests for the next cells
    cache_requests: bool = MISSING
    perplexity: PerplexityConfig = field(default_factory=PerplexityConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)


@dataclass
class RunConfig:
    sweep: str = MISSING  # results go to <runs_dir>/<sweep>/<model>__<method>/result.json
    runs_dir: str = MISSING
    cache_dir: str = MISSING  # built models, quantized checkpoints
    force: bool = MISSING  # rerun every cell, also ok ones (a cell whose settings changed reruns without it)
    rerun_failed: bool = MISSING  # rerun cells whose result says error (ok cells are still skipped)
    timeout_min: float = MISSING  # a cell running longer is stopped and recorded as status error, class timeout
    # Fail injection for tests and dry runs: the cell raises this error class after loading the model.
    # "oom" | "exception" for every cell, or "oom:<method name>" for one method's cells only.
    inject_failure: Optional[str] = MISSING
    baseline_method: str = MISSING  # method the report compares against (paired statistics)
    # Measure every cell this many times, in interleaved order (A B C, A B C, ...), each time in a fresh process:
    # a node's drift falls on every method alike. A cell's figures are then the median over its rounds
    # (qbench/run/rounds.py); accuracy and quality are measured in round 1 only (they do not drift).
    rounds: int = MISSING
    preload: bool = MISSING  # fork cells from a server that imported the libraries once (qbench/run/preload.py)
    round: Optional[int] = None  # set by qbench itself: the round a pass measures (results in <cell>/rounds/<k>)


@dataclass
class QBenchConfig:
    model: ModelConfig = MISSING
    method: MethodBase = MISSING  # typed by the method's own schema at compose time
    bench: BenchConfig = MISSING
    eval: EvalConfig = MISSING
    run: RunConfig = field(default_factory=RunConfig)


def register_configs() -> None:
    """Register the schemas; each group's YAML names its schema in its defaults list. The method schemas live
    with the methods (qbench.methods.register_schemas; qbench.run.preflight.register_configs registers both)."""
    cs = ConfigStore.instance()
    cs.store(name="qbench_schema", node=QBenchConfig)
    cs.store(group="model", name="schema", node=ModelConfig)
    cs.store(group="bench", name="schema", node=BenchConfig)
    cs.store(group="eval", name="schema", node=EvalConfig)


# conf/ of a source checkout, else the copy a wheel carries as the package qbench.conf
CONF_DIR = next((d for d in (Path(__file__).resolve().parents[1] / "conf", Path(__file__).resolve().parent / "conf")
                 if d.is_dir()), Path(__file__).resolve().parents[1] / "conf")
_SCHEMAS = {"model": ModelConfig, "bench": BenchConfig, "eval": EvalConfig}


def yaml_defaults(group: str, option: str = "default", **overrides: Any) -> Any:
    """conf/<group>/<option>.yaml typed by its schema, with ``overrides`` on top, composed without Hydra: what
    code and tests that build a config by hand start from, so the YAML stays the one source of the defaults.
    ``group="run"`` reads the run block of conf/config.yaml. ``group="method"`` types the YAML by the method schema
    its defaults list names (``schema/<kind>@_here_``), looked up in Hydra's ConfigStore, where
    qbench.methods.register_schemas puts it (this module sits below the method registry)."""
    from omegaconf import OmegaConf

    schema: Any
    if group == "run":
        root = cast(Dict[str, Any], OmegaConf.to_container(OmegaConf.load(CONF_DIR / "config.yaml")))
        schema, values = RunConfig, root["run"]
    elif group in (*_SCHEMAS, "method"):
        path = CONF_DIR / group / f"{option}.yaml"
        if not path.is_file():
            raise ConfigError(f"{group}: no option '{option}' ({path} does not exist)")
        # interpolations stay strings here: the merged config resolves them on access
        values = cast(Dict[str, Any], OmegaConf.to_container(OmegaConf.load(path)))
        listed = values.pop("defaults", None) or []
        schema = _method_schema(listed, path) if group == "method" else OmegaConf.structured(_SCHEMAS[group])
    else:
        raise ConfigError(f"{group}: not a config group with a schema here ({', '.join(['run', 'method', *_SCHEMAS])})")
    return OmegaConf.merge(OmegaConf.structured(schema) if isinstance(schema, type) else schema, values, overrides)


def _method_schema(listed: List[Any], path: Path) -> Any:
    """The typed node of the schema a method YAML's defaults list names (``schema/<kind>@_here_``)."""
    names = [str(e).split("@")[0] for e in listed if str(e).startswith("schema/")]
    if len(names) != 1:
        raise ConfigError(f"defaults: {path} names no method schema (schema/<kind>@_here_) in its defaults list")
    from hydra.plugins.config_source import ConfigLoadError

    try:
        return ConfigStore.instance().load(f"method/{names[0]}.yaml").node
    except ConfigLoadError:  # nothing stored under that name
        raise ConfigError(f"defaults: {names[0]} (named by {path}) is not registered; call "
                          "qbench.run.preflight.register_configs() (or qbench.methods.register_schemas()) first"
                          ) from None


DTYPES = ("float32", "float16", "bfloat16")


def _positive_ints(values: List[int], key: str) -> None:
    if len(values) == 0:
        raise ConfigError(f"{key}: the list is empty; give at least one value")
    for v in values:
        if v <= 0:
            raise ConfigError(f"{key}: {v} is not a positive integer")


def validate(cfg: Any) -> None:
    """Semantic checks that a type cannot express. Raises ConfigError naming the key.

    Runs in the sweep's main process for every cell before anything is launched, so a bad cell stops the
    sweep before any model is loaded or anything is written under runs/.
    """
    check_no_missing(cfg)
    m = cfg.model
    if m.dtype not in DTYPES:
        raise ConfigError(f"model.dtype: '{m.dtype}' is not one of {', '.join(DTYPES)}")
    if m.num_gpus < 1:
        raise ConfigError(f"model.num_gpus: {m.num_gpus} must be at least 1")
    # A .gguf source (its file, the packaged wheel it comes from, its architecture) and model.architecture are
    # checked by qbench.run.preflight.check_model_source, right after this: both need qbench.load.models, above this module
    if not m.source.startswith("builtin:") and not m.source.lower().endswith(".gguf"):
        path = Path(m.source).expanduser()
        if m.source.startswith(("/", ".", "~")) and not path.exists():
            raise ConfigError(f"model.source: local path '{m.source}' does not exist")
        if not path.exists() and hub_offline() and not (m.random_init and m.architecture):
            raise ConfigError(
                f"model.source: '{m.source}' is not a local directory and HF_HUB_OFFLINE is set; "
                "give a local directory, or random_init with a bundled architecture"
            )

    # the method's own checks run in qbench.run.preflight.check_method (the registry sits above this module)
    if cfg.method.dtype not in DTYPES:
        raise ConfigError(f"method.dtype: '{cfg.method.dtype}' is not one of {', '.join(DTYPES)}")

    validate_bench(cfg.bench)
    validate_eval(cfg.eval)

    r = cfg.run
    if r.timeout_min <= 0:
        raise ConfigError(f"run.timeout_min: {r.timeout_min} must be positive")
    if r.rounds < 1:
        raise ConfigError(f"run.rounds: {r.rounds} must be at least 1")
    if r.round is not None and not 1 <= r.round <= r.rounds:
        raise ConfigError(f"run.round: {r.round} is not one of 1..{r.rounds} (qbench sets it; use run.rounds)")
    if r.inject_failure is not None and r.inject_failure.split(":")[0] not in ("oom", "exception"):
        raise ConfigError(f"run.inject_failure: '{r.inject_failure}' is not oom or exception (optionally :<method>)")
    # These name directories under runs/: a '/' or '..' would write results outside the configured folder.
    for key, value in (("run.sweep", r.sweep), ("model.name", m.name), ("method.name", cfg.method.name)):
        if not value or "/" in value or "\\" in value or value.startswith("."):
            raise ConfigError(f"{key}: '{value}' must be a plain name (no '/' or leading '.')")


def check_no_missing(cfg: Any) -> None:
    """Every key the schemas leave MISSING got a value from its YAML: else one line naming the key and the option
    file that should set it (OmegaConf's own error surfaces only deep inside whatever reads the key first)."""
    from omegaconf import OmegaConf

    own = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])  # hydra's help needs its resolvers
    for key in sorted(OmegaConf.missing_keys(own)):
        group = key.split(".", 1)[0]
        choice = OmegaConf.select(cfg, f"hydra.runtime.choices.{group}", default=None)
        where = f"conf/{group}/{choice}.yaml" if choice else ("conf/config.yaml" if group == "run" else f"conf/{group}/")
        raise ConfigError(f"{key}: no value; {where} must set it (the schema gives none: the YAML holds the defaults)")


def _check_limit(value: Any, key: str) -> None:
    if value is None:
        return
    if value <= 0:
        raise ConfigError(f"{key}: {value} must be positive (or null for all items)")
    if value >= 1 and float(value) != int(value):
        raise ConfigError(f"{key}: {value} is neither a fraction below 1 nor a whole number of items")


def validate_bench(b: Any) -> None:
    """The bench keys' checks (qbench.config.validate): ConfigError naming the key."""
    if b.device not in ("auto", "cuda", "cpu"):
        raise ConfigError(f"bench.device: '{b.device}' is not one of auto, cuda, cpu")
    _positive_ints(list(b.batch_sizes), "bench.batch_sizes")
    _positive_ints(list(b.prompt_tokens), "bench.prompt_tokens")
    _positive_ints([b.decode_prompt_tokens], "bench.decode_prompt_tokens")
    _positive_ints([b.new_tokens], "bench.new_tokens")
    # bench.decode_paths: against the decode-path registry, in preflight (qbench.measure sits above config)
    if b.compiled_batch_sizes is not None:
        compiled = list(b.compiled_batch_sizes)
        if not compiled:
            raise ConfigError("bench.compiled_batch_sizes: [] names no batch size (null: all of bench.batch_sizes; "
                              "bench.decode_paths=[eager] runs no compiled path)")
        stray = [x for x in compiled if x not in list(b.batch_sizes)]
        if stray:
            raise ConfigError(f"bench.compiled_batch_sizes: {stray} not in bench.batch_sizes {list(b.batch_sizes)} "
                              "(name some of those, or null for all)")
    if b.warmup_runs < 0:
        raise ConfigError(f"bench.warmup_runs: {b.warmup_runs} is negative")
    if b.max_warmup_runs < 0:
        raise ConfigError(f"bench.max_warmup_runs: {b.max_warmup_runs} is negative")
    _positive_ints([b.min_repeats], "bench.min_repeats")
    if b.target_ci_pct is not None and not b.target_ci_pct > 0:
        raise ConfigError(f"bench.target_ci_pct: {b.target_ci_pct} is not a positive percentage (null: no target)")
    if b.max_time_per_figure_s is not None and not b.max_time_per_figure_s > 0:
        raise ConfigError(f"bench.max_time_per_figure_s: {b.max_time_per_figure_s} is not positive (null: no cap)")
    if b.max_time_per_eager_figure_s is not None and b.max_time_per_eager_figure_s < 0:
        raise ConfigError(f"bench.max_time_per_eager_figure_s: {b.max_time_per_eager_figure_s} is negative "
                          "(0: min_repeats only; null: as max_time_per_figure_s)")
    if b.max_compile_s is not None and not b.max_compile_s > 0:
        raise ConfigError(f"bench.max_compile_s: {b.max_compile_s} is not positive (null: no limit)")
    if b.warmup_steady_pct < 0:
        raise ConfigError(f"bench.warmup_steady_pct: {b.warmup_steady_pct} is negative")
    if b.max_repeats < b.min_repeats:
        raise ConfigError(f"bench.max_repeats: {b.max_repeats} is below bench.min_repeats ({b.min_repeats})")
    if b.min_duration_s < 0:
        raise ConfigError(f"bench.min_duration_s: {b.min_duration_s} is negative")
    # bench.cpu_affinity is parsed by its owner, qbench.measure.cpu_affinity: preflight's check_cpu_affinity


def validate_eval(e: Any) -> None:
    """The eval part of :func:`validate`: the settings alone. The tasks against the task table and the data at
    hand are preflight's (qbench/evaluate/tasks.py: check)."""
    _positive_ints([e.batch_size], "eval.batch_size")
    if e.max_length_tokens is not None:
        _positive_ints([e.max_length_tokens], "eval.max_length_tokens")
    if e.max_gen_toks is not None:
        _positive_ints([e.max_gen_toks], "eval.max_gen_toks")
    _check_limit(e.limit, "eval.limit")
    tasks = list(e.tasks)
    if len(set(tasks)) != len(tasks):
        raise ConfigError(f"eval.tasks: a task is named twice in {tasks}")
    for task, value in e.task_limits.items():
        if task not in tasks:
            raise ConfigError(f"eval.task_limits.{task}: '{task}' is not in eval.tasks {tasks}")
        _check_limit(value, f"eval.task_limits.{task}")
    # OmegaConf stores a bare YAML true in this str field as "True": compare case-insensitively
    if str(e.offline).lower() not in ("auto", "true", "false"):
        raise ConfigError(f"eval.offline: '{e.offline}' is not one of auto, true, false")
    if e.enabled and not tasks and not e.perplexity.enabled and not e.quality.enabled:
        raise ConfigError("eval.tasks: eval is enabled but no task is named")
    for task, shots in e.num_fewshot.items():
        if int(shots) < 0:
            raise ConfigError(f"eval.num_fewshot.{task}: {shots} is negative")
        if task not in tasks:
            raise ConfigError(f"eval.num_fewshot.{task}: '{task}' is not in eval.tasks {tasks}")
    offline = eval_offline(e)
    p = e.perplexity
    if p.enabled:
        _check_windows("eval.perplexity", p.source, "seq_len_tokens", p.seq_len_tokens, 2, p.max_windows, offline)
    q = e.quality
    if q.enabled:
        _check_windows("eval.quality", q.source, "ctx_tokens", q.ctx_tokens, 4, q.max_windows, offline)
        _positive_ints([q.batch_size], "eval.quality.batch_size")
        if q.max_kept is not None:
            _positive_ints([q.max_kept], "eval.quality.max_kept")
        if not 0 < q.coverage <= 1:
            raise ConfigError(f"eval.quality.coverage: {q.coverage} must be in (0, 1]")


def _check_windows(prefix: str, source: str, length_key: str, length: int, minimum: int,
                   max_windows: Optional[int], offline: bool) -> None:
    """A corpus cut into windows (perplexity, quality): window length, window cap, the corpus itself."""
    if length < minimum:
        raise ConfigError(f"{prefix}.{length_key}: {length} must be at least {minimum}")
    if max_windows is not None:
        _positive_ints([max_windows], f"{prefix}.max_windows")
    _check_corpus(source, f"{prefix}.source", offline, min_bytes=length)


def _check_corpus(source: str, key: str, offline: bool, min_bytes: int = 1) -> None:
    """A text corpus: wikitext2 (online only), builtin:tiny_text, or a local file."""
    if source in PERPLEXITY_HUB_SOURCES:
        if offline:
            raise ConfigError(
                f"{key}: '{source}' is read from the Hub but evaluation is offline; "
                "give a local .txt file or builtin:tiny_text"
            )
    elif source.startswith("builtin:"):
        if source != "builtin:tiny_text":
            raise ConfigError(f"{key}: '{source}' is unknown; the bundled text is builtin:tiny_text")
    elif not Path(source).expanduser().is_file():
        raise ConfigError(f"{key}: '{source}' is not a file (nor wikitext2 or builtin:tiny_text)")
    else:
        check_text_file(Path(source).expanduser(), key, min_bytes)


def _line_of(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, offset) + 1


def check_text_file(path: Path, key: str, min_bytes: int = 1) -> str:
    """The text of a file a cell will read (a corpus, a calibration file), or ConfigError naming the key, the
    file and the line: not a regular file, empty, binary (a NUL byte) or not UTF-8. ``min_bytes``: fewer bytes
    than this cannot hold what the cell needs (a window of N tokens needs at least N bytes: a token is a byte or
    more)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{key}: '{path}' is not a file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{key}: '{path}' cannot be read ({exc.strerror})") from None
    if not data.strip():
        raise ConfigError(f"{key}: '{path}' is empty")
    nul = data.find(b"\0")
    if nul >= 0:
        raise ConfigError(f"{key}: '{path}' is a binary file, not text (a NUL byte on line {_line_of(data, nul)})")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{key}: '{path}' is not UTF-8 text (line {_line_of(data, exc.start)}, byte {exc.start}: "
                          f"{exc.reason})") from None
    if len(data) < min_bytes:
        raise ConfigError(f"{key}: '{path}' holds {len(data)} bytes, fewer than the {min_bytes} tokens one window needs")
    return text
