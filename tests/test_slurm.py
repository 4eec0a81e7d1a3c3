"""hydra/launcher=slurm against a real SLURM cluster (`bash scripts/slurm_local.sh up` makes a one-node one).

Tests marked `slurm` need a cluster that answers `sinfo` with a usable node; they skip without one, and fail
instead where QBENCH_REQUIRE_SLURM=1 (CI, after bringing the cluster up). The rest run anywhere.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

from qbench.run import slurm

REPO = Path(__file__).resolve().parent.parent
QBENCH = [sys.executable, "-m", "qbench"]
FAST = ["model=tiny", "eval=none", "bench=quick", "bench.batch_sizes=[1]", "bench.new_tokens=4",
        "bench.min_repeats=1", "bench.max_repeats=1", "bench.warmup_runs=0", "bench.prompt_tokens=[8]",
        "bench.decode_prompt_tokens=8", "bench.device=cpu"]
# A cell that measures for ten minutes: long enough to be cancelled, or to outlive a one-minute time limit
SLOW = [o for o in FAST if not o.startswith(("bench.max_repeats", "bench.min_repeats"))] + [
    "bench.min_repeats=1", "bench.max_repeats=100000000", "bench.min_duration_s=600"]
# Secrets of the submitting shell: they reach the job (a gated model needs HF_TOKEN) but no file qbench keeps
SECRETS = {"HF_TOKEN": "hf_qbenchTestTokenValue8231", "QBENCH_DB_PASSWORD": "pw-qbench-7741-secret",
           "AWS_SECRET_ACCESS_KEY": "awsQbenchSecret99120", "MY_SERVICE_API_KEY": "apikey-qbench-5521"}


def _partition() -> str | None:
    """The default partition of a cluster whose node can take jobs, or None where no SLURM answers."""
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return None
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%P %t"], capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired):
        return None
    rows = [ln.split() for ln in out.stdout.splitlines() if len(ln.split()) == 2] if out.returncode == 0 else []
    usable = [(p, s) for p, s in rows if s.rstrip("*~#") in ("idle", "mix", "mixed", "alloc", "allocated")]
    usable.sort(key=lambda r: not r[0].endswith("*"))  # the default partition first
    return usable[0][0].rstrip("*") if usable else None


@pytest.fixture(scope="module")
def partition():
    part = _partition()
    if part is None:
        if os.environ.get("QBENCH_REQUIRE_SLURM") == "1":
            pytest.fail("QBENCH_REQUIRE_SLURM=1 but no SLURM cluster answers (bash scripts/slurm_local.sh up)")
        pytest.skip("no SLURM cluster answers sinfo (bash scripts/slurm_local.sh up starts a local one)")
    return part


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def _env(cache: Path, data: Path | None = None) -> dict:
    e = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    e.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", QBENCH_CACHE=str(cache),
             PYTHONPATH=str(REPO), **SECRETS)
    if data is not None:
        e["QBENCH_DATA"] = str(data)
    return e


def _launcher(partition: str, parallelism: int = 2, timeout_min: int = 10) -> list:
    return ["hydra/launcher=slurm", f"hydra.launcher.partition={partition}", "hydra.launcher.gpus_per_task=null",
            "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=3", f"hydra.launcher.timeout_min={timeout_min}",
            f"hydra.launcher.array_parallelism={parallelism}", "hydra.launcher.poll_s=1"]


def qbench(args, runs: Path, env: dict, timeout=900, check=True):
    proc = subprocess.run(QBENCH + args + [f"run.runs_dir={runs}"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"qbench exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def results(sweep_dir: Path) -> dict:
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(sweep_dir.glob("*/result.json"))}


def _keys(obj, prefix=""):
    """Every key path of a result (the schema), lists looked into by their first element."""
    if isinstance(obj, dict):
        out = set()
        for k, v in obj.items():
            out |= {f"{prefix}{k}"} | _keys(v, f"{prefix}{k}.")
        return out
    if isinstance(obj, list) and obj:
        return _keys(obj[0], prefix + "[].")
    return set()


def _interval(r: dict) -> tuple:
    return datetime.fromisoformat(r["started_at"]).timestamp(), datetime.fromisoformat(r["finished_at"]).timestamp()


# ------------------------------------------------------------------------------------------ no cluster needed
def test_job_states_read_array_ranges_and_classes():
    assert slurm._expand_array("12_[0-2,5%2]") == ["12_0", "12_1", "12_2", "12_5"]
    assert slurm._expand_array("12_3") == ["12_3"]
    assert slurm.error_class("CANCELLED by 0") == "cancelled"
    assert slurm.error_class("TIMEOUT") == "timeout"
    assert slurm.error_class("PREEMPTED") == "preempted"
    assert slurm.error_class("NODE_FAIL") == "node_fail"
    assert slurm.error_class("COMPLETED") is None and slurm.error_class("RUNNING") is None
    assert slurm._seconds("1-02:03:04") == 93784 and slurm._seconds("05:00") == 300
    assert slurm._seconds("UNLIMITED") is None
    assert slurm.job_info({"PATH": "/bin"}) is None
    info = slurm.job_info({"SLURM_JOB_ID": "41", "SLURM_ARRAY_JOB_ID": "40", "SLURM_ARRAY_TASK_ID": "1",
                           "SLURMD_NODENAME": "gpu-07", "HF_TOKEN": SECRETS["HF_TOKEN"]})
    assert info["job_id"] == "40_1" and info["array_task_id"] == 1 and info["node"] == "gpu-07"
    assert SECRETS["HF_TOKEN"] not in json.dumps(info)


def test_slurm_launcher_without_sbatch_is_one_line_of_bad_input(tmp_path, cache):
    env = _env(cache)
    env["PATH"] = os.path.dirname(sys.executable)  # python, but no sbatch
    proc = qbench(["-m", *FAST, "method=fp32", "run.sweep=nosb", "hydra/launcher=slurm"], tmp_path / "runs", env,
                  check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("qbench: error: hydra/launcher=slurm: sbatch is not on PATH")
    assert not (tmp_path / "runs" / "nosb").exists()


# ------------------------------------------------------------------------------------------ a real cluster
@pytest.fixture(scope="module")
def demo_sweeps(tmp_path_factory, partition, cache):
    """The demo's sweep (its six methods on the tiny model, cheap bench, no eval) once through SLURM, two
    cells at a time, and once locally, from a shell that holds secrets."""
    base = tmp_path_factory.mktemp("demo")
    data = base / "data"
    data.mkdir()
    env = _env(cache, data)
    args = ["-m", "experiment=demo", *FAST]
    t0 = time.time()
    proc = qbench(args + ["run.sweep=demo_slurm", *_launcher(partition, parallelism=2)], base / "runs", env)
    slurm_s = time.time() - t0
    qbench(args + ["run.sweep=demo_local"], base / "runs", env)
    return {"runs": base / "runs", "out": proc.stdout + proc.stderr, "data": data, "slurm_s": slurm_s}


@pytest.mark.slurm
def test_demo_sweep_runs_every_cell_as_a_slurm_job_like_a_local_run(demo_sweeps, cache):
    remote, local = results(demo_sweeps["runs"] / "demo_slurm"), results(demo_sweeps["runs"] / "demo_local")
    assert set(remote) == set(local) == {"tiny__fp32", "tiny__bf16", "tiny__bnb_int8", "tiny__bnb_nf4", "tiny__gguf_q8_0",
                                          "tiny__gguf_q4_k_m"}
    assert all(r["status"] == "ok" for r in remote.values()), {k: r.get("error") for k, r in remote.items()}
    assert "ran 6, skipped 0, failed 0" in demo_sweeps["out"]
    jobs = {r["scheduler"]["job_id"] for r in remote.values()}
    assert len(jobs) == 6 and len({r["pid"] for r in remote.values()}) == 6, "one job, one process per cell"
    assert {r["scheduler"]["array_task_id"] for r in remote.values()} == set(range(6))
    assert len({r["scheduler"]["array_job_id"] for r in remote.values()}) == 1
    for r in remote.values():
        assert r["scheduler"]["node"] and r["scheduler"]["partition"]
    for cell, r in remote.items():
        mine = local[cell]
        assert mine["scheduler"] is None
        # same schema; the job's scheduler block aside, and the times to build the tiny model and to quantize
        # (a GGUF cell), which only the first cell to find the cache empty records
        one_time = {"source.materialise_s", "timings.budget.quantize_s"}
        differ = {k for k in _keys(r) ^ _keys(mine) if not k.startswith("scheduler.") and k not in one_time}
        assert not differ, (cell, differ)
        assert r["metrics"]["memory"]["weight_bytes_measured"] == mine["metrics"]["memory"]["weight_bytes_measured"]
        strip = lambda c: {**c, "run": {k: v for k, v in c["run"].items() if k != "sweep"}}
        assert strip(r["config"]) == strip(mine["config"])
    print(f"\nslurm tier: demo sweep of 6 cells through SLURM in {demo_sweeps['slurm_s']:.0f} s")


@pytest.mark.slurm
def test_array_runs_cells_at_once_on_disjoint_cpus(demo_sweeps):
    remote = list(results(demo_sweeps["runs"] / "demo_slurm").values())
    overlapping = [(a, b) for i, a in enumerate(remote) for b in remote[i + 1:]
                   if min(_interval(a)[1], _interval(b)[1]) > max(_interval(a)[0], _interval(b)[0])]
    assert overlapping, "array_parallelism=2 yet no two cells ran at the same time"
    for a, b in overlapping:  # SLURM's allocation is the slot: two cells at once never share a CPU
        cpus_a, cpus_b = a["environment"]["cpu_affinity"]["cpus"], b["environment"]["cpu_affinity"]["cpus"]
        assert set(cpus_a).isdisjoint(cpus_b), (a["cell"], cpus_a, b["cell"], cpus_b)


@pytest.mark.slurm
def test_job_env_reaches_the_cell_and_no_secret_reaches_a_file(demo_sweeps, cache):
    for r in results(demo_sweeps["runs"] / "demo_slurm").values():
        variables = r["environment"]["variables"]
        assert variables["HF_HUB_OFFLINE"] == "1" and variables["HF_DATASETS_OFFLINE"] == "1"
        assert variables["QBENCH_DATA"] == str(demo_sweeps["data"])
        assert variables["QBENCH_CACHE"] == str(cache) == r["config"]["run"]["cache_dir"]
        assert set(SECRETS) <= set(r["environment"]["secret_variables_withheld"]), "the secrets reached the job"
    kept = [p for p in demo_sweeps["runs"].rglob("*") if p.is_file()]
    assert any(".submitit" in p.parts for p in kept), "the job scripts and logs are among the files checked"
    for path in kept:
        data = path.read_bytes()
        for name, value in SECRETS.items():
            assert value.encode() not in data, f"{name}'s value is in {path}"


def _job_of(cell_dir: Path, deadline: float) -> str:
    while time.time() < deadline:
        record = slurm_record(cell_dir)
        if record and (cell_dir / ".attempt" / "spec.json").exists():
            return record["job_id"]
        time.sleep(0.5)
    pytest.fail(f"{cell_dir.name} never started")


def slurm_record(cell_dir: Path):
    try:
        return json.loads((cell_dir / ".attempt" / "slurm.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


@pytest.mark.slurm
def test_scancel_and_time_limit_become_error_rows_and_rerun_failed_completes_them(tmp_path, partition, cache):
    """Two sweeps into one directory at once: one whose running job is cancelled, one whose job outlives its
    one-minute limit (SLURM's shortest). Each ends normally with its error row; a third sweep redoes both."""
    runs, env = tmp_path / "runs", _env(cache)
    sweep = runs / "faults"

    def start(method, timeout_min):
        args = ["-m", *SLOW, f"method={method}", "run.sweep=faults", *_launcher(partition, 1, timeout_min)]
        return subprocess.Popen(QBENCH + args + [f"run.runs_dir={runs}"], cwd=REPO, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    cancelled, timed_out = start("bf16", 10), start("fp32", 1)
    try:
        job = _job_of(sweep / "tiny__bf16", time.time() + 400)  # its cell process is measuring
        subprocess.run(["scancel", job], check=True)
        outs = {name: p.communicate(timeout=400)[0] for name, p in (("bf16", cancelled), ("fp32", timed_out))}
    finally:
        cancelled.kill()
        timed_out.kill()
    assert cancelled.returncode == 1 and timed_out.returncode == 1, outs  # a sweep with a failed cell exits 1
    res = results(sweep)
    assert res["tiny__bf16"]["status"] == "error" and res["tiny__bf16"]["error"]["class"] == "cancelled", res["tiny__bf16"]["error"]
    assert res["tiny__bf16"]["scheduler"]["job_id"] == job
    assert res["tiny__fp32"]["status"] == "error" and res["tiny__fp32"]["error"]["class"] == "timeout", res["tiny__fp32"]["error"]
    # the job wrote that class itself (its row stands where no submitting process is left to settle it)
    assert "cell_error" not in res["tiny__bf16"]["error"], res["tiny__bf16"]["error"]
    # each sweep ends with its summary line, counting its own cell only (not the other sweep's)
    assert all("1 cells: ran 1, skipped 0, failed 1 (0 ok, 1 error)" in out for out in outs.values()), outs

    again = qbench(["-m", *FAST, "method=fp32,bf16", "run.sweep=faults", "run.rerun_failed=true",
                    *_launcher(partition, 2)], runs, env)
    res = results(sweep)
    assert all(r["status"] == "ok" for r in res.values()), {k: r.get("error") for k, r in res.items()}
    assert "ran 2, skipped 0, failed 0" in again.stdout + again.stderr


@pytest.mark.slurm
def test_submitter_sigkilled_mid_sweep_then_restarted_measures_each_cell_once(tmp_path, partition, cache):
    runs, env = tmp_path / "runs", _env(cache)
    sweep = runs / "k"
    methods = ["fp32", "bf16", "bnb_int8"]
    args = ["-m", *FAST, f"method={','.join(methods)}", "run.sweep=k", *_launcher(partition, 1)]
    proc = subprocess.Popen(QBENCH + args + [f"run.runs_dir={runs}"], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while time.time() < deadline:  # every cell submitted, the first one measuring
        records = [slurm_record(sweep / f"tiny__{m}") for m in methods]
        if all(records) and list(sweep.glob("*/.attempt/spec.json")):
            break
        time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("the sweep never submitted its cells")
    proc.send_signal(signal.SIGKILL)  # the submitting process only: its jobs live on in SLURM
    proc.wait()
    assert len(results(sweep)) < 3, "killed too late: every cell had finished"

    out = qbench(args, runs, env)
    res = results(sweep)
    assert set(res) == {f"tiny__{m}" for m in methods}
    assert all(r["status"] == "ok" for r in res.values()), {k: r.get("error") for k, r in res.items()}
    first_jobs = {r["job_id"] for r in records}
    assert {r["scheduler"]["job_id"] for r in res.values()} == first_jobs, "the restart resubmitted cells"
    arrays = {p.name.split("_")[0] for p in (sweep / ".submitit").iterdir() if p.name[0].isdigit()}
    assert len(arrays) == 1, f"the restart submitted another array: {sorted(arrays)}"
    logs = "".join(p.read_text(errors="replace") for p in (sweep / ".submitit").rglob("*_log.*"))
    measured = re.findall(r"(tiny__\w+): measuring in a fresh process", logs)
    assert sorted(measured) == sorted(res), f"cells measured: {measured}"
    assert "waiting for it" in out.stdout + out.stderr


@pytest.mark.slurm
def test_report_shows_each_cells_node_and_flags_a_sweep_spread_over_nodes(demo_sweeps, tmp_path):
    from qbench.report import html as H
    from qbench.report import tables as T

    sweep = tmp_path / "demo_slurm"
    shutil.copytree(demo_sweeps["runs"] / "demo_slurm", sweep, ignore=shutil.ignore_patterns(".submitit"))
    moved = json.loads((sweep / "tiny__bf16" / "result.json").read_text())
    moved["scheduler"]["node"] = "gpu-node-b"  # as if SLURM had placed this cell on a second node
    (sweep / "tiny__bf16" / "result.json").write_text(json.dumps(moved))
    results_ = T.load_results(sweep)
    env = H.environment_view(results_)
    rows = {row[0]: dict(zip(env["head"], row)) for row in env["body"]}
    assert rows["tiny__bf16"]["node"] == "gpu-node-b" and rows["tiny__fp32"]["node"] != "gpu-node-b"
    assert rows["tiny__fp32"]["SLURM job"] == results(sweep)["tiny__fp32"]["scheduler"]["job_id"]
    mixed = {m["key"]: m for m in H.honesty_view(results_, T.summary_rows(results_))["mixed"]}
    assert "node" in mixed and any(v["cells"] == ["tiny__bf16"] for v in mixed["node"]["values"])
    assert {r["cell"]: r["node"] for r in T.summary_rows(results_)}["tiny__bf16"] == "gpu-node-b"


def test_cells_split_an_salloc_by_lock_but_own_a_launcher_job_whole(tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    from qbench.run.slots import take_devices as _take_devices

    cfg = OmegaConf.create({"model": {"num_gpus": 1}, "run": {"cache_dir": str(tmp_path)}})
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    monkeypatch.setenv("SLURM_JOB_ID", "77")  # e.g. `salloc --gpus=2`, then hydra/launcher=parallel
    monkeypatch.delenv(slurm.OWN_ALLOCATION, raising=False)
    first, gpus_a = _take_devices(cfg, True)
    second, gpus_b = _take_devices(cfg, True)
    assert first and second and set(gpus_a).isdisjoint(gpus_b), "cells of one allocation shared a GPU"
    for f in first + second:
        f.close()
    monkeypatch.setenv(slurm.OWN_ALLOCATION, "1")  # a job of hydra/launcher=slurm: SLURM gave it these GPUs
    locks, gpus = _take_devices(cfg, True)
    assert locks == [] and gpus == ["0"]


NO_SUBMITIT = """
import sys
for name in ("submitit", "hydra_plugins.hydra_submitit_launcher", "hydra_plugins.hydra_submitit_launcher.config",
             "hydra_plugins.hydra_submitit_launcher.submitit_launcher"):
    sys.modules[name] = None  # as where the slurm extra is not installed: an import raises ImportError
from qbench.run import cli
sys.argv = ["qbench"] + sys.argv[1:]
cli.main()
"""


@pytest.mark.parametrize("launcher", ["parallel", "slurm"])
def test_a_launcher_without_its_extra_is_a_one_line_error_at_preflight(tmp_path, launcher):
    script = tmp_path / "no_submitit.py"
    script.write_text(NO_SUBMITIT)
    env = {**os.environ, "PYTHONPATH": str(REPO), "QBENCH_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, str(script), "-m", *FAST, "method=fp32", "run.sweep=nosub",
                           f"run.runs_dir={tmp_path / 'runs'}", f"hydra/launcher={launcher}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("qbench: error: ") and "pip install 'qbench[slurm]'" in last, last
    assert not (tmp_path / "runs" / "nosub").exists()


def test_a_composed_submitit_launcher_without_submitit_is_refused(monkeypatch):
    from omegaconf import OmegaConf

    from qbench.errors import ConfigError
    from qbench.run import cli

    cfg = OmegaConf.create({"hydra": {"launcher": {
        "_target_": "hydra_plugins.qbench_launcher.parallel_launcher.QbenchParallelLauncher"}}})
    cli._check_launcher(cfg)  # installed here (make install): accepted
    monkeypatch.setattr(cli, "_has_module", lambda name: name != "submitit")
    with pytest.raises(ConfigError, match=r"hydra/launcher=parallel needs hydra-submitit-launcher"):
        cli._check_launcher(cfg)


def test_hydras_warning_about_the_launchers_is_dropped_only_for_the_missing_extra():
    import warnings

    from qbench.run import cli

    hydras = ("\n\tError importing 'hydra_plugins.qbench_launcher.{}_launcher'.\n\tPlugin is incompatible with this "
              "Hydra version or buggy.\n\tRecommended to uninstall or upgrade plugin.\n\t\tModuleNotFoundError : "
              "No module named 'hydra_plugins.hydra_submitit_launcher'")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        cli._quiet_missing_submitit()
        warnings.warn(hydras.format("parallel"), UserWarning, stacklevel=1)
        warnings.warn(hydras.format("slurm"), UserWarning, stacklevel=1)
        warnings.warn(hydras.format("slurm").replace("hydra_submitit_launcher", "psutil"), UserWarning, stacklevel=1)
    assert [str(w.message).split("No module named ")[1] for w in seen] == ["'hydra_plugins.psutil'"]
