"""SLURM as qbench sees it: which job this process runs in, and what became of a job.

Two readers: a cell process records :func:`job_info` in its result (job id, node, array index), and the SLURM
launcher (hydra_plugins/qbench_launcher/slurm_launcher.py) asks :func:`job_states` what became of the jobs it
submitted, to turn a job that died without writing a result (cancelled, past its time limit, pre-empted, node
failure) into an error row of its own class. States come from ``sacct``; clusters without accounting (slurmdbd) answer through
``scontrol show job``, which knows finished jobs for MinJobAge seconds (scripts/slurm_local.sh sets an hour).
"""
from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

log = logging.getLogger("qbench")

# Jobs in these states may still run the cell (or run it again): never resubmit their cell, nor write its row
LIVE_STATES = {
    "PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "RESIZING",
    "SUSPENDED", "STAGE_OUT", "SIGNALING", "RESV_DEL_HOLD", "STOPPED",
}
# The error class a result row gets when its job ended in this state without a result of its own
ERROR_CLASS = {
    "CANCELLED": "cancelled", "REVOKED": "cancelled",
    "TIMEOUT": "timeout", "DEADLINE": "timeout",
    "PREEMPTED": "preempted",
    "NODE_FAIL": "node_fail", "BOOT_FAIL": "node_fail",
    "OUT_OF_MEMORY": "oom",
    "FAILED": "crash",
}
_MESSAGE = {
    "cancelled": "SLURM job {job} was cancelled (scancel or an administrator) before the cell finished",
    "timeout": "SLURM job {job} ran past its time limit (hydra.launcher.timeout_min) and was stopped",
    "preempted": "SLURM job {job} was pre-empted by a job of higher priority",
    "node_fail": "SLURM job {job} lost its node ({node})",
    "oom": "SLURM job {job} ran out of its memory allocation (hydra.launcher.mem_gb)",
    "crash": "SLURM job {job} failed (state {state}) without a result; see its log under .submitit/",
    "lost": "SLURM job {job} is no longer known to the scheduler and left no result",
}


# Set by the SLURM launcher inside each cell's job: the job's allocation is the cell's own. Not merely
# SLURM_JOB_ID: inside an salloc, the parallel launcher's cells share one allocation and must split it by lock.
OWN_ALLOCATION = "QBENCH_CELL_OWNS_ALLOCATION"


def in_job() -> bool:
    return "SLURM_JOB_ID" in os.environ


def owns_allocation() -> bool:
    """Whether this cell runs in a SLURM job of its own (hydra/launcher=slurm), whose CPUs and GPUs are its slot."""
    return in_job() and os.environ.get(OWN_ALLOCATION) == "1"


def job_id_from_env(env: Optional[Dict[str, str]] = None) -> Optional[str]:
    """The id scontrol, sacct and submitit use: <array job>_<index> for an array task, else the job id."""
    env = os.environ if env is None else env
    array_job, task = env.get("SLURM_ARRAY_JOB_ID"), env.get("SLURM_ARRAY_TASK_ID")
    if array_job and task:
        return f"{array_job}_{task}"
    return env.get("SLURM_JOB_ID")


def job_info(env: Optional[Dict[str, str]] = None) -> Optional[Dict[str, Any]]:
    """What a result records of the SLURM job it ran in (None outside SLURM). Names and ids only: the job's
    environment is never copied wholesale (it carries the submitting shell's secrets)."""
    env = os.environ if env is None else env
    if "SLURM_JOB_ID" not in env:
        return None
    task = env.get("SLURM_ARRAY_TASK_ID")
    return {
        "kind": "slurm",
        "job_id": job_id_from_env(env),
        "slurm_job_id": env.get("SLURM_JOB_ID"),  # the array task's own numeric id
        "array_job_id": env.get("SLURM_ARRAY_JOB_ID"),
        "array_task_id": int(task) if task and task.isdigit() else None,
        "node": env.get("SLURMD_NODENAME"),
        "partition": env.get("SLURM_JOB_PARTITION"),
        "account": env.get("SLURM_JOB_ACCOUNT"),
        "qos": env.get("SLURM_JOB_QOS"),
        "cluster": env.get("SLURM_CLUSTER_NAME"),
        "submit_host": env.get("SLURM_SUBMIT_HOST"),
        "cpus_on_node": _int(env.get("SLURM_CPUS_ON_NODE")),
        "gpus": env.get("SLURM_JOB_GPUS") or env.get("SLURM_STEP_GPUS"),
        "restart_count": _int(env.get("SLURM_RESTART_COUNT")) or 0,
    }


