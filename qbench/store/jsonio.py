"""JSON on disk: written atomically (a unique temp file in the same directory, fsync, then ``os.replace``), so a
cell killed mid-write leaves no result.json and the next run of the sweep redoes exactly that cell; read back as
None when missing or unreadable (which counts as not done)."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, Optional, Union

from qbench.store.layout import RESULT_FILE
from qbench.store.redaction import redact
from qbench.store.result import Result


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


def write_json_atomic(path: Path, data: Dict[str, Any]) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one, never a part."""
    write_text_atomic(path, _json_text(data))


def _json_text(data: Dict[str, Any]) -> str:
    """``data`` as qbench writes JSON: secrets redacted, numpy values and paths made plain, indented."""
    return json.dumps(redact(data), indent=2, sort_keys=False, default=_json_default, allow_nan=False) + "\n"


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


def write_result(cell_dir: Path, result: Union[Result, Dict[str, Any]]) -> Path:
    """``result`` (a typed Result or its dict) to ``<cell_dir>/result.json``. What would reach the disk is read
    back through the typed result first (``Result.from_dict(strict=True)``): a declared field of the wrong type
    raises ResultTypeError naming its key, and nothing is written, so the report never meets a malformed row."""
    data = sanitize_floats(result.to_dict() if isinstance(result, Result) else result)
    Result.from_dict(json.loads(_json_text(data)), strict=True)  # exactly what write_json_atomic will write
    path = Path(cell_dir) / RESULT_FILE
    write_json_atomic(path, data)
    return path


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
