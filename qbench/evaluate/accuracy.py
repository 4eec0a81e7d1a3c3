"""Accuracy of the model a cell has already loaded (and quantized): lm-eval tasks (and perplexity).

The loaded model object goes to lm-eval 0.4.13 through ``HFLM(pretrained=model, ...)``, so the numbers are for
exactly the weights whose memory and latency the cell measured. Each task runs in its own
``lm_eval.simple_evaluate`` call (its own few-shot count, its own limit, its own timing) with one fixed batch
size and fixed seeds. What each task is (lm-eval names online and offline, default few-shot count, headline
metric, chance level, offline data) comes from the task table, qbench/evaluate/tasks.py. MMLU and GSM8K run
lm-eval's stock task definitions: online the stock ``mmlu`` / ``gsm8k`` tasks read the Hub, offline the identical
``qbench_mmlu`` / ``qbench_gsm8k`` tasks (qbench/evaluate/lm_eval_tasks) read the original files under ``eval.data_dir``. Results
come back under the table's names (``mmlu``, ``gsm8k``, ``arc_challenge``, ...); a task the table does not know
runs online under its lm-eval name, headed by the first metric lm-eval reports.

What :func:`run` returns is the ``accuracy`` section of result.json (docs/results.md)::

    {
      "tasks": {
        "mmlu": {"metric": "acc", "value": 0.61, "stderr": 0.004, "n_items": 14042, "n_items_available": 14042,
                 "num_fewshot": 5, "limit": null, "eval_time_s": 812.0, "items_per_s": 17.3,
                 "lm_eval_task": "mmlu", "chance_level": 0.25, "n_subjects": 57,
                 "categories": {"stem": {"value", "stderr", "n_items"}, "humanities": …, "social_sciences": …, "other": …},
                 "subjects": {"abstract_algebra": {"value", "stderr", "n_items"}, …}},
        "gsm8k": {"metric": "exact_match,strict-match", "value": …, "stderr": …,
                  "metrics": {"exact_match,strict-match": 0.52, "exact_match,flexible-extract": 0.55},
                  "stderrs": {"exact_match,strict-match": 0.014, "exact_match,flexible-extract": 0.014},
                  "n_items", "n_items_available", "num_fewshot", "limit", "eval_time_s", "items_per_s",
                  "lm_eval_task", "chance_level": 0.0},
        "arc_challenge": {"metric": "acc_norm,none", …, "chance_level": 0.25},   # the table's headline
        "<task not in the table>": {"metric": <first lm-eval reports>, "value", "stderr", "metrics", "stderrs", …,
                                    "chance_level": null}
      },
      "items": {
        "mmlu": {"doc_ids": ["abstract_algebra/0", …], "correct": "0110…", "predictions": "3102…", "targets": "1302…"},
        "gsm8k": {"doc_ids": [0, 1, …], "correct": "0100…",   # = correct_by_metric["exact_match,strict-match"]
                  "correct_by_metric": {"exact_match,strict-match": "0100…", "exact_match,flexible-extract": "0110…"},
                  "predictions": {"strict-match": ["18", "[invalid]", …], "flexible-extract": ["18", "3", …]}}
      },
      "settings": {"lm_eval_version", "batch_size", "max_length_tokens", "seed", "seeds", "num_fewshot",
                   "num_fewshot_lm_eval_default", "limit", "max_gen_toks", "offline", "data", "data_dir",
                   "data_dir_resolved", "lm_eval_tasks", "mmlu_subjects", "bootstrap_iters", "device", …},
      "perplexity": {"source", "seq_len_tokens", "n_windows", "n_tokens", "value", "eval_time_s"} or null,
      "chance": false,          # true when the weights are random: every score above means nothing
      "warnings": []
    }

Item records are ordered by (subject, doc_id) for MMLU and by doc_id otherwise, one character of ``correct``
per item, so two cells evaluated with the same settings can be compared item by item
(:mod:`qbench.evaluate.paired`).
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math
import shutil
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from qbench.errors import eval_offline
from qbench.evaluate.lm_eval_tasks import MMLU_CATEGORIES, MMLU_CATEGORY_ALIASES, MMLU_SUBJECTS, TASKS_DIR
from qbench.evaluate.perplexity import perplexity
from qbench.evaluate.tasks import SUBJECT, Task, lookup

# What lm-eval logs whenever it is handed a loaded model, as qbench always does (above): (library, message start).
# True of every cell, so a cell keeps them in library_warnings and out of its warnings, which the report lists.
EXPECTED_LIBRARY_WARNINGS = (("lm_eval", "`pretrained` model kwarg is not of type `str`"),
                             ("lm_eval", "Passed an already-initialized model through `pretrained`"))

LOG = logging.getLogger(__name__)

BOOTSTRAP_ITERS = 100000  # lm-eval's default; only used for metrics not aggregated by a mean
SUBSET_GROUP = "qbench_mmlu_subset"  # the MMLU group over some subjects, written at run time (_subset_groups)


@dataclass
class _Plan:
    """How one public task runs in lm-eval."""

    public: str  # name in the result: the task table's, or the lm-eval name passed through
    spec: Optional[Task]  # the task table's entry; None for a task it does not know
    lm_task: str  # task or group name handed to simple_evaluate
    num_fewshot: Optional[int]  # None: the task's own default
    limit: Optional[float]
    subjects: List[str] = field(default_factory=list)  # MMLU only


# ------------------------------------------------------------------------------------------------ entry point
def run(model: Any, tokenizer: Any, eval_cfg: Any, device: str, random_weights: bool,
        cache_dir: Optional[str] = None, make_lm: Optional[Any] = None) -> Optional[Dict[str, Any]]:
    """Evaluate the loaded ``model`` on ``eval_cfg.tasks`` (and perplexity); the ``accuracy`` section.

    ``device`` is where the model sits ("cuda" or "cpu"); handed to lm-eval explicitly (HFLM defaults to cuda).
    ``cache_dir`` (run.cache_dir): where offline tasks' built requests are kept for the sweep's next cells
    (qbench/evaluate/request_cache.py); None builds them every time. The section's ``time_budget`` says where
    the evaluation's seconds went (task building, request building, the model's calls). ``make_lm(model,
    tokenizer, eval_cfg, device)`` builds lm-eval's model for a model that is not a transformers one (gguf:
    llama.cpp); None: HFLM. Its ``qbench_warnings`` and ``qbench_settings()``, when it has them, go to the section.
    Returns None when ``eval_cfg.enabled`` is false.
    """
    from qbench.evaluate.request_cache import eval_clock

    if not eval_cfg.enabled:
        return None
    offline = eval_offline(eval_cfg)
    warnings: List[str] = []
    data_dir_resolved = None
    if offline and eval_cfg.tasks:
        data_dir_resolved = str(_resolve_data_dir(eval_cfg.data_dir))
    plans = [_plan(t, eval_cfg, offline, data_dir_resolved, warnings) for t in eval_cfg.tasks]

    out: Dict[str, Any] = {"tasks": {}, "items": {}, "settings": {}, "perplexity": None,
                           "chance": bool(random_weights), "warnings": warnings}
    lm = (make_lm or _make_lm)(model, tokenizer, eval_cfg, device) if plans else None
    if lm is not None and hasattr(lm, "tok_encode"):
        reuse_recent_encodings(lm)
    cache = _request_cache_dir(cache_dir, eval_cfg, offline, data_dir_resolved)
    if plans:
        with _task_manager(plans, offline, eval_cfg, data_dir_resolved) as tm, _quiet_lm_eval(), \
                eval_clock(tm, lm, cache, out, int(eval_cfg.seed), data_dir_resolved):
            for i, plan in enumerate(plans, start=1):
                LOG.info("eval %d/%d: %s (lm-eval task %s, %s-shot, limit %s, batch size %d, %s data)",
                         i, len(plans), plan.public, plan.lm_task,
                         "default" if plan.num_fewshot is None else plan.num_fewshot,
                         plan.limit, eval_cfg.batch_size, "local" if offline else "Hub")
                entry, items = _run_task(lm, tm, plan, eval_cfg)
                out["tasks"][plan.public] = entry
                if getattr(eval_cfg, "log_samples", True):
                    out["items"][plan.public] = items
                _log_entry(plan, entry)
                warnings.extend(entry.pop("_warnings", []))
                warnings.extend(_local_copy_warning(plan, entry, offline))

    if eval_cfg.perplexity.enabled:
        t0 = time.perf_counter()
        LOG.info("perplexity: %s, windows of %d tokens", eval_cfg.perplexity.source, eval_cfg.perplexity.seq_len_tokens)
        out["perplexity"] = perplexity(model, tokenizer, eval_cfg.perplexity, offline=offline)
        LOG.info("perplexity: %.3f over %d windows", out["perplexity"]["value"], out["perplexity"]["n_windows"])
        out.setdefault("time_budget", {})["perplexity_s"] = time.perf_counter() - t0

    if random_weights:
        warnings.append("random weights: every accuracy figure sits at chance and means nothing")
    out["settings"] = _settings(eval_cfg, plans, offline, data_dir_resolved, lm, device)
    if hasattr(lm, "qbench_settings"):  # an adapter of qbench's own: what it ran on, what it had to cut
        out["settings"]["lm_eval_model"] = lm.qbench_settings()
        warnings.extend(lm.qbench_warnings)
    return out


def _request_cache_dir(cache_dir: Optional[str], eval_cfg: Any, offline: bool,
                       data_dir: Optional[str]) -> Optional[Path]:
    """Where built requests are kept: offline only, where every input is a local file qbench can fingerprint
    (online, the Hub's copy of a dataset may change under an unchanged name); off with eval.cache_requests."""
    if cache_dir is None or not offline or data_dir is None or not getattr(eval_cfg, "cache_requests", True):
        return None
    return Path(cache_dir).expanduser() / "lm_eval_requests"


def _log_entry(plan: _Plan, entry: Dict[str, Any]) -> None:
    LOG.info("eval %s: %s = %.4f ± %s on %d items in %.1f s (%.1f items/s)", plan.public, entry["metric"],
             entry["value"] if entry["value"] is not None else float("nan"),
             "n/a" if entry["stderr"] is None else f"{entry['stderr']:.4f}",
             entry["n_items"], entry["eval_time_s"], entry["items_per_s"] or 0.0)


def _local_copy_warning(plan: _Plan, entry: Dict[str, Any], offline: bool) -> List[str]:
    """A full offline run whose local test set is not the Hub's (the hendrycks MMLU CSVs hold 37 more items)."""
    spec = plan.spec
    if not (offline and spec is not None and spec.hub_test_items) or entry["n_items_available"] == spec.hub_test_items:
        return []
    if spec.subjects and len(plan.subjects) < len(MMLU_SUBJECTS):
        return []  # a subset of subjects: no Hub count to compare with
    return [f"{plan.public}: the local test set has {entry['n_items_available']} items, {spec.online_data}, what "
            f"lm-eval reads online, has {spec.hub_test_items}; same prompts, but scores are not strictly comparable "
            "with online or published ones (cells are, when all ran offline on the same files)"]


# ------------------------------------------------------------------------------------------------ planning
def _resolve_data_dir(data_dir: Optional[str]) -> Path:
    from qbench.evaluate.lm_eval_tasks.mmlu.utils import resolve_data_dir

    return resolve_data_dir(data_dir).resolve()


def _as_limit(value: Optional[float]) -> Optional[float]:
    """lm-eval's limit: an int number of items, or a fraction below 1.0."""
    if value is None:
        return None
    value = float(value)
    return value if value < 1.0 else int(value)


def _plan(task: str, eval_cfg: Any, offline: bool, data_dir: Optional[str], warnings: List[str]) -> _Plan:
    spec = lookup(task)
    shots = dict(eval_cfg.num_fewshot).get(task, spec.num_fewshot if spec else None)
    limits = dict(getattr(eval_cfg, "task_limits", None) or {})
    limit = _as_limit(limits.get(task, eval_cfg.limit))
    if offline and (spec is None or spec.offline_task is None):  # preflight refuses it first, with the same words
        raise ValueError(f"{task}: reads its data from the Hub (no offline data layout in qbench), but evaluation "
                         "is offline")
    if spec is not None and spec.subjects:
        subjects = _subjects(spec, eval_cfg, offline, data_dir, warnings)
        full = len(subjects) == len(MMLU_SUBJECTS)
        lm_task = (spec.offline_task if offline else spec.online_name) if full else SUBSET_GROUP
        return _Plan(task, spec, lm_task, shots, limit, sorted(subjects))
    if spec is not None:
        return _Plan(task, spec, spec.offline_task if offline else spec.online_name, shots, limit)
    return _Plan(task, None, task, shots, limit)


def _subjects(spec: Task, eval_cfg: Any, offline: bool, data_dir: Optional[str], warnings: List[str]) -> List[str]:
    """The MMLU subjects to evaluate: those named, else all 57 (offline: all whose test file is at hand)."""
    subjects = list(eval_cfg.mmlu_subjects) or list(MMLU_SUBJECTS)
    if offline and not eval_cfg.mmlu_subjects:
        test = next(p for p in spec.data_files if "test" in p)  # mmlu/test/{subject}_test.csv
        present = [s for s in MMLU_SUBJECTS if (Path(data_dir) / test.replace(SUBJECT, s)).exists()]
        if len(present) < len(MMLU_SUBJECTS):
            warnings.append(f"{spec.name}: {data_dir} holds {len(present)} of the 57 subjects; evaluating those only")
        subjects = present
    if not subjects:
        raise ValueError(f"{spec.name}: no subject to evaluate (data dir {data_dir})")
    return subjects


def _subset_groups(subjects: Sequence[str], offline: bool) -> Dict[str, str]:
    """YAML text of an MMLU group over some subjects, with lm-eval's category subgroups and aggregation."""
    prefix = "qbench_mmlu_" if offline else "mmlu_"
    agg = "aggregate_metric_list:\n  - metric: acc\n    weight_by_size: True\nmetadata:\n  version: 2\n"
    files, top = {}, []
    for cat in MMLU_CATEGORIES:
        members = [s for s in subjects if MMLU_SUBJECTS[s] == cat]
        if not members:
            continue
        name = f"qbench_mmlu_subset_{cat}"
        top.append(name)
        tasks = "".join(f"  - {prefix}{s}\n" for s in members)
        files[f"_{name}.yaml"] = f"group: {name}\ngroup_alias: {MMLU_CATEGORY_ALIASES[cat]}\ntask:\n{tasks}{agg}"
    files["_qbench_mmlu_subset.yaml"] = "group: qbench_mmlu_subset\ntask:\n" + "".join(f"  - {t}\n" for t in top) + agg
    return files


@contextlib.contextmanager
def _task_manager(plans: Sequence[_Plan], offline: bool, eval_cfg: Any, data_dir: Optional[str]) -> Iterator[Any]:
    """lm-eval's TaskManager indexing only what the plans need: indexing every stock task parses thousands of
    YAML files, and each cell process would pay that again."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    stock = Path(lm_eval.__file__).parent / "tasks"
    paths: List[Path] = [TASKS_DIR]
    # a task the table does not know may live anywhere among lm-eval's ~10k: only then index them all
    include_defaults = any(p.spec is None or p.spec.stock_dir is None for p in plans)
    if not offline and not include_defaults:
        paths += list(dict.fromkeys(stock / p.spec.stock_dir for p in plans))
    tmp = None
    try:
        subset = [p for p in plans if p.lm_task == SUBSET_GROUP]
        if subset:
            tmp = Path(tempfile.mkdtemp(prefix="qbench_tasks_"))
            for name, text in _subset_groups(subset[0].subjects, offline).items():
                (tmp / name).write_text(text)
            paths.append(tmp)
        metadata = {"qbench_data_dir": data_dir} if data_dir else None
        yield TaskManager(include_path=[str(p) for p in paths], include_defaults=include_defaults, metadata=metadata)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


class _DropNoise(logging.Filter):
    """lm-eval warns once per MMLU subject (57 lines each) about --metadata for custom datasets and about the
    few-shot count we set; nothing to act on, and the few-shot counts are in the result's settings."""

    NOISE = ("Custom kwargs can be passed", "Overwriting default num_fewshot")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(n in message for n in self.NOISE)


@contextlib.contextmanager
def _quiet_lm_eval() -> Iterator[None]:
    """Skip lm-eval's environment dump (torch collect_env: 3-9 s per call; result.json records the environment
    itself) and its per-task custom-dataset notice. Restored on exit."""
    import lm_eval.evaluator as ev

    saved = ev.add_env_info, ev.get_git_commit_hash
    noise = _DropNoise()
    loggers = [logging.getLogger(name) for name in ("lm_eval.api.task", "lm_eval.evaluator")]
    ev.add_env_info = lambda results: None
    ev.get_git_commit_hash = lambda: None
    for lg in loggers:
        lg.addFilter(noise)
    try:
        yield
    finally:
        ev.add_env_info, ev.get_git_commit_hash = saved
        for lg in loggers:
            lg.removeFilter(noise)


def _make_lm(model: Any, tokenizer: Any, eval_cfg: Any, device: str) -> Any:
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=int(eval_cfg.batch_size),
                max_length=eval_cfg.max_length_tokens, device=device)


