"""Failures as data: the error row of a cell that ended without writing its own result, and the one-line cause
of an exception that every error row and log line carries."""
from __future__ import annotations

import re
from typing import Any, Dict, Optional

from qbench.store.identity import identity
from qbench.store.jsonio import now_iso
from qbench.store.layout import cell_id
from qbench.store.result import SCHEMA_VERSION, Error, Metrics, Result


def error_row(cfg_dict: Dict[str, Any], error_class: str, message: str, phase: str,
              scheduler: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The result of a cell that ended without writing one itself (killed, timed out, stopped by SLURM):
    status error, its class and one-line message, the phase it was in. ``scheduler``: the SLURM job's record.
    Built as a typed Result, so that its fields are the ones the report reads; returned as the dict callers amend."""
    return Result(
        schema_version=SCHEMA_VERSION,
        status="error",
        sweep=cfg_dict["run"]["sweep"],
        cell=cell_id(cfg_dict),
        round=cfg_dict["run"].get("round"),
        model=cfg_dict["model"]["name"],
        method=cfg_dict["method"]["name"],
        method_kind=cfg_dict["method"]["kind"],
        config=cfg_dict,
        identity=identity(cfg_dict),
        finished_at=now_iso(),
        scheduler=scheduler,
        metrics=Metrics(),
        warnings=[],
        error=Error(klass=error_class, type=error_class, message=message, traceback="", phase=phase),
    ).to_dict()


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
