"""The ``qbench`` command: compose the config with Hydra, check it, and run cells.

    qbench model=tiny method=bf16            one cell
    qbench -m experiment=demo                a sweep (each cell a Hydra job)

Before Hydra starts, :func:`preflight` composes every cell of the sweep and validates it, so bad input (an
unknown method, a mistyped key, a negative batch size, a missing model path) stops the whole sweep with one
line naming the culprit, before any model is loaded and before anything is written under runs/.

A Hydra job does not measure in its own process: it starts a fresh child process (qbench/cell.py) per cell,
waits for it under the cell's time limit, and writes an error row if the child dies without one. This keeps
GPU memory and allocator state from leaking between cells whatever the launcher, and turns crashes, OOM kills
and timeouts into data.
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

from qbench.config import ConfigError, cell_id, register_configs, validate
from qbench.preflight import check_cell
from qbench.measure import gpu_state

log = logging.getLogger("qbench")

_REPO_CONF = Path(__file__).resolve().parent.parent / "conf"


def conf_dir() -> str:
    """conf/ of a source checkout, else the copy packaged as qbench.conf in a wheel."""
    if _REPO_CONF.is_dir():
        return str(_REPO_CONF)
    return str(Path(__file__).resolve().parent / "conf")


# ----------------------------------------------------------------------------------------------- preflight
def _compose(overrides: List[str]):
    from hydra import compose

    return compose(config_name="config", overrides=overrides, return_hydra_config=True)


def _one_line(exc: BaseException) -> str:
    """Hydra and OmegaConf errors span lines and chain causes: keep the outer line and the innermost cause's,
    which names the key (e.g. "Key 'batchsizes' not in 'BenchConfig'")."""
    text = str(exc).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()] or [type(exc).__name__]
    first = lines[0]
    if "Available options in" in text:  # an unknown group option: list the known ones (without 'schema')
        listed = text.split("Available options in", 1)[1].split("Config search path", 1)[0]
        opts = [o for o in listed.split()[1:] if o != "schema"]
        first = f"{first} (known: {', '.join(opts)})"
    inner = exc
    while inner.__cause__ is not None or inner.__context__ is not None:
        inner = inner.__cause__ or inner.__context__
    mark = getattr(inner, "problem_mark", None) or getattr(inner, "context_mark", None)
    if mark is not None:  # malformed YAML: file, line and what the parser choked on
        return f"malformed YAML: {mark.name}, line {mark.line + 1}: {getattr(inner, 'problem', None) or inner}"
    if inner is not exc:
        inner_lines = [ln.strip() for ln in str(inner).splitlines() if ln.strip()]
        full_key = next((ln.split(":", 1)[1].strip() for ln in inner_lines if ln.startswith("full_key:")), "")
        if inner_lines and inner_lines[0] not in first:
            first = f"{first.rstrip('.')}: {inner_lines[0]}" + (f" (key {full_key})" if full_key else "")
    elif "full_key:" in text:
        first += " (key " + text.split("full_key:", 1)[1].splitlines()[0].strip() + ")"
    return first


def sweep_overrides(argv_overrides: List[str], multirun: bool) -> List[List[str]]:
    """Expand the command line and the experiment's ``hydra.sweeper.params`` into one override list per cell,
    in the same way Hydra's basic sweeper does (cartesian product; the command line wins over the config)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    if not multirun:
        return [argv_overrides]
    cfg = _compose([o for o in argv_overrides if not parser.parse_override(o).is_sweep_override()])
    params: Dict[str, Any] = {}
    sweeper_params = cfg.hydra.sweeper.get("params") or {}
    for key, value in sweeper_params.items():
        params[key] = parser.parse_override(f"{key}={value}")
    for text in argv_overrides:
        ov = parser.parse_override(text)
        params[ov.get_key_element()] = ov
    axes = []
    for key, ov in params.items():
        if ov.is_sweep_override():
            axes.append([f"{key}={v}" for v in ov.sweep_string_iterator()])
        else:
            axes.append([f"{key}={ov.get_value_element_as_str()}"])
    return [list(combo) for combo in itertools.product(*axes)]