# encodings kept: the requests of one item (an MMLU question's 4 choices) reach tok_encode one after another
RECENT_ENCODINGS = 64


def reuse_recent_encodings(lm: Any, size: int = RECENT_ENCODINGS) -> None:
    """lm-eval's ``loglikelihood`` encodes every request on its own (``TemplateLM._encode_pair``: the context plus
    continuation, then the context alone), so an MMLU item's 5-shot context is encoded once per answer choice, four
    times, while the GPU waits: 27 % of MMLU's model-call time on the H200 (docs/time_budget.md). The last ``size``
    encodings are kept on this ``lm`` and a fresh copy of the ids is returned, so lm-eval gets the very ids it
    would have computed, with 3 of every 8 encodes of a 4-choice item saved. Only ``tok_encode`` calls made with
    keyword options (as lm-eval makes them) are kept; any other call goes straight through."""
    encode = lm.tok_encode

    @functools.lru_cache(maxsize=size)
    def encoded(string: str, options: Tuple[Tuple[str, Any], ...]) -> Tuple[int, ...]:
        return tuple(encode(string, **dict(options)))

    def tok_encode(string: Any, *args: Any, **kwargs: Any) -> Any:
        if args or not isinstance(string, str):
            return encode(string, *args, **kwargs)
        options = tuple(sorted(kwargs.items()))
        try:
            hash(options)
        except TypeError:
            return encode(string, **kwargs)
        return list(encoded(string, options))

    lm.tok_encode = tok_encode  # the instance's attribute: lm-eval's self.tok_encode(...) calls find it first


