"""End to end through the real `qbench` command: sweeps, fresh processes, failure rows, resume, launchers."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
QBENCH = [sys.executable, "-m", "qbench"]
# Small and fast: the tiny model, no accuracy, a minimal latency run.
FAST = ["model=tiny", "bench=quick", "bench.batch_sizes=[1]", "bench.new_tokens=4", "bench.min_repeats=1",
        "bench.max_repeats=1", "bench.warmup_runs=0", "bench.prompt_tokens=[8]", "bench.decode_prompt_tokens=8",
        "bench.device=cpu"]


def env(cache: Path) -> dict:
    e = dict(os.environ)
    e.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", QBENCH_CACHE=str(cache), PYTHONPATH=str(REPO))
    return e


def qbench(args, runs: Path, cache: Path, timeout=600, check=True, **kw):
    proc = subprocess.run(QBENCH + args + [f"run.runs_dir={runs}"], cwd=REPO, env=env(cache),
                          capture_output=True, text=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"qbench {' '.join(args)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def results(sweep_dir: Path) -> dict:
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(sweep_dir.glob("*/result.json"))}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.mark.slow  # whole sweeps of cell processes
def test_sweep_with_a_failing_cell_goes_on(tmp_path, cache):
    runs = tmp_path / "runs"
    proc = qbench(["-m", *FAST, "method=fp32,bf16,bnb_int8", "run.sweep=s", "run.inject_failure=oom:bf16"], runs, cache,
                  check=False)
    assert proc.returncode == 1, "a sweep with a failed cell exits non-zero"
    res = results(runs / "s")
    assert set(res) == {"tiny__fp32", "tiny__bf16", "tiny__bnb_int8"}
    assert res["tiny__fp32"]["status"] == "ok" and res["tiny__bnb_int8"]["status"] == "ok"
    bad = res["tiny__bf16"]
    assert bad["status"] == "error"
    assert bad["error"]["class"] == "oom"
    assert bad["error"]["type"] == "OutOfMemoryError"
    assert "inject_failure" in bad["error"]["message"] and "Traceback" in bad["error"]["traceback"]
    assert bad["timings"]["load_s"] > 0, "what was measured before the failure is kept"
    assert "3 cells: ran 3, skipped 0, failed 1" in proc.stdout + proc.stderr
    # bnb_int8 on bf16 inputs logs its cast on every matmul: once in the log, counted in the result
    assert (proc.stdout + proc.stderr).count("MatMul8bitLt: inputs will be cast") == 1
    int8 = res["tiny__bnb_int8"]
    assert any(w.startswith("bitsandbytes: MatMul8bitLt") and "times, shown once" in w for w in int8["warnings"])
    assert int8["device_shared"]["shared"] is False and int8["device_shared"]["devices"]
    assert "\n" not in bad["error"]["message"]

    # each cell ran in its own process (Hydra's basic launcher alone would run them all in one)
    assert len({r["pid"] for r in res.values()}) == 3
    ok = res["tiny__fp32"]
    assert ok["environment"]["versions"]["torch"]
    if not os.environ.get("PYTORCH_ALLOC_CONF"):
        expected = os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or "expandable_segments:False"
        assert all(r["environment"]["variables"]["PYTORCH_ALLOC_CONF"] == expected
                   for r in res.values()), "every cell measures under the same, recorded, allocator settings"
    assert ok["metrics"]["memory"]["weight_bytes_measured"] > 0
    assert ok["metrics"]["latency"]["decode"], "decode measured"
    # the cell process's own log beside its result, figure by figure
    cell_log = (runs / "s" / "tiny__fp32" / "cell.log").read_text()
    assert cell_log.count("[qbench.run.cell][INFO] attempt ") == 1
    assert re.search(r"\[qbench.latency\]\[INFO\] prefill bs=1 prompt=8: [\d.e+]+ ms ± 0.00 % \(0 % CI\) \(1 runs", cell_log), cell_log
    assert re.search(r"decode eager bs=1: [\d.e+]+ tokens/s ± 0.00 % \(0 % CI\) \(1 runs, [\d.]+ s timed, stopped by min_repeats\)",
                     cell_log), cell_log
    affinity = ok["environment"]["cpu_affinity"]  # recorded unpinned too: which cores the cell could use
    assert affinity["requested"] is None and affinity["applied"] is False
    if hasattr(os, "sched_getaffinity"):
        assert affinity["cpus"] == sorted(os.sched_getaffinity(0))

    # resume: nothing reruns; rerun_failed reruns only the failed cell; force reruns everything
    proc = qbench(["-m", *FAST, "method=fp32,bf16,bnb_int8", "run.sweep=s"], runs, cache, check=False)
    assert "ran 0, skipped 3, failed 0" in proc.stdout + proc.stderr
    assert proc.returncode == 1, "the sweep still holds a failed cell"
    proc = qbench(["-m", *FAST, "method=fp32", "run.sweep=s"], runs, cache)
    assert "1 cells: ran 0, skipped 1, failed 0" in proc.stdout, "only this command's cells are counted"
    proc = qbench(["-m", *FAST, "method=fp32,bf16,bnb_int8", "run.sweep=s", "run.rerun_failed=true"], runs, cache)
    assert "ran 1, skipped 2, failed 0" in proc.stdout + proc.stderr
    assert results(runs / "s")["tiny__bf16"]["status"] == "ok"
    assert (runs / "s" / "tiny__bf16" / "cell.log").read_text().count("] attempt ") == 2, "each attempt appends"
    proc = qbench(["-m", *FAST, "method=fp32", "run.sweep=s", "run.force=true"], runs, cache)
    assert "ran 1," in proc.stdout + proc.stderr


def test_timeout_becomes_an_error_row(tmp_path, cache):
    runs = tmp_path / "runs"
    proc = qbench([*FAST, "method=fp32", "run.sweep=t", "run.timeout_min=0.02"], runs, cache, check=False)
    assert proc.returncode == 1, "a failed cell makes the exit status 1"
    row = results(runs / "t")["tiny__fp32"]
    assert row["status"] == "error" and row["error"]["class"] == "timeout"


@pytest.mark.slow  # whole sweeps of cell processes
def test_sigkill_mid_cell_then_resume_redoes_exactly_that_cell(tmp_path, cache):
    runs = tmp_path / "runs"
    args = ["-m", *FAST, "method=fp32,bf16,bnb_nf4", "run.sweep=k", f"run.runs_dir={runs}"]
    proc = subprocess.Popen(QBENCH + args, cwd=REPO, env=env(cache), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sweep = runs / "k"
    deadline = time.time() + 300
    # wait until one cell has finished and the next one has started
    while time.time() < deadline:
        done = list(sweep.glob("*/result.json"))
        started = list(sweep.glob("*/.attempt/spec.json"))
        if len(done) == 1 and len(started) == 2:
            break
        time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail("the sweep never reached its second cell")
    os.killpg(proc.pid, signal.SIGKILL)  # the sweep and the cell process with it
    proc.wait()
    time.sleep(0.5)
    before = results(sweep)
    assert len(before) == 1 and all(r["status"] == "ok" for r in before.values()), "the killed cell left no result"

    out = qbench(["-m", *FAST, "method=fp32,bf16,bnb_nf4", "run.sweep=k"], runs, cache)
    after = results(sweep)
    assert set(after) == {"tiny__fp32", "tiny__bf16", "tiny__bnb_nf4"}
    assert all(r["status"] == "ok" for r in after.values())
    assert "ran 2, skipped 1" in out.stdout + out.stderr
    first = next(iter(before))
    assert after[first]["attempt_id"] == before[first]["attempt_id"], "the finished cell was not redone"


def test_ctrl_c_stops_cleanly_and_says_what_finished(tmp_path, cache):
    runs = tmp_path / "runs"
    args = ["-m", *FAST, "method=fp32,bf16", "run.sweep=c", f"run.runs_dir={runs}"]
    # SIGINT back to its default in the sweep: a test run started in the background of a script inherits it
    # ignored, and Python then never turns it into KeyboardInterrupt (nor does the cell process, inheriting it)
    proc = subprocess.Popen(QBENCH + args, cwd=REPO, env=env(cache), start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # Ctrl-C once the first cell's process is measuring (its log has the weights line): not while it still
    # imports torch, where an interrupt is a crash of its start-up rather than the stop under test
    deadline = time.time() + 300
    while time.time() < deadline and not any("weights from" in p.read_text() for p in (runs / "c").glob("*/cell.log")):
        assert proc.poll() is None, "the sweep ended before its first cell measured anything"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out[-2000:]
    assert "interrupted" in out
    # the cut cell wrote no result, but its log says how far it got
    (cut,) = [d for d in (runs / "c").iterdir() if d.is_dir() and not (d / "result.json").exists()]
    assert "interrupted: no result written" in (cut / "cell.log").read_text()
    assert "ran" in out and "skipped" in out


@pytest.mark.slow  # whole sweeps of cell processes
def test_two_sweeps_writing_the_same_directory(tmp_path, cache):
    runs = tmp_path / "runs"
    args = ["-m", *FAST, "method=fp32,bf16", "run.sweep=two", f"run.runs_dir={runs}"]
    procs = [subprocess.Popen(QBENCH + args, cwd=REPO, env=env(cache), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    res = results(runs / "two")
    assert set(res) == {"tiny__fp32", "tiny__bf16"}
    assert all(r["status"] == "ok" for r in res.values())
    # each cell was measured once: the other sweep found it done under the slot lock and skipped it
    leftovers = [p.name for p in (runs / "two").rglob("*.tmp")]
    assert not leftovers


@pytest.mark.slow  # whole sweeps of cell processes
def test_parallel_launcher_runs_cells_through_submitit_local(tmp_path, cache):
    runs = tmp_path / "runs"
    proc = qbench(["-m", *FAST, "method=fp32,bf16,bnb_int8", "run.sweep=p", "hydra/launcher=parallel"], runs, cache)
    res = results(runs / "p")
    assert set(res) == {"tiny__fp32", "tiny__bf16", "tiny__bnb_int8"}
    assert all(r["status"] == "ok" for r in res.values()), {k: r.get("error") for k, r in res.items()}
    assert (runs / "p" / ".submitit").is_dir(), "the jobs went through submitit"
    assert "ran 3, skipped 0, failed 0" in proc.stdout + proc.stderr


def test_bad_input_exits_nonzero_with_one_line_and_writes_nothing(tmp_path, cache):
    runs = tmp_path / "runs"
    proc = qbench(["-m", "model=tiny", "method=fp32,nope"], runs, cache, check=False)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("qbench: error")]
    assert len(lines) == 1 and "method/nope" in lines[0]
    assert not runs.exists()


def test_trust_remote_code_stays_off_and_is_recorded(tmp_path, cache):
    runs = tmp_path / "runs"
    qbench([*FAST, "method=fp32", "run.sweep=trc"], runs, cache)
    row = results(runs / "trc")["tiny__fp32"]
    assert row["source"]["trust_remote_code"] is False
    assert row["config"]["model"]["trust_remote_code"] is False


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or 0 not in os.sched_getaffinity(0),
                    reason="needs Linux and CPU 0 among the CPUs this process may use")
def test_cpu_affinity_pins_the_cell_process(tmp_path, cache):
    runs = tmp_path / "runs"
    qbench([*FAST, "method=fp32", "run.sweep=aff", "bench.cpu_affinity=0"], runs, cache)
    row = results(runs / "aff")["tiny__fp32"]
    assert row["status"] == "ok", row.get("error")
    assert row["environment"]["cpu_affinity"] == {"requested": "0", "cpus": [0], "applied": True}
    assert not any("cpu_affinity" in w for w in row["warnings"])


@pytest.mark.slow  # imports GPT-QModel in fresh processes, once per allocator setting
def test_gptqmodel_cannot_change_the_allocator_of_one_methods_cells():
    """GPT-QModel 7.6 sets its own PYTORCH_ALLOC_CONF on import when that one is empty: the cell pins torch's
    default first, and a user's own setting, under either name, is what stays."""
    code = ("import os, sys; from qbench.run import cell; cell.pin_allocator_config(); import gptqmodel.models.auto; "
            "print(os.environ.get('PYTORCH_ALLOC_CONF'))")
    base = {k: v for k, v in os.environ.items() if k not in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")}
    base.update(PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", GPTQMODEL_OFFLINE="1")
    for extra, expected in (({}, "expandable_segments:False"),
                            ({"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}, "expandable_segments:True"),
                            ({"PYTORCH_ALLOC_CONF": "max_split_size_mb:128"}, "max_split_size_mb:128")):
        out = subprocess.run([sys.executable, "-c", code], env={**base, **extra}, capture_output=True, text=True,
                             timeout=300, cwd=REPO)
        assert out.returncode == 0, out.stderr[-3000:]
        assert out.stdout.strip().splitlines()[-1] == expected, (extra, out.stdout[-500:])


def test_lm_evals_loaded_model_notices_stay_out_of_a_cells_warnings():
    """lm-eval says "Passed an already-initialized model" for every task of every cell, because qbench hands it the
    loaded model by design: recorded in library_warnings, not listed in warnings (the report's noisy-figures list);
    a library's other repeated warning still is."""
    import logging

    from qbench.run.cell import OncePerCell

    once = OncePerCell()
    lm_eval = logging.getLogger("lm_eval.models.huggingface")
    bnb = logging.getLogger("bitsandbytes.autograd._functions")
    for _ in range(2):
        for logger, text in ((lm_eval, "`pretrained` model kwarg is not of type `str`. Many other model arguments "
                                       "may be ignored."),
                             (lm_eval, "Passed an already-initialized model through `pretrained`, assuming "
                                       "single-process call to evaluate() or custom distributed integration"),
                             (bnb, "MatMul8bitLt: inputs will be cast from torch.bfloat16 to float16")):
            once.filter(logger.makeRecord(logger.name, logging.WARNING, __file__, 0, text, None, None))
    assert [(r["library"], r["count"]) for r in once.records()] == [("lm_eval", 2), ("lm_eval", 2),
                                                                     ("bitsandbytes", 2)]
    assert once.warnings() == ["bitsandbytes: MatMul8bitLt: inputs will be cast from torch.bfloat16 to float16 "
                               "(logged 2 times, shown once)"]