def _int(text: Optional[str]) -> Optional[int]:
    return int(text) if text and text.isdigit() else None


def error_class(state: Optional[str]) -> Optional[str]:
    """The error class of a job that ended in ``state``; None for COMPLETED or a job still alive."""
    if not state:
        return "lost"
    state = state.split()[0].rstrip("+").upper()  # sacct writes "CANCELLED by 0"
    if state == "COMPLETED" or state in LIVE_STATES:
        return None
    return ERROR_CLASS.get(state, "crash")


def error_message(cls: str, job_id: str, state: Optional[str], node: Optional[str]) -> str:
    return _MESSAGE.get(cls, _MESSAGE["crash"]).format(job=job_id, state=state or "unknown", node=node or "?")


def is_live(state: Optional[str]) -> bool:
    return bool(state) and state.split()[0].rstrip("+").upper() in LIVE_STATES


def job_states(job_ids: Iterable[str], timeout_s: float = 60) -> Dict[str, Dict[str, Optional[str]]]:
    """``{job_id: {"state", "node", "reason"}}`` for the ids the scheduler still knows (others are absent)."""
    ids = sorted(set(job_ids))
    if not ids:
        return {}
    out = _sacct(ids, timeout_s)
    if out is None:  # no accounting storage on this cluster
        out = _scontrol(ids, timeout_s)
    return {j: out[j] for j in ids if j in out}


def why_stopped(job_id: str) -> Optional[tuple]:
    """Inside a job SLURM is stopping: (error class, state, node), or None if SLURM is not stopping it.
    While the signals go out the job reads COMPLETING, whatever the cause: a run time that reached the time
    limit says timeout, anything else cancelled (the submitting side refines it, e.g. to preempted, from the
    final state once the job has ended)."""
    text = _run(["scontrol", "show", "job", "-o", job_id], 10) or ""
    fields = dict(tok.split("=", 1) for tok in text.split() if "=" in tok)
    state = fields.get("JobState")
    if not state or state == "RUNNING":
        return None
    node = fields.get("NodeList")
    if state != "COMPLETING":
        return (error_class(state), state, node) if error_class(state) else None
    run_s, limit_s = _seconds(fields.get("RunTime")), _seconds(fields.get("TimeLimit"))
    if run_s is not None and limit_s is not None and run_s >= limit_s:
        return ("timeout", "TIMEOUT", node)
    return ("cancelled", "CANCELLED", node)


def _seconds(text: Optional[str]) -> Optional[int]:
    """SLURM's [D-]HH:MM:SS (or MM:SS) as seconds; None for UNLIMITED or anything else."""
    if not text or not text[0].isdigit():
        return None
    days, _, clock = text.rpartition("-")
    parts = [int(x) for x in clock.split(":") if x.isdigit()]
    if not parts:
        return None
    while len(parts) < 3:
        parts.insert(0, 0)
    return (int(days) if days else 0) * 86400 + parts[0] * 3600 + parts[1] * 60 + parts[2]


def _run(cmd: List[str], timeout_s: float) -> Optional[str]:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout if proc.returncode == 0 else None


def _sacct(ids: List[str], timeout_s: float) -> Optional[Dict[str, Dict[str, Optional[str]]]]:
    text = _run(["sacct", "-X", "-n", "-P", "-o", "JobID,State,NodeList,Reason", "-j", ",".join(ids)], timeout_s)
    if text is None:
        return None
    out: Dict[str, Dict[str, Optional[str]]] = {}
    for line in text.splitlines():
        parts = line.split("|")
        if len(parts) < 3:
            continue
        job, state, node = parts[0], parts[1].split()[0] if parts[1] else "", parts[2]
        entry = {"state": state, "node": None if node in ("", "None assigned") else node,
                 "reason": parts[3] if len(parts) > 3 else None}
        for jid in _expand_array(job):
            out[jid] = entry
    return out


def _scontrol(ids: List[str], timeout_s: float) -> Dict[str, Dict[str, Optional[str]]]:
    out: Dict[str, Dict[str, Optional[str]]] = {}
    for main in sorted({j.split("_")[0] for j in ids}):
        text = _run(["scontrol", "show", "job", "-o", main], timeout_s) or ""
        for line in text.splitlines():
            fields = dict(tok.split("=", 1) for tok in line.split() if "=" in tok)
            if "JobId" not in fields:
                continue
            entry = {"state": fields.get("JobState"), "reason": fields.get("Reason"),
                     "node": None if fields.get("NodeList") in (None, "(null)") else fields["NodeList"]}
            if fields.get("ArrayJobId") and fields.get("ArrayTaskId"):
                for jid in _expand_array(f"{fields['ArrayJobId']}_[{fields['ArrayTaskId']}]"):
                    out[jid] = entry
            else:
                out[fields["JobId"]] = entry
    return out


