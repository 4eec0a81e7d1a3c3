"""Stop signals (SIGTERM, SIGHUP, SIGINT) and the death of the sweep: the cell process stops with the sweep, holds
its own locks while it lives, and never goes on measuring as an orphan; a result measured beside another
measuring process is not ``ok``."""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from qbench.run import cell, cell_process, cli
from qbench.store.jsonio import write_result
from qbench.store.rerun import should_skip

REPO = Path(__file__).resolve().parent.parent
QBENCH = [sys.executable, "-m", "qbench"]
# The tiny model with a latency run long enough to be caught measuring (each decode run generates 64 tokens)
SLOW = ["model=tiny", "bench=quick", "bench.batch_sizes=[1]", "bench.new_tokens=64", "bench.min_repeats=40",
        "bench.max_repeats=40", "bench.max_time_per_figure_s=600", "bench.max_time_per_eager_figure_s=null",
        "bench.warmup_runs=0", "bench.prompt_tokens=[8]", "bench.decode_prompt_tokens=8", "bench.device=cpu"]


def _env(tmp_path: Path) -> dict:
    e = dict(os.environ)
    e.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=str(REPO),
             QBENCH_LOCK_DIR=str(tmp_path / "locks"))  # slots of its own: other sweeps on this host do not delay it
    return e


def _gone_within(pid: int, seconds: float) -> bool:
    """Whether the process ``pid`` is gone (or a zombie) within ``seconds``."""
    deadline = time.time() + seconds
    while _alive(pid) and time.time() < deadline:
        time.sleep(0.1)
    return not _alive(pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped) is gone for what matters here
    return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z" if Path(f"/proc/{pid}").exists() else True


def _cell_pid(cell_dir: Path, deadline: float) -> int:
    """The cell process's pid, once it measures (its log has the weights line)."""
    log = cell_dir / "cell.log"
    while time.time() < deadline:
        text = log.read_text() if log.exists() else ""
        if "weights from" in text:
            return int(re.findall(r"attempt \w+, pid (\d+)", text)[-1])
        time.sleep(0.05)
    pytest.fail("the cell never started measuring")


def _open_files(pid: int) -> set:
    out = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            out.add(os.readlink(fd))
        except OSError:
            continue
    return out


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_stop_signal_to_the_sweep_stops_the_cell_and_says_so(tmp_path, signum):
    runs = tmp_path / "runs"
    cell_dir = runs / "t" / "tiny__bf16"
    # SIGHUP back to its default: under nohup it is inherited ignored, and qbench keeps an ignored SIGHUP ignored
    proc = subprocess.Popen(QBENCH + ["-m", *SLOW, "method=bf16", "run.sweep=t", f"run.runs_dir={runs}"], cwd=REPO,
                            env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))
    child = None
    try:
        child = _cell_pid(cell_dir, time.time() + 300)
        held = _open_files(child)
        # the cell process holds the cell's lock and its CPU slot itself, not through the sweep alone
        assert str(cell_dir / ".attempt" / "lock") in held
        assert any(p.startswith(str(tmp_path / "locks")) and p.endswith(".lock") for p in held), held
        os.kill(proc.pid, signum)  # the sweep's process only, as systemd, SLURM or `timeout` would
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
        orphan = child is not None and _alive(child)
        if orphan:  # this test's own measuring process must not outlive it, whatever went wrong
            os.kill(child, signal.SIGKILL)
    assert not orphan, "the cell process outlived the sweep"
    assert proc.returncode == 128 + signum, out[-3000:]
    name = signal.Signals(signum).name
    assert f"qbench: interrupted by {name}" in out
    assert "qbench: " + str(runs / "t") + ": 1 cells: ran 0" in out, "the summary line"
    assert "Traceback" not in out
    assert not (cell_dir / "result.json").exists(), "a stopped cell writes nothing: the next start redoes it"
    assert "interrupted: no result written" in (cell_dir / "cell.log").read_text()


PARALLEL = ["hydra/launcher=parallel", "method=bf16,fp32", "run.sweep=p"]  # one cell measures, one waits for the slot


def _session(sid: int) -> list:
    """(pid, command) of every live process in session ``sid`` (the sweep's own, started with start_new_session):
    whatever the sweep started, however deep and wherever reparented, is there unless it left the session."""
    out = []
    for d in Path("/proc").iterdir():
        try:
            fields = (d / "stat").read_text().rsplit(") ", 1)[1].split()
            if d.name.isdigit() and int(fields[3]) == sid and fields[0] != "Z":
                out.append((int(d.name), (d / "cmdline").read_bytes().replace(b"\0", b" ").decode()[:120]))
        except (OSError, IndexError, ValueError):
            continue
    return out


