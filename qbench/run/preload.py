"""Preloaded cell processes (run.preload): each cell still runs in a fresh process, but the heavy imports
(torch, transformers, lm-eval) are paid once per sweep, by multiprocessing's forkserver, instead of once per
cell (docs/time_budget.md#preloaded-cell-processes).

The server process imports the libraries and never touches CUDA; each cell is forked from it, applies its own
environment (CUDA_VISIBLE_DEVICES, the allocator setting, thread counts) before its first CUDA use, and takes
the sweep's cell and slot locks as duplicated file descriptors, so that the kernel frees them only when the
cell itself is gone.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import subprocess
import time
from multiprocessing import forkserver
from multiprocessing.reduction import DupFd
from typing import Any, Dict, List, Optional

log = logging.getLogger("qbench.run.preload")

# What a cell imports before anything else (cell._import_libraries): the server imports these once. torch
# imported without use initialises neither CUDA nor its thread pools (the forked cell sizes those itself);
# _server_cuda keeps the libraries' own is_available() calls from marking every fork of the server bad.
PRELOAD = ["qbench.run._server_signals", "qbench.run._server_cuda", "qbench.run.cell", "torch", "transformers",
           "lm_eval.evaluator", "lm_eval.models.huggingface"]

_server: Dict[str, Any] = {}  # the sweep's one server: its context and the seconds it took to start


def _probe(ready: Any = None) -> None:
    """The first fork: it runs once the server has imported PRELOAD, which times the server's start (``ready``: a
    shared double it sets to the wall clock), and says whether the preload touched CUDA (a context does not survive
    fork: every cell would fail on the GPU). A context is not the only way: a device-count call through the CUDA
    runtime creates none, yet marks every later fork bad, which the child sees as torch.cuda._is_in_bad_fork()."""
    import sys
    import time as clock

    import torch

    if ready is not None:
        ready.value = clock.time()
    sys.exit(CUDA_IN_SERVER if torch.cuda.is_initialized() or torch.cuda._is_in_bad_fork() else 0)


CUDA_IN_SERVER = 3  # _probe's exit status when the server's preload initialised CUDA


def start() -> None:
    """Start the server without waiting for it: the sweep calls this as soon as its first cell's config says
    run.preload (cli.preflight), so the server imports PRELOAD while preflight checks the cells; context() then
    forks the probe, which waits only for what is left. Nothing is forked here: a sweep whose preflight fails
    leaves a server that exits quietly with it. Idempotent."""
    if "started_at" in _server:
        return
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    _server.update(pending=ctx, started_at=time.time())
    try:
        forkserver.ensure_running()  # spawns the server, which imports PRELOAD before it serves; does not wait
    except OSError as exc:
        _server["failure"] = f"{type(exc).__name__}: {exc}"


def context() -> Any:
    """The forkserver context, started on first use (or by start()) and timed once per sweep (logged, and in every
    preloaded cell's result as preload.server_s: from its start until its imports were done); None, with a
    warning, where the server cannot serve (the sweep then spawns plainly)."""
    if "ctx" not in _server:
        start()
        t0 = time.perf_counter()
        exitcode = None
        ctx = _server["pending"]
        ready = ctx.Value("d", 0.0, lock=False)
        if "failure" not in _server:
            probe = ctx.Process(target=_probe, args=(ready,), name="qbench-preload-probe")
            try:
                probe.start()  # returns once the server, done importing, has forked it
                probe.join()
                exitcode = probe.exitcode
            except (OSError, EOFError) as exc:  # the server died while starting (a signal, a failed import)
                _server["failure"] = f"{type(exc).__name__}: {exc}"
        waited = time.perf_counter() - t0
        _server["server_s"] = (ready.value or time.time()) - _server["started_at"]
        _server["ctx"] = ctx if exitcode == 0 else None
        if exitcode != 0:
            why = ("its preload initialised CUDA" if exitcode == CUDA_IN_SERVER else
                   f"exit {exitcode}" if exitcode is not None else f"it did not start: {_server.get('failure')}")
            log.warning("run.preload: the fork server cannot serve cells (%s); cells spawn plainly", why)
            return None
        log.info("preloaded %s in a fork server in %.1f s, of which the sweep waited %.1f s (once per sweep; "
                 "run.preload=false spawns plainly)", ", ".join(m for m in PRELOAD if not m.startswith("qbench.run._server")),
                 _server["server_s"], waited)
    return _server["ctx"]


def give_up(why: str) -> None:
    """The server failed mid-sweep (it could not fork a cell): the sweep's later cells spawn plainly."""
    _server["ctx"] = None
    log.warning("run.preload: the fork server could not start a cell (%s); this and later cells spawn plainly", why)


def server_s() -> Optional[float]:
    """Seconds the sweep's server took to import PRELOAD; None before it started."""
    return _server.get("server_s")


class CellProcess:
    """A forked cell process with the part of subprocess.Popen's interface the sweep uses (wait, send_signal,
    kill, returncode): cell_process._wait_child and cell_process._stop_child treat both alike. returncode is negative for a cell
    ended by a signal, as with Popen."""

    def __init__(self, spec_path: str, env: Dict[str, str], fds: List[int]) -> None:
        ctx = context()
        # a plain spawn inherits an ignored SIGHUP (nohup) and nothing else of the sweep's dispositions
        hup_ignored = signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
        # DupFd, pickled while the process starts, sends each descriptor to the server, which hands it to the
        # child: the cell holds the same open files (and so the same flocks) as the sweep does
        self.proc = ctx.Process(target=_cell_entry, args=(spec_path, env, [DupFd(fd) for fd in fds], hup_ignored),
                                name="qbench-cell")
        self.proc.start()
        self.pid = self.proc.pid

    @property
    def returncode(self) -> Optional[int]:
        return self.proc.exitcode

    def wait(self, timeout: Optional[float] = None) -> int:
        self.proc.join(timeout)
        if self.proc.exitcode is None:
            raise subprocess.TimeoutExpired("qbench-cell", timeout or 0.0)
        return self.proc.exitcode

    def send_signal(self, signum: int) -> None:
        import os

        if self.proc.exitcode is None:
            os.kill(self.proc.pid, signum)

    def kill(self) -> None:
        self.proc.kill()


def _cell_entry(spec_path: str, env: Dict[str, str], fds: List[Any], hup_ignored: bool) -> None:
    """The forked cell: signal dispositions, descriptors and environment first, then the cell's main as a plain
    spawn runs it."""
    import sys

    from qbench.run import _server_signals, cell

    _server_signals.as_plain_spawn(hup_ignored)

    held = [fd.detach() for fd in fds]  # the locks: kept open until the process ends
    sys.exit(cell.forked_main(spec_path, env, held))
