"""Who may measure now: one slot per GPU (or one CPU slot) per host, and one lock per cell, both flock-based so
the kernel frees them when their holder dies; under SLURM the job's own allocation is the slot."""
from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Any, Iterator, Optional

from qbench.errors import ConfigError
from qbench.measure import gpu_state
from qbench.store.layout import LOCK_FILE, attempt_file

log = logging.getLogger("qbench")


def try_lock(path: Path):
    import fcntl

    f = gpu_state.open_lock_file(path)
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        return f
    except BlockingIOError:
        f.close()
        return None


def acquire_slot(num_gpus: int, want_gpu: bool, slot_dir: Optional[Path] = None, poll_s: float = 1.0):
    """Block until ``num_gpus`` GPUs of this host are free, lock them, and return (lock files, gpu ids).

    Locks are per host and physical GPU (its UUID), in one folder per host whatever the working directory
    or cache (gpu_state.lock_dir), and flock is released by the kernel when the holder dies: cells of any
    sweep on this host take GPUs in turn and never share one. Without GPUs, cells take one CPU slot in turn,
    which keeps CPU timings undisturbed. ``slot_dir`` replaces the folder (tests).
    """
    slot_dir = Path(slot_dir) if slot_dir is not None else gpu_state.lock_dir()
    gpus = gpu_state.visible_gpus() if want_gpu else []
    if want_gpu and len(gpus) < num_gpus:
        raise ConfigError(f"model.num_gpus: {num_gpus} GPUs asked for, {len(gpus)} visible ({','.join(gpus) or 'none'})")
    groups = [gpus[i : i + num_gpus] for i in range(0, len(gpus) - num_gpus + 1, num_gpus)] if gpus else [[]]
    waited = False
    while True:
        for group in groups:
            names = gpu_state.device_keys(group)
            held = []
            for name in names:
                f = try_lock(slot_dir / f"{name}.lock")
                if f is None:
                    break
                held.append(f)
            if len(held) == len(names):
                return held, group
            for f in held:
                f.close()
        if not waited:
            log.info("waiting for a free %s slot (locks in %s)", "GPU" if gpus else "CPU", slot_dir)
            waited = True
        time.sleep(poll_s)


@contextlib.contextmanager
def cell_lock(cell_dir: Path) -> Iterator[Any]:
    """Hold the cell while it is measured. Another process measuring the same cell (a second sweep over the
    same runs/, or a SLURM job an earlier, killed submission left running) makes this one wait, and the
    caller then finds the cell done instead of measuring it twice. flock: freed by the kernel when the last
    process holding it dies, even by SIGKILL. Yields the lock file, which the cell process inherits."""
    path = attempt_file(cell_dir, LOCK_FILE)
    f = try_lock(path)
    if f is None:
        import fcntl

        log.info("%s: another process is measuring this cell; waiting for it", cell_dir.name)
        f = open(path, "a")  # noqa: SIM115 - held across the yield below and closed in its finally
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
    try:
        yield f
    finally:
        f.close()


def take_devices(cfg: Any, want_gpu: bool) -> tuple:
    """(locks, gpu ids) the cell may use. Under SLURM the job's allocation is the slot: SLURM has given this
    job its own CPUs and GPUs, and per-host lock files would make cells of one node wait for each other (and,
    where SLURM renumbers each job's GPUs from 0, for GPUs they do not share)."""
    from qbench.run import slurm

    num_gpus = int(cfg.model.num_gpus)
    if not slurm.owns_allocation():
        return acquire_slot(num_gpus, want_gpu)
    gpus = gpu_state.visible_gpus() if want_gpu else []
    if want_gpu and len(gpus) < num_gpus:
        raise ConfigError(f"model.num_gpus: {num_gpus} GPUs asked for, the SLURM job was given {len(gpus)} "
                          "(set hydra.launcher.gpus_per_task)")
    return [], gpus[:num_gpus] if want_gpu else []