def _kill_session(sid: int) -> None:
    for pid, _ in _session(sid):  # this test's own processes only: they must not outlive it, whatever went wrong
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _start_parallel_sweep(tmp_path: Path, runs: Path, log: Path) -> subprocess.Popen:
    """A parallel-launcher sweep of two slow cells, in a session of its own; returns once a cell measures."""
    with open(log, "w") as out:
        proc = subprocess.Popen(QBENCH + ["-m", *SLOW, *PARALLEL, f"run.runs_dir={runs}"], cwd=REPO,
                                env=_env(tmp_path), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 300
    while not any("weights from" in (p.read_text() if p.exists() else "")
                  for p in (runs / "p" / c / "cell.log" for c in ("tiny__bf16", "tiny__fp32"))):
        if time.time() > deadline or proc.poll() is not None:
            _kill_session(proc.pid)
            pytest.fail(f"no cell started measuring\n{log.read_text()[-3000:]}")
        time.sleep(0.1)
    started = [cmd for _, cmd in _session(proc.pid)]
    # a cell process: spawned (python -m qbench.run.cell) or forked from a job's run.preload server
    cells = [c for c in started if "qbench.run.cell" in c or "multiprocessing.forkserver" in c]
    assert sum("submitit.core._submit" in c for c in started) == 2 and cells, started
    return proc


@pytest.mark.slow  # two submitit jobs, each a cell's Hydra job and its cell process
def test_stop_signal_to_a_parallel_sweep_stops_every_job(tmp_path):
    """hydra/launcher=parallel: submitit's job processes ignore SIGTERM and outlive the sweep by design; the
    signal must still reach every job and its cell process, and the sweep must wait for them."""
    runs, log = tmp_path / "runs", tmp_path / "sweep.log"
    proc = _start_parallel_sweep(tmp_path, runs, log)
    try:
        os.kill(proc.pid, signal.SIGTERM)  # the sweep's process only, as systemd, SLURM or `timeout` would
        proc.wait(timeout=120)
        left = _session(proc.pid)  # at once: the sweep exits only once every process it started is gone
    finally:
        _kill_session(proc.pid)
        if proc.poll() is None:
            proc.kill()
    out = log.read_text()
    assert not left, f"processes outlived the sweep: {left}"
    assert proc.returncode == 143, out[-3000:]
    assert "qbench: interrupted by SIGTERM" in out
    assert "qbench: " + str(runs / "p") + ": 2 cells: ran 0" in out, "the summary line"
    assert "Traceback" not in out
    assert not list((runs / "p").glob("*/result.json")), "a stopped cell writes nothing: the next start redoes it"
    cell_logs = [p.read_text() for p in (runs / "p").glob("*/cell.log")]
    assert any("interrupted: no result written" in text for text in cell_logs), "the measuring cell unwound"
    # the next start measures both cells: no lock, slot or job of the stopped sweep is left in the way
    fast = [a for a in SLOW if "repeats" not in a and "new_tokens" not in a] + ["bench.min_repeats=1",
                                                                               "bench.max_repeats=1", "bench.new_tokens=4"]
    again = subprocess.run(QBENCH + ["-m", *fast, *PARALLEL, f"run.runs_dir={runs}"], cwd=REPO, env=_env(tmp_path),
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
    assert "2 cells: ran 2, skipped 0, failed 0" in again.stdout


@pytest.mark.slow  # two submitit jobs, each a cell's Hydra job and its cell process
def test_a_parallel_sweep_killed_leaves_no_job_running(tmp_path):
    """SIGKILL of the sweep (no handler runs): every job's task notices its death and stops its cell, and the
    job's controller ends with it."""
    runs, log = tmp_path / "runs", tmp_path / "sweep.log"
    proc = _start_parallel_sweep(tmp_path, runs, log)
    try:
        proc.kill()
        proc.wait()
        deadline = time.time() + 60  # the cells' grace (cell_process.STOP_GRACE_S) and the tasks' exit
        while _session(proc.pid) and time.time() < deadline:
            time.sleep(0.2)
        left = _session(proc.pid)
    finally:
        _kill_session(proc.pid)
    assert not left, f"processes outlived the killed sweep: {left}"
    assert not list((runs / "p").glob("*/result.json")), "no cell went on to write a result"


def test_cell_process_stops_when_its_parent_is_killed(tmp_path):
    """SIGKILL of the sweep (no handler runs) still stops the cell process: it asked the kernel for SIGTERM on
    its parent's death (cell.die_with_parent)."""
    marker = tmp_path / "stopped"
    child_code = textwrap.dedent(f"""
        import os, sys, time
        from qbench.run import cell
        cell.install_stop_handlers()
        cell.die_with_parent(int(sys.argv[1]))
        try:
            print(os.getpid(), flush=True)
            time.sleep(120)
        except cell.Stopped as exc:
            open({str(marker)!r}, "w").write(str(exc.signum))
    """)
    parent_code = textwrap.dedent("""
        import subprocess, sys, time, os
        child = subprocess.Popen([sys.executable, "-c", sys.argv[1], str(os.getpid())])
        time.sleep(120)
    """)
    parent = subprocess.Popen([sys.executable, "-c", parent_code, child_code], env=_env(tmp_path),
                              stdout=subprocess.PIPE, text=True)
    child_pid = int(parent.stdout.readline())
    parent.kill()
    parent.wait()
    assert _gone_within(child_pid, 30), "the cell process lived on as an orphan"
    assert marker.read_text() == str(int(signal.SIGTERM)), "it unwound (finally blocks ran), not killed outright"


def test_cell_process_of_a_parent_already_gone_stops_at_once(tmp_path):
    code = "from qbench.run import cell\ncell.install_stop_handlers()\ncell.die_with_parent(1)\nimport time; time.sleep(60)"
    proc = subprocess.run([sys.executable, "-c", code], env=_env(tmp_path), capture_output=True, timeout=30)
    assert proc.returncode != 0 and b"Stopped" in proc.stderr


def test_cell_process_stopped_on_its_own_is_a_cancelled_row():
    assert cell_process._child_fault(-signal.SIGTERM) == ("cancelled", "cell process stopped by SIGTERM")
    assert cell_process._child_fault(-signal.SIGHUP)[0] == "cancelled"
    assert cell_process._child_fault(-signal.SIGSEGV) == ("crash", "cell process died of SIGSEGV")
    assert cell_process._child_fault(-signal.SIGKILL)[0] == "killed"
    assert cell_process._child_fault(cell.EXIT_UNWRITTEN)[0] == "filesystem"


def _result(shared, device="cuda"):
    return {"status": "ok", "error": None, "warnings": [], "device": device,
            "device_shared": {"shared": shared, "other_measuring_processes": ["host-123-456"] if shared else []}}


def test_a_result_measured_on_a_shared_device_is_not_ok(tmp_path):
    r = _result(True)
    cell.mark_contaminated(r)
    assert r["status"] == "error" and r["error"]["class"] == "contaminated"
    assert "host-123-456" in r["error"]["message"] and "rerun_failed" in r["error"]["message"]
    # not passed off as done: a rerun with run.rerun_failed=true measures it again
    write_result(tmp_path, {**r, "config": {}})
    assert should_skip(tmp_path, force=False, rerun_failed=True) is None


@pytest.mark.parametrize("shared", [False, None])
def test_a_result_on_an_unshared_or_unknown_device_stays_ok(shared):
    r = _result(shared)
    cell.mark_contaminated(r)
    assert r["status"] == "ok" and r["error"] is None


def test_cpu_cells_side_by_side_stay_ok_with_a_warning():
    """CPU cells that share a host (the parallel and SLURM launchers' CPU slot) keep their result, warned."""
    r = _result(True, device="cpu")
    cell.mark_contaminated(r)
    assert r["status"] == "ok" and r["error"] is None
    assert any("host-123-456" in w and "CPUs" in w for w in r["warnings"])


# A library that catches the KeyboardInterrupt of a stop signal and raises its own error (torch.compile wraps what
# it catches; so may any C extension's callback), then the cell process in the step that called it.
_WRAPPING_LIBRARY = textwrap.dedent("""
    import os, signal, sys
    from qbench.run import cell

    def library_call(device):
        try:
            os.kill(os.getpid(), signal.SIGTERM)  # SLURM's scancel signals every process of the job
        except KeyboardInterrupt as exc:
            raise RuntimeError("a library's own error") from exc

    def swallowing_run(spec):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
        except KeyboardInterrupt:
            pass  # the stop is lost inside the library; the cell goes on and returns a result
        return {"status": "ok", "warnings": [], "error": None}

    if sys.argv[2] == "wraps":
        cell._cuda_context = library_call
    else:
        cell.run = swallowing_run
    sys.exit(cell.main([sys.argv[1]]))
""")


@pytest.mark.parametrize("library", ["wraps", "swallows"])
def test_a_stop_a_library_turned_into_its_own_error_is_still_a_stop(tmp_path, library):
    """Once a stop signal has arrived, the cell writes no row of its own, whatever the library made of the
    KeyboardInterrupt: it ends by the signal, so that its parent (or SLURM's job) writes the cancelled row."""
    from hydra import compose, initialize_config_dir

    from qbench.run import preflight as pf

    pf.register_configs()
    with initialize_config_dir(config_dir=cli.conf_dir(), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["model=tiny", "bench=quick", "bench.device=cpu",
                                                        "method=bf16", f"run.runs_dir={tmp_path / 'runs'}"])
    cell_dir = tmp_path / "runs" / "s" / "tiny__bf16"
    spec = cell_dir / ".attempt" / "spec.json"
    spec.parent.mkdir(parents=True)
    spec.write_text(json.dumps({"attempt_id": "a1", "config": cell_process._cfg_dict(cfg), "device_keys": []}))
    proc = subprocess.run([sys.executable, "-c", _WRAPPING_LIBRARY, str(spec), library], env=_env(tmp_path),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGTERM, proc.stderr[-3000:]
    assert not (cell_dir / "result.json").exists(), (cell_dir / "result.json").read_text()
    assert cell_process._child_fault(proc.returncode)[0] == "cancelled"
