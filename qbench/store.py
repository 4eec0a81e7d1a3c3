"""Store stage: result.json, the only contract between measuring and reporting.

- Written atomically: a unique temp file in the same directory, fsync, then ``os.replace``. A cell killed
  mid-write leaves no result.json, so the next run of the sweep redoes exactly that cell.
- Skip-if-done: a cell whose result says ``ok`` is skipped unless forced; ``error`` cells are skipped unless
  ``rerun_failed`` (or forced). Only a result of the same identity (every setting that changes a figure,
  :func:`identity`) counts as done: one measured with other settings is measured again, and the stored one is
  kept as ``result.prev.json``.
- Environment metadata (host, GPU, driver, CUDA, library versions, git commit) goes into every result.
- Secrets never reach a result: environment variables are not recorded wholesale, and any string that
  contains the value of a token-like variable is redacted.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Sequence

SCHEMA_VERSION = 1
RESULT_FILE = "result.json"
_SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|API_KEY|ACCESS_KEY|CREDENTIAL|(^|_)KEY($|_)", re.I)
# Environment variables that change what a cell measures or reads, recorded by name and value in every result
# (a cell on a SLURM node inherits them from the submitting shell, so the result shows whether they arrived).
# Only these: the rest of the environment is not recorded, it carries tokens and passwords.
RECORDED_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "GPTQMODEL_OFFLINE", "HF_HOME",
                "QBENCH_DATA", "QBENCH_CACHE", "PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")


ROUNDS_DIR = "rounds"  # run.rounds: <cell>/rounds/<k>/result.json, combined into <cell>/result.json


def cell_id(cfg: Any, method_name: Optional[str] = None) -> str:
    """Directory name of one cell under runs/<sweep>/: the one format, for a composed config or its plain dict.
    ``method_name``: the same model's cell of another method (the quality baseline's)."""
    return f"{cfg['model']['name']}__{method_name or cfg['method']['name']}"


def round_dir(cell_dir: Path, k: int) -> Path:
    return Path(cell_dir) / ROUNDS_DIR / str(k)


def cell_dir(cfg: Any, method_name: Optional[str] = None) -> Path:
    """Where a cell's result.json goes: runs/<sweep>/<cell>, or its rounds/<k> while a round is measured."""
    run = cfg["run"]
    path = Path(run["runs_dir"]) / run["sweep"] / cell_id(cfg, method_name)
    return round_dir(path, run["round"]) if run.get("round") else path


def sweep_dir_of(cell_dir: Path) -> Path:
    """The sweep folder a cell's (or a round's) result directory lies in."""
    cell_dir = Path(cell_dir)
    return cell_dir.parents[2] if cell_dir.parent.name == ROUNDS_DIR else cell_dir.parent


