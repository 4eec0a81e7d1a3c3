"""Imported first by run.preload's fork server: the server ignores the signals a scheduler sends to every process
of a job (SIGTERM, SIGHUP, and SLURM's SIGUSR2 warning before the time limit).

A scheduler stops a job by signalling every process in it: SLURM's scancel and time limit, systemd's
control-group kill, Kubernetes. Had the server died of that SIGTERM with the cells, the sweep could not read how
its cell ended (multiprocessing reports 255 for a cell whose server is gone) and would record a crash where the
cell was cancelled or timed out; SIGUSR2, which submitit has SLURM send signal_delay_s before the time limit,
would end the server at its default action. Ignoring them, the server lives until the sweep is gone (it ends when the
sweep's end of its pipe closes) or a SIGKILL; each cell forked from it puts the dispositions back first
(as_plain_spawn), so the cell is stopped exactly as a plain spawn is.
"""

from __future__ import annotations

import signal

SERVER_IGNORES = (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR2)  # SIGINT: multiprocessing's forkserver ignores it

for _sig in SERVER_IGNORES:
    signal.signal(_sig, signal.SIG_IGN)


def as_plain_spawn(hup_ignored: bool) -> None:
    """In a forked cell: the dispositions a plain spawn of the sweep would start with (default, except an
    ignored SIGHUP the sweep inherited, which exec keeps ignored). The cell sets its own handlers after this."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGUSR2, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_IGN if hup_ignored else signal.SIG_DFL)
