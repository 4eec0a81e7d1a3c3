"""Preloaded cell processes (run.preload, qbench/run/preload.py): each cell is still a fresh process, forked from
a server that imported the libraries once per sweep; the environment, locks and stop behaviour stay a cell's own."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.test_faults_signals import QBENCH, REPO, SLOW, _alive, _cell_pid, _env, _gone_within, _open_files

QUICK = ["model=tiny", "bench=quick", "bench.batch_sizes=[1]", "bench.new_tokens=4", "bench.min_repeats=2",
         "bench.max_repeats=2", "bench.warmup_runs=1", "bench.prompt_tokens=[8]", "bench.decode_prompt_tokens=8",
         "bench.device=cpu", "eval.enabled=false", "eval.quality.enabled=false"]


def _sweep(tmp_path: Path, preload: bool) -> dict:
    runs = tmp_path / f"runs-{preload}"
    subprocess.run(QBENCH + ["-m", *QUICK, "method=fp32,bf16", "run.sweep=s", f"run.runs_dir={runs}",
                             f"run.preload={str(preload).lower()}"],
                   cwd=REPO, env=_env(tmp_path), check=True, capture_output=True, timeout=600)
    return {m: json.loads((runs / "s" / f"tiny__{m}" / "result.json").read_text()) for m in ("fp32", "bf16")}


@pytest.mark.slow  # two 2-cell sweeps of the tiny model
def test_a_preloaded_cell_pays_a_fraction_of_the_imports(tmp_path):
    plain, preloaded = _sweep(tmp_path, False), _sweep(tmp_path, True)
    for r in (*plain.values(), *preloaded.values()):
        assert r["status"] == "ok"
        assert sum(r["timings"]["budget"].values()) == pytest.approx(r["wall_time_s"], abs=1.0)
    second_plain = plain["bf16"]["timings"]["budget"]["imports_s"]
    second_pre = preloaded["bf16"]["timings"]["budget"]["imports_s"]
    assert second_pre < 0.25 * second_plain, (second_pre, second_plain)
    # the server's one-time cost is reported, the same in every cell of the sweep; a plain cell has no such field
    assert preloaded["bf16"]["preload"]["preloaded"] is True
    assert preloaded["bf16"]["preload"]["server_s"] == preloaded["fp32"]["preload"]["server_s"] > 0
    assert "preload" not in plain["bf16"]


def test_sigkill_of_a_preloaded_sweep_stops_the_cell_and_frees_its_locks(tmp_path):
    """No handler runs in a SIGKILLed sweep: the cell (a child of the fork server, not of the sweep) still stops,
    as it watches the sweep itself, and the locks it held are free once it is gone."""
    runs = tmp_path / "runs"
    cell_dir = runs / "t" / "tiny__bf16"
    proc = subprocess.Popen(QBENCH + ["-m", *SLOW, "method=bf16", "run.sweep=t", f"run.runs_dir={runs}",
                                      "run.preload=true"],
                            cwd=REPO, env=_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    child = None
    try:
        child = _cell_pid(cell_dir, time.time() + 300)
        held = _open_files(child)
        assert str(cell_dir / ".attempt" / "lock") in held  # the forked cell holds the locks itself
        slots = [p for p in held if p.startswith(str(tmp_path / "locks")) and p.endswith(".lock")]
        assert slots, held
        proc.kill()
        proc.wait()
        orphan = not _gone_within(child, 60)
    finally:
        if proc.poll() is None:
            proc.kill()
        if child is not None and _alive(child):
            os.kill(child, signal.SIGKILL)
    assert not orphan, "the preloaded cell outlived the sweep"
    for path in [str(cell_dir / ".attempt" / "lock"), *slots]:
        with open(path, "a") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises BlockingIOError while still held


def test_a_forked_cell_takes_its_own_environment(tmp_path):
    """The server starts with the sweep's CUDA_VISIBLE_DEVICES and threads; a CPU cell's CUDA_VISIBLE_DEVICES=""
    and OMP_NUM_THREADS are what the forked cell sees, also in torch (no GPU there, one thread)."""
    out = tmp_path / "seen.json"
    code = textwrap.dedent(f"""
        import json, os, sys
        os.environ["CUDA_VISIBLE_DEVICES"] = "0"
        os.environ.pop("OMP_NUM_THREADS", None)
        from qbench.run import preload

        def probe(env):
            from qbench.run import cell
            cell.enter_forked(env, [])
            cell._size_thread_pools()
            import torch
            json.dump({{"cvd": os.environ["CUDA_VISIBLE_DEVICES"], "gpus": torch.cuda.device_count(),
                       "threads": torch.get_num_threads(), "cuda_in_server": torch.cuda.is_initialized()}},
                      open({str(out)!r}, "w"))

        if __name__ == "__main__":
            ctx = preload.context()
            p = ctx.Process(target=probe, args=({{**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}},))
            p.start(); p.join()
            sys.exit(p.exitcode)
    """)
    script = tmp_path / "probe.py"
    script.write_text(code)
    subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=_env(tmp_path), check=True, timeout=300)
    seen = json.loads(out.read_text())
    assert seen == {"cvd": "", "gpus": 0, "threads": 1, "cuda_in_server": False}


@pytest.mark.parametrize("preload", [False, True])
def test_run_preload_picks_the_spawn(tmp_path, monkeypatch, preload):
    """run.preload=false: today's plain spawn of python -m qbench.run.cell with the lock fds passed; true: a
    process forked from the preload server, handed the same fds."""
    from qbench.run import cell_process
    from qbench.run import preload as preloaded

    calls = {}
    monkeypatch.setattr(cell_process.subprocess, "Popen", lambda argv, **kw: calls.setdefault("popen", (argv, kw)))
    monkeypatch.setattr(preloaded, "context", lambda: object())
    monkeypatch.setattr(preloaded, "server_s", lambda: 1.5)
    monkeypatch.setattr(preloaded, "CellProcess", lambda *a: calls.setdefault("forked", a))
    spec: dict = {"spawned_at_unix": 0.0}
    cell_process._spawn_cell(spec, tmp_path / "spec.json", {"CUDA_VISIBLE_DEVICES": ""}, [7, 8], preload)
    if preload:
        assert calls["forked"] == (str(tmp_path / "spec.json"), {"CUDA_VISIBLE_DEVICES": ""}, [7, 8])
        assert spec["preload_server_s"] == 1.5 and spec["spawned_at_unix"] > 0
    else:
        argv, kw = calls["popen"]
        assert argv[1:] == ["-m", "qbench.run.cell", str(tmp_path / "spec.json")] and kw["pass_fds"] == [7, 8]
        assert "preload_server_s" not in spec
    assert json.loads((tmp_path / "spec.json").read_text()) == spec


SERVER_SCRIPT = '''
import json, os, signal, sys, time
import multiprocessing.forkserver as fs
from qbench.run import preload  # not _server_signals: this process must keep its own dispositions

SIGS = (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR2)


def dispositions(path, hup_ignored):
    from qbench.run import _server_signals

    _server_signals.as_plain_spawn(hup_ignored)
    json.dump({s.name: str(signal.getsignal(s)) for s in SIGS}, open(path, "w"))


if __name__ == "__main__":
    out = {}
    ctx = preload.context()
    pid = fs._forkserver._forkserver_pid
    ign = int(next(l for l in open(f"/proc/{pid}/status") if l.startswith("SigIgn")).split()[1], 16)
    out["server_ignores"] = [s.name for s in SIGS if ign & (1 << (s - 1))]
    for s in SIGS:  # what a scheduler sends every process of a job
        os.kill(pid, s)
    time.sleep(0.3)
    for flag in (False, True):
        p = ctx.Process(target=dispositions, args=(sys.argv[1] + str(flag), flag))
        p.start()
        p.join()
        out[f"cell_{flag}"] = json.load(open(sys.argv[1] + str(flag)))
    out["server_alive"] = os.path.exists(f"/proc/{pid}")
    print(json.dumps(out))
'''


def test_the_fork_server_outlives_a_schedulers_signals_and_its_cells_start_as_a_plain_spawn(tmp_path):
    """SLURM (scancel, time limit, its SIGUSR2 warning), systemd and Kubernetes signal every process of a job. The
    server ignores them, so it can still report how its cell ended (a server that died of them made a cancelled or
    timed-out cell read as a crash, exit 255); the cell forked from it starts with a plain spawn's dispositions."""
    script = tmp_path / "server_signals.py"
    script.write_text(SERVER_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, str(script), str(tmp_path / "disp")], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["server_ignores"] == ["SIGTERM", "SIGHUP", "SIGUSR2"] and res["server_alive"]
    dfl, ign = str(signal.SIG_DFL), str(signal.SIG_IGN)
    assert res["cell_False"] == {"SIGTERM": dfl, "SIGHUP": dfl, "SIGUSR2": dfl}
    assert res["cell_True"] == {"SIGTERM": dfl, "SIGHUP": ign, "SIGUSR2": dfl}  # the sweep ran under nohup


