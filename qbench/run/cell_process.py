"""One cell seen from the sweep: the Hydra job that skips it when done, takes its lock and slot, starts its fresh
process (qbench/run/cell.py; forked from run.preload's server or spawned), waits for it under run.timeout_min and
the stop signals, reads what its exit means, and writes the error row when the cell wrote none.

A Hydra job does not measure in its own process: GPU memory and allocator state cannot leak between cells whatever
the launcher, and crashes, OOM kills and timeouts become data."""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional

from qbench.measure import gpu_state
from qbench.run.cell import EXIT_UNWRITTEN, STOP_SIGNALS
from qbench.run.slots import cell_lock, take_devices
from qbench.store.layout import SPEC_FILE, attempt_file, cell_id
from qbench.store.layout import cell_dir as cell_dir_of

log = logging.getLogger("qbench")


def _stopped_by_scheduler(rc: int) -> Optional[tuple]:
    """Inside a SLURM job, a cell killed by a signal was most likely stopped by SLURM itself: ask it why, so the
    row says cancelled / timeout / preempted rather than crash. ("requeued", None) when SLURM will run the job
    again: then no row is written and the requeued job measures the cell."""
    from qbench.run import slurm

    if not slurm.in_job() or rc not in (-signal.SIGTERM, -signal.SIGKILL):
        return None
    job = slurm.job_id_from_env() or ""
    why = slurm.why_stopped(job)
    if why is None:
        return None
    cls, state, node = why
    if state.startswith("REQUEUE"):
        return ("requeued", None)
    return (cls, slurm.error_message(cls, job, state, node))


STOP_GRACE_S = 30.0  # how long a stopped cell may take to unwind (kill its own subprocesses) before SIGKILL


def _stop_child(proc: subprocess.Popen, signum: int) -> None:
    """Pass the sweep's stop signal on to the cell process and wait until it is gone: the sweep never exits
    while its cell measures on. Further stop signals meanwhile are ignored (the wait is bounded)."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signum)
    try:
        proc.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _wait_child(proc: subprocess.Popen, timeout_min: float) -> Optional[tuple]:
    """Wait for the cell process under its time limit; (error class, message) if it did not end cleanly."""
    try:
        rc = proc.wait(timeout=float(timeout_min) * 60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return ("timeout", f"cell ran past run.timeout_min={timeout_min} min and was stopped")
    except KeyboardInterrupt as exc:  # Ctrl-C, SIGTERM, SIGHUP (cell.Stopped): the cell stops with the sweep
        _stop_child(proc, getattr(exc, "signum", signal.SIGINT))
        raise
    if rc == 0:
        return None
    stopped = _stopped_by_scheduler(rc)
    if stopped is not None:
        return stopped
    return _child_fault(rc)


def _child_fault(rc: int) -> tuple:
    """(error class, message) of a cell process that ended with ``rc`` without writing its result."""
    if rc == -signal.SIGKILL:
        return ("killed", "cell process killed by SIGKILL (often the kernel's OOM killer)")
    if rc in [-s for s in STOP_SIGNALS]:  # someone stopped the cell process itself, not the sweep
        return ("cancelled", f"cell process stopped by {signal.Signals(-rc).name}")
    if rc < 0:
        return ("crash", f"cell process died of {signal.Signals(-rc).name}")
    if rc == EXIT_UNWRITTEN:
        return ("filesystem", "the cell finished but its result.json could not be written (the cause is in cell.log)")
    return ("crash", f"cell process exited with code {rc}")


def _child_env(want_gpu: bool, device: str, gpus: List[str]) -> Dict[str, str]:
    env = dict(os.environ)
    env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"  # indices mean the same to NVML, nvidia-smi and torch
    if want_gpu:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
    elif device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # a CPU cell must not initialise CUDA on a GPU host
    return env


def _cfg_dict(cfg: Any) -> Dict[str, Any]:
    from omegaconf import OmegaConf

    # hydra.* is not resolved: its help template calls a resolver only the qbench command registers
    return {k: OmegaConf.to_container(cfg[k], resolve=True) if hasattr(cfg[k], "keys") else cfg[k]
            for k in cfg if k != "hydra"}


def _task_overrides() -> List[str]:
    from hydra.core.hydra_config import HydraConfig

    try:
        return list(HydraConfig.get().overrides.task)
    except ValueError:
        return []


HYDRA_SUBDIR = ".hydra"


def _write_hydra_files(cfg: Any) -> None:
    """Hydra's record of the job, <cell>/.hydra/{config,hydra,overrides}.yaml, as Hydra writes it but with every
    secret value redacted: conf/config.yaml sets hydra.output_subdir to null so that Hydra itself writes none
    (an override such as method.description=$HF_TOKEN would be kept there in clear)."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from qbench.store.jsonio import write_text_atomic
    from qbench.store.redaction import redact

    hydra_cfg = HydraConfig.instance().cfg
    output_dir = OmegaConf.select(hydra_cfg, "hydra.runtime.output_dir", default=None) if hydra_cfg else None
    if not output_dir:  # run_cell called outside a Hydra job (tests, scripts): there is no job to record
        return
    out = Path(str(output_dir)) / HYDRA_SUBDIR
    for name, node in (("config.yaml", cfg), ("hydra.yaml", hydra_cfg), ("overrides.yaml", hydra_cfg.hydra.overrides.task)):
        plain = redact(OmegaConf.to_container(node, resolve=False))
        write_text_atomic(out / name, OmegaConf.to_yaml(OmegaConf.create(plain)))