def _expand_array(job: str) -> List[str]:
    """'12_[0-2,5%2]' -> ['12_0', '12_1', '12_2', '12_5']; '12_3' and '12' stay as they are."""
    if "_[" not in job:
        return [job]
    main, spec = job.split("_[", 1)
    spec = spec.rstrip("]").split("%")[0]
    out = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        if lo.isdigit() and (not hi or hi.isdigit()):
            out += [f"{main}_{i}" for i in range(int(lo), int(hi or lo) + 1)]
    return out


# ---------------------------------------------------------------------------------------------- settling
# The submitting side (hydra_plugins/qbench_launcher/slurm_launcher.py), once a job has ended.
def settle(cell: Dict[str, Any], job_id: str, info: Optional[Dict[str, Any]], job: Any) -> str:
    """A job has ended: make sure its cell has the row it deserves. Returns the cell's status."""
    from qbench.store.jsonio import read_result, write_result

    _scrub_logs(job)
    result = read_result(cell["dir"]) or {}
    mine = (result.get("scheduler") or {}).get("job_id") == job_id
    if result.get("status") == "ok":  # an ok result stands, whichever job measured it
        return "ok"
    state = (info or {}).get("state")
    if info is None and job.paths.result_pickle.exists():
        state = "COMPLETED"  # forgotten by the scheduler (no accounting, past MinJobAge) after ending normally
    cls = error_class(state)  # None: the job ended cleanly; "lost" where nothing says what became of it
    failure = _job_failure(job)
    if cls is None and failure is None:  # the job ended cleanly: its row (or its skip) is the truth
        return result.get("status", "error") if result else "skipped"
    cls = cls or ("config" if failure and "ConfigError" in failure else "crash")
    if mine and (result.get("error") or {}).get("class") == cls:
        return "error"  # the job already wrote this row itself
    message = error_message(cls, job_id, state, (info or {}).get("node"))
    if failure:
        message += f": {failure}"
    row = _error_row_for(cell, cls, message, result if mine else None)
    row["scheduler"] = {**(result.get("scheduler") or {} if mine else {}), **_scheduler_seen(job_id, info)}
    write_result(cell["dir"], row)
    log.error("%s: error (%s) %s", cell["id"], cls, message)
    return "error"


def _error_row_for(cell: Dict[str, Any], cls: str, message: str, partial: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """The job's own row (what it measured before it was stopped) with the scheduler's verdict as its error,
    or a fresh error row where the job left nothing."""
    from qbench.store.rows import error_row

    row = dict(partial) if partial else error_row(cell["config"], cls, message, "scheduler", scheduler=job_info())
    row["overrides"] = row.get("overrides") or cell["overrides"]
    cell_error = (partial or {}).get("error")
    row["status"] = "error"
    row["error"] = {"class": cls, "type": cls, "message": message, "traceback": "",
                    "phase": (cell_error or {}).get("phase", "scheduler")}
    if cell_error:
        row["error"]["cell_error"] = cell_error  # what the cell process itself saw (e.g. killed by SIGTERM)
    return row


def _scheduler_seen(job_id: str, info: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    main, _, task = job_id.partition("_")
    return {"kind": "slurm", "job_id": job_id, "array_job_id": main if task else None,
            "array_task_id": int(task) if task.isdigit() else None,
            "node": (info or {}).get("node"), "state": (info or {}).get("state") or "unknown",
            "reason": (info or {}).get("reason")}


def _job_failure(job: Any) -> Optional[str]:
    """The last line of an exception the job raised outside the cell process (None if it raised none)."""
    from hydra.core.utils import JobReturn, JobStatus
    from submitit.core.utils import pickle_load

    path = job.paths.result_pickle
    if not path.exists():
        return None
    try:
        outcome, value = pickle_load(path)
    except Exception:
        return None
    if outcome == "error":
        return str(value).strip().splitlines()[-1] if str(value).strip() else "error"
    if isinstance(value, JobReturn) and value.status == JobStatus.FAILED:
        return f"{type(value._return_value).__name__}: {value._return_value}"
    return None


def _scrub_logs(job: Any) -> None:
    """Redact secret values of this environment from the job's logs (a traceback may quote one)."""
    from qbench.store.redaction import redact

    for path in (job.paths.stdout, job.paths.stderr):
        try:
            text = Path(path).read_text(errors="replace")
        except OSError:
            continue
        clean = redact(text)
        if clean != text:
            Path(path).write_text(clean)
