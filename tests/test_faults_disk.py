"""Faults after preflight: the disk fills up, a path has the wrong type, the host runs out of memory. Each ends
the cell (or the sweep) with one line, the summary line and exit 1; never a traceback on the console, a
0-byte file or a lost error row where the disk still takes one."""
from __future__ import annotations

import errno
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from qbench.run import cell, cell_process, cli
from qbench.store import jsonio, layout

REPO = Path(__file__).resolve().parent.parent
QBENCH = [sys.executable, "-m", "qbench"]
FAST = ["model=tiny", "bench=quick", "bench.batch_sizes=[1]", "bench.device=cpu"]


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


# ----------------------------------------------------------------------------------------------- writers
def test_a_full_disk_leaves_the_old_file_and_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "result.json"
    jsonio.write_json_atomic(path, {"status": "ok"})
    monkeypatch.setattr(os, "fsync", _enospc)  # the data did not reach the disk
    for write in (lambda: jsonio.write_json_atomic(path, {"status": "error"}),
                  lambda: jsonio.write_text_atomic(tmp_path / "config.yaml", "a: 1\n")):
        with pytest.raises(OSError) as info:
            write()
        assert info.value.errno == errno.ENOSPC
    assert json.loads(path.read_text()) == {"status": "ok"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"], "no 0-byte file, no temp file"


# ----------------------------------------------------------------------------------------------- the cell process
def _spec(tmp_path: Path) -> Path:
    cell_dir = tmp_path / "runs" / "s" / "tiny__bf16"
    spec = cell_dir / ".attempt" / "spec.json"
    spec.parent.mkdir(parents=True)
    spec.write_text(json.dumps({"attempt_id": "a1", "config": {}, "device_keys": []}))
    return spec


def test_cell_whose_result_cannot_be_written_says_so_in_one_line(tmp_path, monkeypatch, capsys):
    spec = _spec(tmp_path)
    monkeypatch.setattr(cell, "run", lambda s: {"status": "ok", "warnings": [], "error": None})
    monkeypatch.setattr(jsonio, "write_result", _enospc)
    monkeypatch.setattr(logging, "basicConfig", lambda **kw: None)  # pytest's capture stands in for the console
    root = logging.getLogger()
    handlers = list(root.handlers)
    signals = {s: signal.getsignal(s) for s in (*cell.STOP_SIGNALS, signal.SIGUSR2)}
    try:
        rc = cell.main([str(spec)])
    finally:  # cell.main sets up a process of its own: give pytest's back
        for h in root.handlers[:]:
            if h not in handlers:
                root.removeHandler(h)
                h.close()
        for s, handler in signals.items():
            signal.signal(s, handler)
        logging.raiseExceptions = True
    assert rc == cell.EXIT_UNWRITTEN
    assert cell_process._child_fault(rc)[0] == "filesystem"
    err = capsys.readouterr().err
    assert "Traceback" not in err
    cell_log = (spec.parent.parent / "cell.log").read_text()
    assert "result not written" in cell_log and "No space left on device" in cell_log
    assert "Traceback" in cell_log, "the traceback stays in cell.log"


@pytest.mark.parametrize("text", [
    "DefaultCPUAllocator: can't allocate memory: you tried to allocate 10737418240 bytes. Error code 12",
    "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough memory: you tried to allocate 8 bytes.",
    "std::bad_alloc",
])
def test_host_allocation_failures_are_oom(text):
    assert cell.classify(RuntimeError(text)) == "oom"


def test_numpy_and_os_allocation_failures_are_oom():
    with pytest.raises(MemoryError) as info:
        np.empty(2**62, dtype=np.uint8)  # numpy's _ArrayMemoryError
    assert cell.classify(info.value) == "oom"
    assert cell.classify(OSError(errno.ENOMEM, os.strerror(errno.ENOMEM))) == "oom"


def test_filesystem_faults_have_a_class_of_their_own():
    assert cell.classify(OSError(errno.ENOSPC, "No space left on device")) == "filesystem"
    assert cell.classify(NotADirectoryError(errno.ENOTDIR, "Not a directory")) == "filesystem"
    assert cell.classify(OSError(errno.ENAMETOOLONG, "File name too long")) == "filesystem"


# ----------------------------------------------------------------------------------------------- the sweep
def _cfg(tmp_path: Path):
    from hydra import compose, initialize_config_dir

    from qbench.run import preflight as pf

    pf.register_configs()
    with initialize_config_dir(config_dir=cli.conf_dir(), version_base="1.3"):
        return compose(config_name="config", overrides=[*FAST, "method=bf16", "run.sweep=s",
                                                        f"run.runs_dir={tmp_path / 'runs'}"])


def test_a_full_disk_before_the_cell_starts_is_an_error_of_that_cell(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("QBENCH_LOCK_DIR", str(tmp_path / "locks"))
    cfg = _cfg(tmp_path)
    writes = []

    def spec_fails(path, data):  # the spec cannot be written; the error row after it can
        writes.append(Path(path).name)
        if Path(path).name == "spec.json":
            _enospc()
        return real(path, data)

    real = jsonio.write_json_atomic
    monkeypatch.setattr(jsonio, "write_json_atomic", spec_fails)
    with caplog.at_level(logging.ERROR, logger="qbench"):
        assert cli.run_cell(cfg) == "error"
    row = jsonio.read_result(layout.cell_dir(cfg))
    assert row["status"] == "error" and row["error"]["class"] == "filesystem"
    assert "No space left on device" in row["error"]["message"]
    lines = [r.getMessage() for r in caplog.records if r.name == "qbench"]
    assert any(ln.startswith("tiny__bf16: error (filesystem)") for ln in lines), lines


def test_a_full_disk_that_refuses_the_error_row_too_is_one_line(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("QBENCH_LOCK_DIR", str(tmp_path / "locks"))
    cfg = _cfg(tmp_path)
    monkeypatch.setattr(jsonio, "write_json_atomic", _enospc)
    with caplog.at_level(logging.ERROR, logger="qbench"):
        assert cli.run_cell(cfg) == "error"
    assert jsonio.read_result(layout.cell_dir(cfg)) is None
    assert any("error row could not be written" in r.getMessage() for r in caplog.records)


def test_a_file_where_the_sweep_folder_should_be_ends_with_one_line_and_the_summary(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "s").write_text("not a folder")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(REPO),
           "QBENCH_LOCK_DIR": str(tmp_path / "locks")}
    proc = subprocess.run(QBENCH + ["-m", *FAST, "method=fp32,bf16", "run.sweep=s", f"run.runs_dir={runs}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("qbench: error:")]
    assert len(errors) == 1 and str(runs / "s") in errors[0], proc.stderr[-3000:]
    assert f"qbench: {runs / 's'}: 2 cells: ran 0, skipped 0, failed 0, 2 without a result" in proc.stderr
    assert (runs / "s").read_text() == "not a folder"


def test_rounds_combine_on_a_full_disk_leaves_no_half_quality_file(tmp_path, monkeypatch):
    from qbench.run import rounds

    cell_dir = tmp_path / "tiny__bf16"
    for k in (1, 2):
        jsonio.write_result(layout.round_dir(cell_dir, k), {"status": "ok", "metrics": {}, "warnings": []})
    (layout.round_dir(cell_dir, 1) / "quality_logprobs.npz").write_bytes(b"x" * 4096)

    def half_copy(src, dest, *a, **kw):  # the disk fills up halfway through
        Path(dest).write_bytes(Path(src).read_bytes()[:100])
        _enospc()

    monkeypatch.setattr(rounds.shutil, "copy2", half_copy)
    with pytest.raises(OSError):
        rounds.combine(cell_dir, 2)
    assert [p.name for p in cell_dir.iterdir() if p.is_file()] == [], "no half file beside the result"


@pytest.mark.parametrize("override, key", [("method.name=" + "m" * 300, "model.name / method.name"),
                                           ("run.sweep=" + "s" * 300, "run.sweep")])
def test_a_name_the_filesystem_refuses_stops_at_preflight(tmp_path, override, key):
    runs = tmp_path / "runs"
    env = {**os.environ, "PYTHONPATH": str(REPO), "QBENCH_LOCK_DIR": str(tmp_path / "locks")}
    proc = subprocess.run(QBENCH + [*FAST, "method=bf16", override, f"run.runs_dir={runs}"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("qbench: error")]
    assert line.startswith(f"qbench: error: {key}:") and "at most 255" in line
    assert not runs.exists()