# ------------------------------------------------------------------------------------------------ one task
def _run_task(lm: Any, tm: Any, plan: _Plan, eval_cfg: Any) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    import lm_eval

    seed = int(eval_cfg.seed)
    # only generate_until tasks read it; a multiple-choice task would just log a warning
    generates = plan.spec is None or plan.spec.generates
    gen_kwargs = {"max_gen_toks": int(eval_cfg.max_gen_toks)} if eval_cfg.max_gen_toks and generates else None
    t0 = time.perf_counter()
    res = lm_eval.simple_evaluate(
        model=lm, tasks=[plan.lm_task], num_fewshot=plan.num_fewshot, limit=plan.limit,
        batch_size=int(eval_cfg.batch_size), log_samples=True, task_manager=tm, gen_kwargs=gen_kwargs,
        bootstrap_iters=BOOTSTRAP_ITERS, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    elapsed = time.perf_counter() - t0
    if res is None:  # only on non-zero ranks, which a cell never is
        raise RuntimeError(f"lm-eval returned no result for {plan.lm_task}")
    groups = set(res.get("groups", {})) | set(res.get("group_subtasks", {}))
    leaves = [name for name in res["results"] if name not in groups]
    shots = {res["n-shot"].get(name) for name in leaves}
    n_available = sum(int(res["n-samples"][name]["original"]) for name in leaves)
    if plan.spec is not None and plan.spec.subjects:
        entry, items = _mmlu(res, plan, leaves)
    else:
        entry, items = _single(res, plan, leaves)
    n = entry["n_items"]
    entry.update({
        "n_items_available": n_available,
        "num_fewshot": shots.pop() if len(shots) == 1 else sorted(s for s in shots if s is not None),
        "limit": plan.limit,
        "eval_time_s": elapsed,
        "items_per_s": n / elapsed if elapsed > 0 else None,
        "lm_eval_task": plan.lm_task,
        "chance_level": plan.spec.chance_level if plan.spec else None,
    })
    if (plan.spec is not None and plan.spec.generates) or any(c.get("output_type") == "generate_until" for c in res["configs"].values()):
        gk = next((c.get("generation_kwargs") for c in res["configs"].values() if c.get("generation_kwargs")), None)
        entry["generation_kwargs"] = _jsonable(gk)
    return entry, items


def _stderr(value: Any) -> Optional[float]:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None  # lm-eval writes "N/A" when it has none
    return None if math.isnan(v) else v


def _metric_keys(result: Dict[str, Any]) -> List[str]:
    """'metric,filter' keys of one lm-eval result row, in lm-eval's order (stderr rows excluded)."""
    return [k for k in result if "," in k and "_stderr," not in k]


def _subject(leaf: str) -> str:
    return leaf.split("mmlu_", 1)[1]


def _mmlu(res: Dict[str, Any], plan: _Plan, leaves: List[str]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    top = res["results"][plan.lm_task]
    warnings: List[str] = []
    subjects: Dict[str, Any] = {}
    doc_ids, correct, preds, targets = [], [], [], []
    cat_correct: Dict[str, List[int]] = defaultdict(list)
    for leaf in sorted(leaves, key=_subject):
        subject = _subject(leaf)
        row = res["results"][leaf]
        samples = sorted((s for s in res["samples"][leaf] if s["filter"] == "none"), key=lambda s: s["doc_id"])
        c = [int(round(float(s["acc"]))) for s in samples]
        for s in samples:
            doc_ids.append(f"{subject}/{s['doc_id']}")
            preds.append(str(_argmax([float(r[0]) for r in s["filtered_resps"]])))
            targets.append(str(s["target"]))
        correct += c
        cat_correct[MMLU_SUBJECTS[subject]] += c
        subjects[subject] = {"value": float(row["acc,none"]), "stderr": _stderr(row.get("acc_stderr,none")),
                             "n_items": len(samples)}
    categories = {}
    for cat in MMLU_CATEGORIES:
        row = res["results"].get(f"{plan.lm_task}_{cat}")
        if row is None:
            continue
        categories[cat] = {"value": float(row["acc,none"]), "stderr": _stderr(row.get("acc_stderr,none")),
                           "n_items": len(cat_correct[cat])}
    value = float(top["acc,none"])
    n = len(correct)
    if n and abs(sum(correct) / n - value) > 1e-9:
        warnings.append(f"mmlu: lm-eval's aggregate {value:.6f} differs from the mean of the item records "
                        f"{sum(correct) / n:.6f}")
    entry = {
        "metric": "acc", "value": value, "stderr": _stderr(top.get("acc_stderr,none")), "n_items": n,
        "n_subjects": len(subjects), "categories": categories, "subjects": subjects, "_warnings": warnings,
    }
    items = {"doc_ids": doc_ids, "correct": "".join(map(str, correct)), "predictions": "".join(preds),
             "targets": "".join(targets)}
    return entry, items


def _argmax(values: Sequence[float]) -> int:
    """np.argmax as lm-eval uses it (first maximum wins)."""
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def _single(res: Dict[str, Any], plan: _Plan, leaves: List[str]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """Any task that is not MMLU: one leaf (or a group, reported by its top row)."""
    name = plan.lm_task
    # a tag (several tasks, no group score) has no row of its own: its only task's row, or none
    row = res["results"].get(name) or (res["results"][leaves[0]] if len(leaves) == 1 else {})
    keys = _metric_keys(row)
    primary, warnings = _headline(plan, keys)
    metrics = {k: _num(row[k]) for k in keys}
    stderrs = {k: _stderr(row.get(k.replace(",", "_stderr,", 1))) for k in keys}
    entry: Dict[str, Any] = {
        "metric": primary, "value": metrics.get(primary), "stderr": stderrs.get(primary),
        "metrics": metrics, "stderrs": stderrs, "_warnings": warnings,
    }
    if len(leaves) > 1:
        entry["subtasks"] = {leaf: {k: _num(v) for k, v in res["results"][leaf].items() if k in
                                    _metric_keys(res["results"][leaf])} for leaf in sorted(leaves)}
    # per-item records: one list per (metric, filter), ordered by (leaf, doc_id)
    by_key: Dict[str, List[float]] = defaultdict(list)
    preds: Dict[str, List[Any]] = defaultdict(list)
    doc_ids: List[Any] = []
    multi = len(leaves) > 1
    for leaf in sorted(leaves):
        samples = sorted(res["samples"][leaf], key=lambda s: (s["doc_id"], s["filter"]))
        seen = []
        for s in samples:
            if s["doc_id"] not in seen:
                seen.append(s["doc_id"])
                doc_ids.append(f"{leaf}/{s['doc_id']}" if multi else s["doc_id"])
            for m in s["metrics"]:
                by_key[f"{m},{s['filter']}"].append(s[m])
            preds[s["filter"]].append(_prediction(s))
    n = len(doc_ids)
    entry["n_items"] = n
    items: Dict[str, Any] = {"doc_ids": doc_ids}
    binary = {k: "".join(str(int(v)) for v in vals) for k, vals in by_key.items()
              if len(vals) == n and all(isinstance(v, (bool, int, float)) and float(v) in (0.0, 1.0) for v in vals)}
    if primary in binary:
        items["correct"] = binary[primary]
        if entry["value"] is not None and n and abs(binary[primary].count("1") / n - entry["value"]) > 1e-9:
            entry["_warnings"].append(f"{plan.public}: lm-eval's {primary} {entry['value']:.6f} differs from the "
                                      "mean of the item records")
    if len(binary) > 1 or (binary and primary not in binary):
        items["correct_by_metric"] = binary
    scores = {k: [_num(v) for v in vals] for k, vals in by_key.items() if k not in binary and len(vals) == n}
    if scores:
        items["scores"] = scores
    if any(p is not None for ps in preds.values() for p in ps):
        items["predictions"] = dict(preds) if len(preds) > 1 else next(iter(preds.values()))
    return entry, items


def _headline(plan: _Plan, keys: List[str]) -> Tuple[Optional[str], List[str]]:
    """The task table's headline metric; for a task it does not know (or a headline lm-eval did not report),
    the first metric lm-eval reports, with a warning saying so."""
    first = keys[0] if keys else None
    if plan.spec is None:
        return first, [f"{plan.public}: not in qbench's task table (qbench/evaluate/tasks.py), so its headline is "
                       f"the first metric lm-eval reports ({first}) and its chance level is unknown; add an entry to "
                       "name the right one"]
    if plan.spec.headline in keys:
        return plan.spec.headline, []
    return first, [f"{plan.public}: lm-eval reported no {plan.spec.headline} (the task table's headline), only "
                   f"{', '.join(keys) or 'no metric'}; headline = {first}"]


def _num(value: Any) -> Optional[float]:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _prediction(sample: Dict[str, Any]) -> Any:
    """What the model answered: the extracted string (generate_until) or the chosen index (multiple choice)."""
    fr = sample.get("filtered_resps")
    if not fr:
        return None
    if all(isinstance(r, (list, tuple)) and len(r) == 2 and isinstance(r[0], (int, float)) for r in fr):
        return _argmax([float(r[0]) for r in fr]) if len(fr) > 1 else None  # loglikelihood pairs
    first = fr[0]
    return first if isinstance(first, str) else _jsonable(first)


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(value)


def _settings(eval_cfg: Any, plans: Sequence[_Plan], offline: bool, data_dir: Optional[str], lm: Any,
              device: str) -> Dict[str, Any]:
    import lm_eval

    seed = int(eval_cfg.seed)
    mmlu = next((p for p in plans if p.spec is not None and p.spec.subjects), None)
    data = {}
    for p in plans:
        if p.spec is None:
            data[p.public] = "the task's own dataset (lm-eval)"
        else:
            data[p.public] = f"{data_dir}/{p.spec.offline_data}" if offline else p.spec.online_data
    return {
        "lm_eval_version": lm_eval.__version__,
        "batch_size": int(eval_cfg.batch_size),
        "max_length_tokens": eval_cfg.max_length_tokens,
        "max_length_tokens_used": int(lm.max_length) if lm is not None else None,
        "seed": seed,
        "seeds": {"random": seed, "numpy": seed, "torch": seed, "fewshot": seed},
        "num_fewshot": {p.public: p.num_fewshot for p in plans},
        "num_fewshot_lm_eval_default": {p.public: p.spec.lm_eval_num_fewshot if p.spec else None for p in plans},
        "limit": {p.public: p.limit for p in plans},
        "max_gen_toks": eval_cfg.max_gen_toks,
        "offline": offline,
        "data": data,
        "data_dir": eval_cfg.data_dir,
        "data_dir_resolved": data_dir,
        "lm_eval_tasks": {p.public: p.lm_task for p in plans},
        "mmlu_subjects": (mmlu.subjects if mmlu and len(mmlu.subjects) < len(MMLU_SUBJECTS) else "all") if mmlu else None,
        "bootstrap_iters": BOOTSTRAP_ITERS,
        "apply_chat_template": False,
        "device": device,
    }
