"""GPU slots: cells started at once by a parallel launcher take disjoint GPUs, one group per cell."""
from __future__ import annotations

import multiprocessing as mp
import time

import pytest

from qbench.errors import ConfigError
from qbench.run.slots import acquire_slot


def test_cells_take_disjoint_gpu_groups(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    first, gpus_a = acquire_slot(2, True, tmp_path)
    second, gpus_b = acquire_slot(2, True, tmp_path)
    assert sorted(gpus_a + gpus_b) == ["0", "1", "2", "3"]
    assert set(gpus_a).isdisjoint(gpus_b)
    for f in first:
        f.close()
    third, gpus_c = acquire_slot(2, True, tmp_path)  # the freed group is taken again
    assert gpus_c == gpus_a
    for f in second + third:
        f.close()


def _hold(slot_dir, seconds):
    import os

    os.environ["CUDA_VISIBLE_DEVICES"] = "5"
    _locks, _ = acquire_slot(1, True, slot_dir)
    time.sleep(seconds)


def test_a_cell_waits_until_the_gpu_is_free(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5")
    holder = mp.get_context("fork").Process(target=_hold, args=(tmp_path, 1.5))
    holder.start()
    time.sleep(0.5)
    t0 = time.time()
    locks, gpus = acquire_slot(1, True, tmp_path, poll_s=0.1)
    waited = time.time() - t0
    holder.join()
    assert gpus == ["5"]
    assert waited > 0.5, "took a GPU another cell held"
    for f in locks:
        f.close()


def test_more_gpus_than_visible_is_bad_input(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    with pytest.raises(ConfigError, match="model.num_gpus: 2"):
        acquire_slot(2, True, tmp_path)


def test_cpu_cells_share_one_slot_in_turn(tmp_path):
    first, gpus = acquire_slot(1, False, tmp_path)
    assert gpus == []
    assert any(p.name.endswith("-cpu.lock") for p in tmp_path.iterdir())
    for f in first:
        f.close()


def _hold_from(cwd, seconds, ready):
    import os

    os.chdir(cwd)  # another sweep, started from another directory, with its own cache
    os.environ["CUDA_VISIBLE_DEVICES"] = "7"
    os.environ["QBENCH_CACHE"] = str(cwd)
    _locks, _ = acquire_slot(1, True)
    ready.set()
    time.sleep(seconds)


def test_slots_are_per_host_and_device_whatever_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("QBENCH_LOCK_DIR", str(tmp_path / "locks"))  # the per-host folder, kept out of /tmp here
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    ctx = mp.get_context("fork")
    ready = ctx.Event()
    holder = ctx.Process(target=_hold_from, args=(tmp_path / "a", 1.5, ready))
    holder.start()
    assert ready.wait(30)
    monkeypatch.chdir(tmp_path / "b")
    monkeypatch.setenv("QBENCH_CACHE", str(tmp_path / "b"))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "7")
    t0 = time.time()
    locks, gpus = acquire_slot(1, True, poll_s=0.1)
    waited = time.time() - t0
    holder.join()
    assert gpus == ["7"] and waited > 0.5, "a sweep from another directory took a GPU another sweep held"
    for f in locks:
        f.close()


def test_default_lock_dir_does_not_depend_on_cwd_or_cache(tmp_path, monkeypatch):
    from qbench.measure.gpu_state import lock_dir

    monkeypatch.delenv("QBENCH_LOCK_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("QBENCH_CACHE", str(tmp_path / "c1"))
    first = lock_dir()
    monkeypatch.chdir("/")
    monkeypatch.setenv("QBENCH_CACHE", str(tmp_path / "c2"))
    assert lock_dir() == first and first.is_absolute() and tmp_path not in first.parents


def test_device_watch_sees_an_overlapping_measuring_process_both_ways(tmp_path):
    from qbench.measure.gpu_state import DeviceWatch

    with DeviceWatch(["host-gpu-GPU-1234"], root=tmp_path) as first:
        with DeviceWatch(["host-gpu-GPU-1234"], root=tmp_path) as second:
            later = second.report()
        # the second one ended before the first one's end: the first still learns of it
        earlier = first.report()
    assert later["shared"] and earlier["shared"]
    assert earlier["other_measuring_processes"] == [second.name]
    with DeviceWatch(["host-gpu-GPU-1234"], root=tmp_path) as alone:
        assert alone.report() == {"shared": False, "other_measuring_processes": [], "devices": ["host-gpu-GPU-1234"]}
    with DeviceWatch(["host-gpu-GPU-1234"], root=tmp_path) as a, DeviceWatch(["host-gpu-GPU-9"], root=tmp_path) as b:
        assert not a.report()["shared"] and not b.report()["shared"]  # other device: no overlap


def test_device_watch_that_cannot_register_still_lets_the_cell_run(tmp_path):
    from qbench.measure.gpu_state import DeviceWatch

    (tmp_path / "measuring").write_text("a file where the registry folder should be")
    with DeviceWatch(["h-cpu"], root=tmp_path) as watch:
        report = watch.report()
    assert report["shared"] is None and "error" in report