def test_a_server_that_cannot_fork_a_cell_falls_back_to_a_plain_spawn(tmp_path, monkeypatch, caplog):
    from qbench.run import cell_process
    from qbench.run import preload as preloaded

    calls = {}
    monkeypatch.setattr(preloaded, "_server", {"ctx": object(), "server_s": 1.5})

    def gone(*a):
        raise EOFError("unexpected EOF")

    monkeypatch.setattr(preloaded, "CellProcess", gone)
    monkeypatch.setattr(cell_process.subprocess, "Popen", lambda argv, **kw: calls.setdefault("popen", argv))
    spec: dict = {"spawned_at_unix": 0.0}
    cell_process._spawn_cell(spec, tmp_path / "spec.json", {}, [], True)
    assert calls["popen"][1:3] == ["-m", "qbench.run.cell"]
    assert "preload_server_s" not in json.loads((tmp_path / "spec.json").read_text())
    assert preloaded.context() is None  # later cells spawn plainly
    assert any("could not start a cell" in r.getMessage() for r in caplog.records)


def test_the_probe_refuses_a_server_whose_forks_are_bad(monkeypatch):
    """A CUDA runtime call in the server (torch.cuda.is_available() without NVML, as transformers and lm-eval make
    at import) creates no context, yet every fork after it fails its first CUDA use: the probe must say so."""
    import torch

    from qbench.run import preload

    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "_is_in_bad_fork", lambda: True)
    with pytest.raises(SystemExit) as stop:
        preload._probe()
    assert stop.value.code == preload.CUDA_IN_SERVER
    monkeypatch.setattr(torch.cuda, "_is_in_bad_fork", lambda: False)
    with pytest.raises(SystemExit) as stop:
        preload._probe()
    assert stop.value.code == 0


