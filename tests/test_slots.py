"""GPU slots: cells started at once by a parallel launcher take disjoint GPUs, one group per cell."""
from __future__ import annotations

import multiprocessing as mp
import time

import pytest

from qbench.cli import acquire_slot
from qbench.config import ConfigError


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
    locks, _ = acquire_slot(1, True, slot_dir)
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