def _set_aside_previous(cid: str, cell_dir: Path, ident: Dict[str, Any]) -> None:
    """A stored result about to be measured over moves to result.prev.json; the log line says why."""
    from qbench.store.identity import changed_settings, describe_changes
    from qbench.store.jsonio import read_result
    from qbench.store.layout import PREVIOUS_RESULT_FILE
    from qbench.store.rerun import set_aside_previous

    previous = read_result(cell_dir)
    if previous is None:
        return
    changes = changed_settings(previous, ident)
    why = f"its settings changed ({describe_changes(changes)})" if changes else \
        f"rerunning a stored {previous.get('status')} result"
    set_aside_previous(cell_dir)
    log.warning("%s: %s: measuring again; the stored result is kept as %s", cid, why, PREVIOUS_RESULT_FILE)


def run_cell(cfg: Any) -> str:
    """Run one cell in a fresh child process. Returns "ok", "error" or "skipped:<status>".

    A fault of the sweep's own process after preflight (the disk fills up, runs/<sweep> turns out to be a file,
    a name the filesystem refuses) ends this cell, not the sweep: one line on the console, the traceback in the
    log file, and an error row wherever the disk still takes one."""
    try:
        return _run_cell(cfg)
    except Exception as exc:
        from qbench.run.cell import classify
        from qbench.store.rows import error_message

        cid = cell_id(cfg)
        cls = classify(exc)
        message = f"{type(exc).__name__}: {error_message(exc)}"
        log.error("%s: error (%s) %s", cid, cls, message)
        traceback_to_log_files(cid)
        _write_error_row(cell_dir_of(cfg), _cfg_dict(cfg), (cls, message), None)
        return "error"


def traceback_to_log_files(cid: str) -> None:
    """The traceback of the exception being handled into the log files (cli.log), not onto the console."""
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, f"{cid}: traceback", None, sys.exc_info())
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def _write_error_row(cell_dir: Path, cfg_dict: Dict[str, Any], error: tuple, t0: Optional[float]) -> Optional[dict]:
    """The error row of a cell that wrote none itself; None, and one line, where the disk refuses it too."""
    from qbench.run import slurm
    from qbench.store.jsonio import write_result
    from qbench.store.rows import error_row

    row = error_row(cfg_dict, error[0], error[1], "cell", scheduler=slurm.job_info())
    row["wall_time_s"] = time.perf_counter() - t0 if t0 is not None else None
    row["overrides"] = _task_overrides()
    try:
        write_result(cell_dir, row)
    except OSError as exc:
        log.error("%s: the error row could not be written either: %s", cell_dir.name, exc)
        return None
    return row


