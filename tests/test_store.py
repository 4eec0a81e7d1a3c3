"""result.json: atomic writes, skip-if-done, secrets kept out, environment recorded."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
from pathlib import Path

import pytest

from qbench.store import environment, jsonio, locks, rerun


def test_atomic_write_leaves_old_file_or_new_one(tmp_path, monkeypatch):
    path = tmp_path / "cell" / "result.json"
    jsonio.write_json_atomic(path, {"status": "ok", "n": 1})

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(jsonio.os, "replace", boom)
    with pytest.raises(OSError):
        jsonio.write_json_atomic(path, {"status": "error", "n": 2})
    assert json.loads(path.read_text()) == {"status": "ok", "n": 1}
    assert [p.name for p in path.parent.iterdir()] == ["result.json"], "temp file left behind"


def _writer(path, i):
    for _ in range(50):
        jsonio.write_json_atomic(path, {"writer": i, "payload": "x" * 20000})


def test_concurrent_writers_never_leave_a_torn_file(tmp_path):
    path = tmp_path / "result.json"
    procs = [mp.get_context("fork").Process(target=_writer, args=(path, i)) for i in range(3)]
    for p in procs:
        p.start()
    for _ in range(200):
        if path.exists():
            data = json.loads(path.read_text())  # never a partial document
            assert len(data["payload"]) == 20000
    for p in procs:
        p.join()
        assert p.exitcode == 0


@pytest.mark.parametrize(
    "status,force,rerun_failed,expected",
    [
        ("ok", False, False, "ok"),
        ("ok", False, True, "ok"),
        ("ok", True, False, None),
        ("error", False, False, "error"),
        ("error", False, True, None),
        ("error", True, False, None),
        (None, False, False, None),
    ],
)
def test_should_skip(tmp_path, status, force, rerun_failed, expected):
    if status is not None:
        jsonio.write_result(tmp_path, {"status": status})
    assert rerun.should_skip(tmp_path, force, rerun_failed) == expected


def test_unreadable_result_is_not_done(tmp_path):
    (tmp_path / "result.json").write_text('{"status": "ok"')  # truncated by hand
    assert rerun.should_skip(tmp_path, False, False) is None


def test_secrets_are_redacted(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_abcdefghijklmnop")
    jsonio.write_result(tmp_path, {"status": "error", "error": {"message": "401 for token hf_abcdefghijklmnop"}})
    text = (tmp_path / "result.json").read_text()
    assert "hf_abcdefghijklmnop" not in text
    assert "<redacted>" in text


def test_nan_becomes_null(tmp_path):
    jsonio.write_result(tmp_path, {"status": "ok", "x": float("nan"), "y": [float("inf"), 1.0]})
    data = json.loads((tmp_path / "result.json").read_text())
    assert data["x"] is None and data["y"] == [None, 1.0]


def test_environment_has_versions_and_no_env_vars(monkeypatch):
    monkeypatch.setenv("SOME_SECRET_TOKEN", "s3cr3t-value-123")
    env = environment.environment()
    assert env["versions"]["torch"]
    assert env["versions"]["transformers"]
    assert env["python"]
    assert "s3cr3t-value-123" not in json.dumps(env)


def test_file_lock_is_released_when_holder_is_killed(tmp_path):
    import signal
    import time

    lock = tmp_path / "x.lock"

    def hold():
        with locks.file_lock(lock):
            time.sleep(60)

    p = mp.get_context("fork").Process(target=hold)
    p.start()
    time.sleep(0.5)
    os.kill(p.pid, signal.SIGKILL)
    p.join()
    t0 = time.time()
    with locks.file_lock(lock):
        pass
    assert time.time() - t0 < 5


def test_error_message_is_the_cause_in_one_line():
    from qbench.store.rows import error_message

    tail = ('s/threadx.py", line 311, in run\n    result = fn(*args)\n' * 50
            + "ValueError: Expected in_features (576) to be divisible by group_size (128)")
    msg = error_message(RuntimeError(f"gptq quantization of /m failed (exit code 1): {tail}"))
    assert msg == ("gptq quantization of /m failed (exit code 1): "
                   "ValueError: Expected in_features (576) to be divisible by group_size (128)")
    assert error_message(RuntimeError("Traceback (most recent call last):\n  File x\nKeyError: 'a'")) == "KeyError: 'a'"
    assert error_message(ValueError("plain")) == "plain"
    assert "\n" not in error_message(ValueError("first line\nsecond line"))
    assert len(error_message(ValueError("x" * 10000))) <= 500


def test_the_cell_id_has_one_owner_and_reads_back():
    from omegaconf import OmegaConf

    from qbench.store import layout

    cfg = {"model": {"name": "smollm2_135m"}, "method": {"name": "gptq_4bit"}}
    assert layout.cell_id(cfg) == "smollm2_135m__gptq_4bit"
    assert layout.parse_cell_id(layout.cell_id(cfg)) == ("smollm2_135m", "gptq_4bit")
    assert layout.parse_cell_id("stray_folder") == ("stray_folder", "")
    # conf/config.yaml names Hydra's folder through the same function, not a copy of the format
    node = OmegaConf.create({**cfg, "dir": "runs/${qbench.cell_id:}"})
    assert node.dir == "runs/smollm2_135m__gptq_4bit"
    assert "${qbench.cell_id:}" in (Path(__file__).resolve().parents[1] / "conf" / "config.yaml").read_text()
