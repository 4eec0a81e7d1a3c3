"""Skip-if-done: a cell whose result says ``ok`` is skipped unless forced; ``error`` cells are skipped unless
``rerun_failed`` (or forced). Only a result of the same identity (qbench.store.identity) counts as done: one
measured with other settings is measured again, and the stored one is kept as result.prev.json."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Optional

from qbench.store.identity import changed_settings
from qbench.store.jsonio import read_result
from qbench.store.layout import PREVIOUS_RESULT_FILE, RESULT_FILE


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