def _spawn_cell(spec: Dict[str, Any], spec_path: Path, env: Dict[str, str], lock_fds: List[int], preload: bool) -> Any:
    """Start the cell process: forked from run.preload's server (qbench/run/preload.py), or a plain spawn of
    python -m qbench.run.cell. Either way the cell holds the slot and cell locks itself (flock belongs to the
    open file, shared by both): they stay held until it is gone, whatever becomes of this process meanwhile."""
    from qbench.run import preload as preloaded
    from qbench.store.jsonio import write_json_atomic

    # the server's one-time start is not this cell's: its clock starts after it
    if preload and preloaded.context() is not None:
        spec["preload_server_s"] = preloaded.server_s()
        spec["spawned_at_unix"] = time.time()
        write_json_atomic(spec_path, spec)
        try:
            return preloaded.CellProcess(str(spec_path), env, lock_fds)
        except (OSError, EOFError) as exc:  # the server is gone (killed by a signal it cannot ignore)
            preloaded.give_up(f"{type(exc).__name__}: {exc}")
            spec.pop("preload_server_s")
            spec["spawned_at_unix"] = time.time()
    write_json_atomic(spec_path, spec)
    return subprocess.Popen([sys.executable, "-m", "qbench.run.cell", str(spec_path)],
                            env=env, start_new_session=False, pass_fds=lock_fds)


def _run_cell(cfg: Any) -> str:
    from qbench.store.identity import identity
    from qbench.store.jsonio import read_result
    from qbench.store.rerun import should_skip, skip_hint

    cid = cell_id(cfg)
    cell_dir = cell_dir_of(cfg)
    cfg_dict = _cfg_dict(cfg)
    ident = identity(cfg_dict)
    skipped = should_skip(cell_dir, cfg.run.force, cfg.run.rerun_failed, ident)
    if skipped:
        log.info("%s: %s", cid, skip_hint(cell_dir, skipped))
        return f"skipped:{skipped}"
    _set_aside_previous(cid, cell_dir, ident)
    _write_hydra_files(cfg)
    device = cfg.bench.device
    want_gpu = device == "cuda" or (device == "auto" and bool(gpu_state.visible_gpus()))
    before = read_result(cell_dir)
    t0 = time.perf_counter()
    with cell_lock(cell_dir) as cell_lock_file:
        locks, gpus = take_devices(cfg, want_gpu)
        try:
            # Again, holding the cell: another process may have finished it while this one waited
            if read_result(cell_dir) != before and should_skip(cell_dir, False, False, ident):
                log.info("%s: skipped, finished by another process while this one waited", cid)
                return f"skipped:{read_result(cell_dir)['status']}"
            spec = {
                "attempt_id": uuid.uuid4().hex,  # ties the child's result to this attempt
                "parent_pid": os.getpid(),  # the cell process stops when this one dies (cell.die_with_parent)
                "config": cfg_dict,
                "overrides": _task_overrides(),
                "command": os.environ.get("QBENCH_COMMAND", ""),
                "device_keys": gpu_state.device_keys(gpus),  # the cell registers as measuring on these (DeviceWatch)
                "spawned_at_unix": time.time(),  # the cell's time budget starts here (timings.budget.process_start_s)
            }
            spec_path = attempt_file(cell_dir, SPEC_FILE)
            log.info("%s: measuring in a fresh process%s", cid, f" on GPU {','.join(gpus)}" if gpus else " on CPU")
            proc = _spawn_cell(spec, spec_path, _child_env(want_gpu, device, gpus),
                               [f.fileno() for f in [cell_lock_file, *locks]], bool(cfg.run.preload))
            t0 = time.perf_counter()
            error = _wait_child(proc, cfg.run.timeout_min)
        finally:
            for f in locks:
                f.close()
        if error is not None and error[0] == "requeued":
            log.warning("%s: SLURM requeued this job; the cell runs again when it restarts", cid)
            return "requeued"

        result = read_result(cell_dir)
        fresh = result is not None and result.get("attempt_id") == spec["attempt_id"]
        if error is not None and not fresh:
            result = _write_error_row(cell_dir, cfg_dict, error, t0) or {"error": {"class": error[0],
                                                                                     "message": error[1]}}
    status = (result or {}).get("status", "error")
    if status == "ok":
        log.info("%s: ok in %.1f s", cid, time.perf_counter() - t0)
    else:
        err = (result or {}).get("error") or {}
        log.error("%s: error (%s) %s", cid, err.get("class"), err.get("message"))
    return status