def error_row(cfg_dict: Dict[str, Any], error_class: str, message: str, phase: str,
              scheduler: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The result of a cell that ended without writing one itself (killed, timed out, stopped by SLURM):
    status error, its class and one-line message, the phase it was in. ``scheduler``: the SLURM job's record."""
    return {
        "schema_version": SCHEMA_VERSION,
        "status": "error",
        "sweep": cfg_dict["run"]["sweep"],
        "cell": cell_id(cfg_dict),
        "round": cfg_dict["run"].get("round"),
        "model": cfg_dict["model"]["name"],
        "method": cfg_dict["method"]["name"],
        "method_kind": cfg_dict["method"]["kind"],
        "config": cfg_dict,
        "identity": identity(cfg_dict),
        "finished_at": now_iso(),
        "scheduler": scheduler,
        "metrics": {},
        "warnings": [],
        "error": {"class": error_class, "type": error_class, "message": message, "traceback": "", "phase": phase},
    }


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def read_json(path: Path) -> Optional[Dict[str, Any]]:
    """The JSON document at ``path``, or None if it is missing or unreadable (which counts as not done)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def read_result(cell_dir: Path) -> Optional[Dict[str, Any]]:
    return read_json(Path(cell_dir) / RESULT_FILE)


# A line that names an exception: "ValueError: ...", "torch.OutOfMemoryError: ...", "KeyError".
_EXC_LINE = re.compile(r"^(?:[A-Za-z_][\w]*\.)*[A-Z]\w*(?:Error|Exception|Exit|Interrupt|Failure|Warning)\b(?::.*)?$")
MESSAGE_MAX_CHARS = 500


def cause_line(text: str) -> str:
    """The cause of a failure in one line, from an exception's text that may hold a whole traceback or log tail
    (a child process's, GPT-QModel's): the last line that names an exception, else the first line."""
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    if not lines:
        return ""
    if len(lines) > 1:
        named = [ln for ln in lines if _EXC_LINE.match(ln)]
        line = named[-1] if named else lines[0]
    else:
        line = lines[0]
    return line if len(line) <= MESSAGE_MAX_CHARS else line[: MESSAGE_MAX_CHARS - 1] + "\u2026"


def error_message(exc: BaseException) -> str:
    """An error row's ``message``: the cause in one line. A message that is itself a traceback or log tail
    gives its last exception line; a wrapper whose text ends in the child's cause keeps both on the line."""
    text = str(exc)
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    cause = cause_line(text)
    if cause and cause != first and ": " in first and not first.startswith("Traceback"):
        head = first.split(": ", 1)[0]  # "<kind> quantization of X failed (exit code 1)"
        return cause_line(f"{head}: {cause}")
    return cause or type(exc).__name__


# ----------------------------------------------------------------------------------------------- identity
# A cell's identity: every setting that changes its figures. model.*, method.*, bench.* and eval.* (quality and
# perplexity included) are in it but for the names and the description (they label a cell, the cell id already
# holds the names); run.* is bookkeeping (where results go, whether to rerun, time limits), except the baseline a
# quality cell is compared with. run.inject_failure is not in it: a cell it fails is an error row, rerun anyway.
# Library versions are not in it: they are recorded in every result (environment.versions) and an upgrade of
# torch does not make a stored figure wrong for the settings it was measured with; run.force=true remeasures.
IDENTITY_SECTIONS = ("model", "method", "bench", "eval")
IDENTITY_LABELS = ("model.name", "method.name", "method.description")
PREVIOUS_RESULT_FILE = "result.prev.json"


def _free_dict_keys() -> frozenset:
    """Keys of the typed schema whose value is a dict of free keys (config_overrides, num_fewshot, ...): one
    setting each, compared whole, so a key added to such a dict counts as a change."""
    import dataclasses
    import typing

    from qbench import config

    out = set()

    def walk(schema: type, prefix: str) -> None:
        for f in dataclasses.fields(schema):
            hint = typing.get_type_hints(schema)[f.name]
            if isinstance(hint, type) and dataclasses.is_dataclass(hint):
                walk(hint, f"{prefix}{f.name}.")
            elif typing.get_origin(hint) is dict:
                out.add(f"{prefix}{f.name}")

    for section, schema in (("model", config.ModelConfig), ("bench", config.BenchConfig), ("eval", config.EvalConfig)):
        walk(schema, f"{section}.")
    return frozenset(out)


def _flatten(node: Any, prefix: str, out: Dict[str, Any], free: frozenset) -> None:
    for key, value in node.items():
        path = f"{prefix}.{key}"
        if isinstance(value, dict) and value and path not in free:
            _flatten(value, path, out, free)
        else:
            out[path] = value


def identity(cfg_dict: Dict[str, Any]) -> Dict[str, Any]:
    """{"hash": 16 hex digits, "settings": {dotted key: value}} of a cell's plain config dict (result["config"])."""
    free = _free_dict_keys()
    settings: Dict[str, Any] = {}
    for section in IDENTITY_SECTIONS:
        _flatten(cfg_dict.get(section) or {}, section, settings, free)
    for key in IDENTITY_LABELS:
        settings.pop(key, None)
    run = cfg_dict.get("run") or {}
    if settings.get("eval.quality.enabled"):
        settings["run.baseline_method"] = run.get("baseline_method")
    # as result.json will hold it: tuples are lists, a secret's value redacted (the stored side is, too)
    settings = redact(json.loads(json.dumps(settings, default=str)))
    return {"hash": content_hash(settings), "settings": settings}


def changed_settings(result: Dict[str, Any], current: Dict[str, Any]) -> Optional[Dict[str, tuple]]:
    """{key: (stored value, current value)} for each setting of ``current`` (an identity) that differs from the
    stored result's; None when the result records no settings at all.

    A result written before results carried an identity is compared through its ``config``. A key on one side
    only is a setting that qbench added or dropped since the result was written, not a change made by the user:
    it is left out, so an upgrade of qbench does not remeasure every stored cell."""
    stored = (result.get("identity") or {}).get("settings")
    if stored is None:
        if not isinstance(result.get("config"), dict):
            return None
        stored = identity(result["config"])["settings"]
    now = current["settings"]
    return {k: (stored[k], now[k]) for k in sorted(now.keys() & stored.keys()) if stored[k] != now[k]}


def describe_changes(changes: Dict[str, tuple], most: int = 3, width: int = 60) -> str:
    """"bench.batch_sizes [1] -> [1, 4], ..." for a log line: the first ``most`` keys, each value cut to ``width``."""
    def short(v: Any) -> str:
        text = json.dumps(v, default=str)
        return text if len(text) <= width else text[: width - 1] + "\u2026"

    parts = [f"{k} {short(old)} -> {short(new)}" for k, (old, new) in list(changes.items())[:most]]
    more = len(changes) - most
    return ", ".join(parts) + (f" and {more} more" if more > 0 else "")


def should_skip(cell_dir: Path, force: bool, rerun_failed: bool,
                current: Optional[Dict[str, Any]] = None) -> Optional[str]:
    """The status of a finished cell that this run leaves alone, or None if the cell must run.
    ``current``: the identity of the cell as configured now; a stored result measured with other settings is
    not this cell's result, whatever its status, and the cell runs again."""
    if force:
        return None
    result = read_result(cell_dir)
    if result is None:
        return None
    if current is not None and changed_settings(result, current):
        return None
    status = result.get("status")
    if status == "ok" or (status == "error" and not rerun_failed):
        return status
    return None


def skip_hint(cell_dir: Path, status: str) -> str:
    """Why a cell is skipped and the one setting that would run it, for the sweep's log line: true for each case."""
    result = read_result(cell_dir) or {}
    if result.get("identity") is None and not isinstance(result.get("config"), dict):
        return (f"skipped, already {status}; its result.json (an older qbench's) records no settings to compare "
                "with: run.force=true measures it again")
    if status == "ok":
        return "skipped, already ok with these settings (run.force=true measures it again)"
    err = result.get("error") or {}
    return (f"skipped, already error ({err.get('class')}) with these settings "
            "(run.rerun_failed=true or run.force=true runs it again)")


def set_aside_previous(cell_dir: Path) -> Optional[Path]:
    """Move the cell's stored result to result.prev.json before the cell is measured again, so a rerun (changed
    settings, run.force, run.rerun_failed) never loses the previous figures, even when the new attempt fails.
    One generation is kept. Returns the new path, or None when there was no result."""
    src = Path(cell_dir) / RESULT_FILE
    if not src.exists():
        return None
    dst = Path(cell_dir) / PREVIOUS_RESULT_FILE
    os.replace(src, dst)
    return dst


def _secret_values() -> list[str]:
    return [v for k, v in os.environ.items() if _SECRET_NAME.search(k) and len(v) >= 6]


def redact(obj: Any, secrets: Optional[list[str]] = None) -> Any:
    """Replace any secret value found in strings of ``obj`` (recursively) by '<redacted>'."""
    secrets = _secret_values() if secrets is None else secrets
    if not secrets:
        return obj
    if isinstance(obj, str):
        for s in secrets:
            obj = obj.replace(s, "<redacted>")
        return obj
    if isinstance(obj, dict):
        return {k: redact(v, secrets) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact(v, secrets) for v in obj]
    return obj


def write_json_atomic(path: Path, data: Dict[str, Any]) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one, never a part."""
    write_text_atomic(path, json.dumps(redact(data), indent=2, sort_keys=False, default=_json_default,
                                       allow_nan=False) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    """``text`` to ``path`` through a temp file in the same folder, fsync and rename: a reader sees the old file or
    the whole new one, and a fault (the disk full, a signal) leaves neither a 0-byte file nor the temp file.
    Redact first: this writes what it is given."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class RedactFilter:
    """A logging filter that redacts secrets in every record it passes (Hydra's job log, cli.log: Hydra logs
    each job's overrides, which may carry a token's value). Named in conf/config.yaml's hydra.job_logging."""

    def filter(self, record: Any) -> bool:
        secrets = _secret_values()
        if secrets:
            text = record.getMessage()
            clean = redact(text, secrets)
            if clean != text:
                record.msg, record.args = clean, ()
        return True


def _json_default(obj: Any) -> Any:
    try:
        import numpy as np

        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return obj.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)