def preflight(argv: List[str]) -> int:
    """Compose and validate every cell the command would run. Returns the number of cells."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from qbench.store import check_writable

    multirun = any(a in ("-m", "--multirun") for a in argv)
    overrides = [a for a in argv if not a.startswith("-")]
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
            cells = sweep_overrides(overrides, multirun)
            seen: Dict[str, List[str]] = {}
            for cell_overrides in cells:
                cfg = _compose(cell_overrides)
                validate(cfg)
                check_cell(cfg)
                cid = cell_id(cfg)
                if cid in seen:
                    raise ConfigError(
                        f"two cells of this sweep share the id '{cid}' ({' '.join(seen[cid])} / {' '.join(cell_overrides)}): "
                        "give them different model.name or method.name"
                    )
                seen[cid] = cell_overrides
            check_writable(Path(cfg.run.runs_dir))
            _check_launcher(cfg)
    except ConfigError:
        raise
    except Exception as exc:  # Hydra / OmegaConf / YAML errors: one line naming the culprit
        raise ConfigError(_one_line(exc)) from exc
    finally:
        GlobalHydra.instance().clear()
    return len(cells)


def _check_launcher(cfg: Any) -> None:
    """A SLURM sweep started where there is no SLURM would fail only after submitting: say so up front."""
    import shutil

    target = str(cfg.hydra.launcher.get("_target_", ""))
    if target.endswith("SlurmLauncher") and shutil.which("sbatch") is None:
        raise ConfigError("hydra/launcher=slurm: sbatch is not on PATH (start the sweep on a SLURM login node)")


# ----------------------------------------------------------------------------------------------- GPU slots
def _try_lock(path: Path):
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        return f
    except BlockingIOError:
        f.close()
        return None


def acquire_slot(num_gpus: int, want_gpu: bool, slot_dir: Path, poll_s: float = 1.0):
    """Block until ``num_gpus`` GPUs of this host are free, lock them, and return (lock files, gpu ids).

    Locks are per host and physical GPU (flock: released by the kernel when the holder dies), so cells started
    at once by a parallel launcher take GPUs in turn and never share one. Without GPUs, cells take one CPU
    slot in turn, which keeps CPU timings undisturbed.
    """
    host = socket.gethostname()
    gpus = gpu_state.visible_gpus() if want_gpu else []
    if want_gpu and len(gpus) < num_gpus:
        raise ConfigError(f"model.num_gpus: {num_gpus} GPUs asked for, {len(gpus)} visible ({','.join(gpus) or 'none'})")
    groups = [gpus[i : i + num_gpus] for i in range(0, len(gpus) - num_gpus + 1, num_gpus)] if gpus else [[]]
    waited = False
    while True:
        for group in groups:
            names = [f"{host}-gpu{g}" for g in group] or [f"{host}-cpu"]
            held = []
            for name in names:
                f = _try_lock(slot_dir / f"{name}.lock")
                if f is None:
                    break
                held.append(f)
            if len(held) == len(names):
                return held, group
            for f in held:
                f.close()
        if not waited:
            log.info("waiting for a free %s slot", "GPU" if gpus else "CPU")
            waited = True
        time.sleep(poll_s)


# ----------------------------------------------------------------------------------------------- one cell
def _error_row(cfg_dict: Dict[str, Any], error_class: str, message: str, phase: str) -> Dict[str, Any]:
    from qbench import slurm
    from qbench.store import SCHEMA_VERSION, now_iso

    return {
        "schema_version": SCHEMA_VERSION,
        "status": "error",
        "sweep": cfg_dict["run"]["sweep"],
        "cell": f"{cfg_dict['model']['name']}__{cfg_dict['method']['name']}",
        "model": cfg_dict["model"]["name"],
        "method": cfg_dict["method"]["name"],
        "method_kind": cfg_dict["method"]["kind"],
        "config": cfg_dict,
        "finished_at": now_iso(),
        "scheduler": slurm.job_info(),
        "metrics": {},
        "warnings": [],
        "error": {"class": error_class, "type": error_class, "message": message, "traceback": "", "phase": phase},
    }


@contextlib.contextmanager
def cell_lock(cell_dir: Path) -> Iterator[None]:
    """Hold the cell while it is measured. Another process measuring the same cell (a second sweep over the
    same runs/, or a SLURM job an earlier, killed submission left running) makes this one wait, and the
    caller then finds the cell done instead of measuring it twice. flock: freed by the kernel if the holder
    dies, even by SIGKILL."""
    path = cell_dir / ".attempt" / "lock"
    f = _try_lock(path)
    if f is None:
        import fcntl

        log.info("%s: another process is measuring this cell; waiting for it", cell_dir.name)
        f = open(path, "a")
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
    try:
        yield
    finally:
        f.close()


def _take_devices(cfg: Any, want_gpu: bool) -> tuple:
    """(locks, gpu ids) the cell may use. Under SLURM the job's allocation is the slot: SLURM has given this
    job its own CPUs and GPUs, and per-host lock files would make cells of one node wait for each other (and,
    where SLURM renumbers each job's GPUs from 0, for GPUs they do not share)."""
    from qbench import slurm

    num_gpus = int(cfg.model.num_gpus)
    if not slurm.owns_allocation():
        return acquire_slot(num_gpus, want_gpu, Path(cfg.run.cache_dir).expanduser() / "slots")
    gpus = gpu_state.visible_gpus() if want_gpu else []
    if want_gpu and len(gpus) < num_gpus:
        raise ConfigError(f"model.num_gpus: {num_gpus} GPUs asked for, the SLURM job was given {len(gpus)} "
                          "(set hydra.launcher.gpus_per_task)")
    return [], gpus[:num_gpus] if want_gpu else []


def _stopped_by_scheduler(rc: int) -> Optional[tuple]:
    """Inside a SLURM job, a cell killed by a signal was most likely stopped by SLURM itself: ask it why, so the
    row says cancelled / timeout / preempted rather than crash. ("requeued", None) when SLURM will run the job
    again: then no row is written and the requeued job measures the cell."""
    from qbench import slurm

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


def _wait_child(proc: subprocess.Popen, timeout_min: float) -> Optional[tuple]:
    """Wait for the cell process under its time limit; (error class, message) if it did not end cleanly."""
    try:
        rc = proc.wait(timeout=float(timeout_min) * 60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return ("timeout", f"cell ran past run.timeout_min={timeout_min} min and was stopped")
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise
    if rc == 0:
        return None
    stopped = _stopped_by_scheduler(rc)
    if stopped is not None:
        return stopped
    if rc == -signal.SIGKILL:
        return ("killed", "cell process killed by SIGKILL (often the kernel's OOM killer)")
    return ("crash", f"cell process exited with code {rc}")


def _child_env(want_gpu: bool, device: str, gpus: List[str]) -> Dict[str, str]:
    env = dict(os.environ)
    env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"  # indices mean the same to NVML, nvidia-smi and torch
    if want_gpu:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
    elif device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # a CPU cell must not initialise CUDA on a GPU host
    return env


def run_cell(cfg: Any) -> str:
    """Run one cell in a fresh child process. Returns "ok", "error" or "skipped:<status>"."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from qbench.store import read_result, should_skip, write_json_atomic, write_result

    cid = cell_id(cfg)
    cell_dir = Path(cfg.run.runs_dir) / cfg.run.sweep / cid
    skipped = should_skip(cell_dir, cfg.run.force, cfg.run.rerun_failed)
    if skipped:
        log.info("%s: skipped, already %s (run.force=true or run.rerun_failed=true to rerun)", cid, skipped)
        return f"skipped:{skipped}"

    cfg_dict = OmegaConf.to_container(cfg, resolve=True)
    cfg_dict.pop("hydra", None)
    try:
        task_overrides = list(HydraConfig.get().overrides.task)
    except ValueError:
        task_overrides = []
    device = cfg.bench.device
    want_gpu = device == "cuda" or (device == "auto" and bool(gpu_state.visible_gpus()))
    before = read_result(cell_dir)
    with cell_lock(cell_dir):
        locks, gpus = _take_devices(cfg, want_gpu)
        try:
            # Again, holding the cell: another process may have finished it while this one waited
            if read_result(cell_dir) != before and should_skip(cell_dir, False, False):
                log.info("%s: skipped, finished by another process while this one waited", cid)
                return f"skipped:{read_result(cell_dir)['status']}"
            spec = {
                "attempt_id": uuid.uuid4().hex,  # ties the child's result to this attempt
                "config": cfg_dict,
                "overrides": task_overrides,
                "command": os.environ.get("QBENCH_COMMAND", ""),
            }
            spec_path = cell_dir / ".attempt" / "spec.json"
            write_json_atomic(spec_path, spec)
            log.info("%s: measuring in a fresh process%s", cid, f" on GPU {','.join(gpus)}" if gpus else " on CPU")
            t0 = time.perf_counter()
            proc = subprocess.Popen([sys.executable, "-m", "qbench.cell", str(spec_path)],
                                    env=_child_env(want_gpu, device, gpus), start_new_session=False)
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
            row = _error_row(cfg_dict, error[0], error[1], "cell")
            row["wall_time_s"] = time.perf_counter() - t0
            row["overrides"] = task_overrides
            write_result(cell_dir, row)
            result = row
    status = (result or {}).get("status", "error")
    if status == "ok":
        log.info("%s: ok in %.1f s", cid, time.perf_counter() - t0)
    else:
        err = (result or {}).get("error") or {}
        log.error("%s: error (%s) %s", cid, err.get("class"), err.get("message"))
    return status


# ----------------------------------------------------------------------------------------------- summary
class SweepSummary:
    """Hydra callback: at the end of a sweep, one line with how many cells ran, were skipped and failed."""

    def __init__(self) -> None:
        self.started = time.time()

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        self.started = time.time()

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        print(summary_line(sweep_dir, self.started), flush=True)

    # Hydra calls these too; nothing to do
    def on_run_start(self, config: Any, **kwargs: Any) -> None: ...
    def on_run_end(self, config: Any, **kwargs: Any) -> None: ...
    def on_job_start(self, config: Any, **kwargs: Any) -> None: ...
    def on_job_end(self, config: Any, job_return: Any, **kwargs: Any) -> None: ...


def summary_counts(sweep_dir: Path, since: float) -> Dict[str, int]:
    from qbench.store import RESULT_FILE, read_result

    counts = {"cells": 0, "ran": 0, "skipped": 0, "failed": 0, "ok": 0}
    for path in sorted(Path(sweep_dir).glob(f"*/{RESULT_FILE}")):
        result = read_result(path.parent) or {}
        counts["cells"] += 1
        counts["ok"] += result.get("status") == "ok"
        if path.stat().st_mtime >= since:
            counts["ran"] += 1
            counts["failed"] += result.get("status") != "ok"
        else:
            counts["skipped"] += 1
    return counts


def summary_line(sweep_dir: Path, since: float) -> str:
    c = summary_counts(sweep_dir, since)
    return (
        f"qbench: {sweep_dir}: {c['cells']} cells with results: ran {c['ran']}, skipped {c['skipped']}, "
        f"failed {c['failed']} ({c['ok']} ok in all)"
    )


# ----------------------------------------------------------------------------------------------- entry
def _hydra_app() -> None:
    import hydra

    @hydra.main(version_base="1.3", config_path=conf_dir(), config_name="config")
    def app(cfg: Any) -> str:
        return run_cell(cfg)

    app()


def main(argv: Optional[List[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    register_configs()
    info_only = any(a.startswith(("--help", "-h", "--hydra-help", "--info", "--cfg", "-c", "--shell-completion")) for a in argv)
    os.environ.setdefault("QBENCH_COMMAND", "qbench " + " ".join(shlex.quote(a) for a in argv))
    started = time.time()
    if not info_only:
        try:
            n = preflight(argv)
        except ConfigError as exc:
            print(f"qbench: error: {exc}", file=sys.stderr)
            sys.exit(2)
        print(f"qbench: {n} cell(s) checked", flush=True)
    sys.argv = [sys.argv[0]] + argv
    try:
        _hydra_app()
    except KeyboardInterrupt:
        print("\nqbench: interrupted; cells with a result.json finished, the rest run on the next start", file=sys.stderr)
        _print_interrupted_summary(argv, started)
        sys.exit(130)


def _print_interrupted_summary(argv: List[str], started: float) -> None:
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
            cfg = _compose([a for a in argv if not a.startswith("-") and "," not in a])
            print(summary_line(Path(cfg.run.runs_dir) / cfg.run.sweep, started), file=sys.stderr)
    except Exception:
        pass


if __name__ == "__main__":
    main()
