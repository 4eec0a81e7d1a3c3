"""``hydra/launcher=parallel`` (conf/hydra/launcher/parallel.yaml): several cells at once on one host, through
hydra-submitit-launcher's submitit_local executor, and stopped with the sweep.

submitit runs each job as three processes below the sweep: a controller (``python -m submitit.local._local``),
which is meant to outlive the session that submitted it; the job's task (``python -m submitit.core._submit``),
which runs the cell's Hydra job (qbench.run.cell_process.run_cell) and takes submitit's SIGTERM handler, one that ignores the
signal (on SLURM it precedes a pre-emption); and the task's cell process (qbench/run/cell.py). Left as they are, a
stop signal to the sweep, or its death, leaves every running job measuring on as an orphan. What this adds:

- in the sweep: a stop signal (SIGINT, SIGTERM, SIGHUP, raised as cell.Stopped) while the jobs run is passed on
  to every job's task, and the sweep waits until every process it started is gone, under the local launcher's
  grace for a cell to unwind (cell_process.STOP_GRACE_S, then SIGKILL); it then stops as under the local launcher: one
  line, the summary line, exit 128 + the signal's number;
- in each task: the stop signals raise cell.Stopped as they do in the sweep, so the task stops its cell process,
  waits for it and writes no row (the next start measures the cell again); and the task stops when its
  controller or the sweep dies, even by SIGKILL, so no job outlives the sweep.
"""
# No `from __future__ import annotations` here: Hydra loads plugin modules outside sys.modules, where a dataclass
# with string annotations cannot resolve them.

import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence

import psutil
from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn
from hydra_plugins.hydra_submitit_launcher.config import LocalQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher

log = logging.getLogger("qbench")

TASK_MODULE = "submitit.core._submit"  # a job's task process runs this module (submitit's LocalExecutor)
EXIT_MARGIN_S = 10.0  # after a task's own grace for its cell, the time it may take to exit
WATCH_S = 1.0  # a task checks this often whether the sweep has died (a zombie wakes no wait)
RESEND_S = 0.5  # a task still starting (its handlers not yet in place) is sent the signal again this often


@dataclass
class QbenchParallelConf(LocalQueueConf):
    _target_: str = "hydra_plugins.qbench_launcher.parallel_launcher.QbenchParallelLauncher"


# Hydra imports every module under hydra_plugins when it starts: this makes `qbench_parallel` a launcher config
ConfigStore.instance().store(group="hydra/launcher", name="qbench_parallel", node=QbenchParallelConf,
                             provider="qbench")


class QbenchParallelLauncher(LocalLauncher):
    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.sweep: Optional[tuple] = None  # (pid, start time) of the sweep, set by launch(), pickled into each job

    # ------------------------------------------------------------------------------------------ in the sweep
    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        me = psutil.Process()
        self.sweep = (me.pid, me.create_time())
        try:
            return super().launch(job_overrides, initial_job_idx)
        except KeyboardInterrupt as exc:  # Ctrl-C, SIGTERM, SIGHUP (cell.Stopped): the jobs stop with the sweep
            stop_descendants(int(getattr(exc, "signum", signal.SIGINT)))
            raise

    # ------------------------------------------------------------------------------------------ in the job
    def __call__(self, *args: Any, **kwargs: Any) -> JobReturn:
        from qbench.run.cell import Stopped, die_with_parent, install_stop_handlers

        install_stop_handlers()  # replaces submitit's handler, which ignores SIGTERM
        die_with_parent(os.getppid())  # the controller: SIGKILLed, it would leave this task running on
        if self.sweep is not None:
            die_with_process(*self.sweep)
        try:
            return super().__call__(*args, **kwargs)
        except Stopped as exc:
            # run_cell has stopped the cell process and waited for it; end by the same signal, as the cell does,
            # with no traceback in the job's log
            log.warning("stopped by %s; the cell runs again on the next start", signal.Signals(exc.signum).name)
            signal.signal(exc.signum, signal.SIG_DFL)
            os.kill(os.getpid(), exc.signum)
            raise


def stop_descendants(signum: int) -> None:
    """Pass ``signum`` to every job task below this process, and wait until every process below it is gone.

    Only the tasks are signalled: each stops its own cell process and waits for it (cell_process._stop_child, grace
    cell_process.STOP_GRACE_S), and a controller ends once its task has. A controller is not signalled: on SIGINT it kills
    its task after one second, cutting the cell's grace short. The signal is sent again every RESEND_S to tasks
    still alive, which reaches a task that started or installed its handlers after the first one (a task that has
    begun stopping ignores further stop signals). Further stop signals to the sweep are ignored meanwhile: the
    wait is bounded, and every process left at its end is killed."""
    from qbench.run.cell_process import STOP_GRACE_S

    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, signal.SIG_IGN)
    me = psutil.Process()
    seen: dict = {}  # pid -> Process: kept once seen, so a process reparented away (an orphaned cell) is waited for
    deadline = time.monotonic() + STOP_GRACE_S + EXIT_MARGIN_S
    while True:
        for proc in _descendants(me):
            seen.setdefault(proc.pid, proc)
        alive = [p for p in seen.values() if _running(p)]
        if not alive:
            return
        if time.monotonic() > deadline:
            break
        for proc in alive:
            if _is_task(proc):
                _send(proc, signum)
        psutil.wait_procs(alive, timeout=RESEND_S)  # reaps the controllers, this process's own children
    log.warning("%d process(es) of the sweep still alive after %.0f s; killing them", len(alive),
                STOP_GRACE_S + EXIT_MARGIN_S)
    for proc in alive:
        _send(proc, signal.SIGKILL)
    psutil.wait_procs(alive, timeout=5.0)


def die_with_process(pid: int, create_time: float) -> None:
    """SIGTERM to this process when the process (``pid``, started at ``create_time``) ends, even by SIGKILL, or
    at once if it has already ended. The sweep is this task's grandparent, beyond the reach of the kernel's
    PR_SET_PDEATHSIG (which watches the parent): a thread waits on it (psutil: a pidfd on Linux). A process that
    has ended but is not reaped yet (a zombie, until its parent waits for it) counts as ended."""
    try:
        sweep = psutil.Process(pid)
        gone = sweep.create_time() != create_time  # the pid now names another process
    except psutil.NoSuchProcess:
        gone = True
    if gone:
        os.kill(os.getpid(), signal.SIGTERM)
        return

    def watch() -> None:
        while _running(sweep):
            try:
                sweep.wait(timeout=WATCH_S)
            except psutil.TimeoutExpired:  # alive, or a zombie, which wait() takes for alive
                continue
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="qbench-sweep-watch", daemon=True).start()


def _descendants(proc: Any) -> List[Any]:
    try:
        return proc.children(recursive=True)
    except psutil.Error:
        return []


def _running(proc: Any) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _is_task(proc: Any) -> bool:
    try:
        return TASK_MODULE in proc.cmdline()
    except psutil.Error:
        return False


def _send(proc: Any, signum: int) -> None:
    try:
        proc.send_signal(signum)
    except psutil.Error:
        pass