def sanitize_floats(obj: Any) -> Any:
    """NaN and inf are not JSON: they become null."""
    if isinstance(obj, float) and (obj != obj or obj in (float("inf"), float("-inf"))):
        return None
    if isinstance(obj, dict):
        return {k: sanitize_floats(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [sanitize_floats(v) for v in obj]
    return obj


def write_result(cell_dir: Path, result: Dict[str, Any]) -> Path:
    path = Path(cell_dir) / RESULT_FILE
    write_json_atomic(path, sanitize_floats(result))
    return path


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (flock): released by the kernel if the holder dies, even by SIGKILL."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def check_writable(directory: Path, min_free_bytes: int = 100 * 2**20, key: str = "run.runs_dir") -> None:
    """Fail early, with the key and the path in the message, if nothing could be written there."""
    from qbench.errors import ConfigError

    directory = Path(directory)
    probe_dir = directory
    while not probe_dir.exists():
        probe_dir = probe_dir.parent
    try:  # a real write, not os.access: root on a read-only mount passes os.access
        with tempfile.TemporaryFile(dir=probe_dir):
            pass
    except OSError as exc:
        raise ConfigError(f"{key}: '{directory}' is not writable ({exc.strerror})") from None
    fs = os.statvfs(probe_dir)
    free = fs.f_bavail * fs.f_frsize
    if free < min_free_bytes:
        raise ConfigError(f"{key}: '{directory}' has only {free / 2**20:.0f} MiB free")


def package_versions(dists) -> Dict[str, Optional[str]]:
    """Installed version of each distribution, None where it is not installed."""
    from importlib import metadata

    out: Dict[str, Optional[str]] = {}
    for dist in dists:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def content_hash(obj: Any, length: int = 16) -> str:
    """A stable hex digest of a JSON-able object (key order does not matter): names caches by content."""
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def git_commit() -> Optional[str]:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True, text=True, timeout=5
        ).stdout.strip()
        return out + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def environment(method_libraries: Sequence[str] = ()) -> Dict[str, Any]:
    """What produced the numbers: host, accelerator, and library versions (qbench's own and those the cell's
    method names: qbench.methods.libraries). No environment variables."""
    env: Dict[str, Any] = {
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu_count": os.cpu_count(),
        "qbench_git_commit": git_commit(),
        "versions": package_versions(
            ("qbench", "torch", "transformers", "accelerate", *method_libraries, "lm_eval", "hydra-core", "numpy")
        ),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "variables": {k: os.environ[k] for k in RECORDED_ENV if k in os.environ},
        # names only: shows a token reached the cell (e.g. HF_TOKEN for a gated model) without recording it
        "secret_variables_withheld": sorted(k for k in os.environ if _SECRET_NAME.search(k)),
        "gpus": [],
    }
    try:
        import torch

        env["torch_cuda"] = torch.version.cuda
        env["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                p = torch.cuda.get_device_properties(i)
                env["gpus"].append(
                    {"index": i, "name": p.name, "total_memory_bytes": p.total_memory, "capability": f"{p.major}.{p.minor}"}
                )
    except ImportError:  # pragma: no cover
        pass
    env.update(_nvml_info())
    env["gpu_count"] = len(env["gpus"])
    env["gpu_name"] = env["gpus"][0]["name"] if env["gpus"] else None
    return env


def _nvml_info() -> Dict[str, Any]:
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # no driver, no GPU: the fields stay absent
        return {"nvml": False}
    try:
        info: Dict[str, Any] = {"nvml": True, "driver": pynvml.nvmlSystemGetDriverVersion()}
        info["cuda_driver_version"] = pynvml.nvmlSystemGetCudaDriverVersion_v2()
        return info
    except Exception:
        return {"nvml": True}
    finally:
        pynvml.nvmlShutdown()