NVML_SCRIPT = '''
import json, os, sys
from qbench.run import preload


def seen(path):
    import torch
    json.dump({"nvml_check": os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK"),
               "bad_fork": torch.cuda._is_in_bad_fork()}, open(path, "w"))


if __name__ == "__main__":
    ctx = preload.context()
    p = ctx.Process(target=seen, args=(sys.argv[1],))
    p.start()
    p.join()
    sys.exit(p.exitcode)
'''


def test_the_server_asks_nvml_not_the_cuda_runtime_before_torch_loads():
    """The switch must be set before torch (and the libraries that call is_available at import) load in the
    server."""
    from qbench.run import preload

    assert preload.PRELOAD.index("qbench.run._server_cuda") < preload.PRELOAD.index("torch")


def test_a_forked_cell_starts_from_a_server_that_asked_nvml(tmp_path):
    script = tmp_path / "nvml.py"
    script.write_text(NVML_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "PYTORCH_NVML_BASED_CUDA_CHECK"}
    env["PYTHONPATH"] = str(REPO)
    out = subprocess.run([sys.executable, str(script), str(tmp_path / "seen.json")], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads((tmp_path / "seen.json").read_text()) == {"nvml_check": "1", "bad_fork": False}


@pytest.mark.gpu
def test_a_preloaded_cell_runs_on_the_gpu(tmp_path):
    """The fork server's imports must leave its forks able to use CUDA (every preloaded GPU cell failed with
    "Cannot re-initialize CUDA in forked subprocess" before qbench/run/_server_cuda.py)."""
    runs = tmp_path / "runs"
    args = [a for a in QUICK if not a.startswith("bench.device")] + ["bench.device=cuda"]
    subprocess.run(QBENCH + ["-m", *args, "method=fp32,bf16", "run.sweep=g", f"run.runs_dir={runs}",
                             "run.preload=true"],
                   cwd=REPO, env=_env(tmp_path), check=True, capture_output=True, timeout=600)
    for m in ("fp32", "bf16"):
        r = json.loads((runs / "g" / f"tiny__{m}" / "result.json").read_text())
        assert r["status"] == "ok", r.get("error")
        assert r["preload"]["preloaded"] is True


STARTS_EARLY = '''
import json, sys
from qbench.run import cli, preload

if __name__ == "__main__":
    cli.preflight(sys.argv[2:], start_preload=sys.argv[1] == "1")
    started = "started_at" in preload._server
    ctx = preload.context() if started else None
    print(json.dumps({"started": started, "serves": ctx is not None, "server_s": preload.server_s()}))
'''


@pytest.mark.parametrize("start,extra,expect", [(True, [], True), (False, [], False),
                                                (True, ["run.preload=false"], False),
                                                (True, ["run.rounds=2"], False)])
def test_the_sweep_starts_the_server_while_preflight_checks_the_cells(tmp_path, start, extra, expect):
    """The server's imports (15-21 s on the H100 node) overlap preflight when the cells will fork from this
    process: Hydra's basic launcher, run.preload on, one pass (a multi-round parent's rounds start their own)."""
    script = tmp_path / "early.py"
    script.write_text(STARTS_EARLY)
    out = subprocess.run([sys.executable, str(script), "1" if start else "0", "-m", *QUICK, "method=fp32,bf16",
                          "run.sweep=e", f"run.runs_dir={tmp_path / 'runs'}", *extra],
                         cwd=REPO, env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["started"] is expect
    if expect:
        assert seen["serves"] and seen["server_s"] > 0
