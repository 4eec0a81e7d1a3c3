"""bench.cpu_affinity: cpulist parsing, NVML's GPU-local CPUs, and pinning that falls back to unpinned with a warning.

Nothing here pins the test process: os.sched_setaffinity is replaced by a recorder."""
from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

from qbench.measure import cpu_affinity, gpu_state


@pytest.mark.parametrize("text,cpus", [("0-3,8", [0, 1, 2, 3, 8]), ("2", [2]), (2, [2]), (" 5 , 1-2", [1, 2, 5]),
                                       ("3,3,2-3", [2, 3])])
def test_parse_cpulist(text, cpus):
    assert cpu_affinity.parse_cpulist(text) == cpus
    assert cpu_affinity.parse_cpulist(cpu_affinity.format_cpulist(cpus)) == cpus


@pytest.mark.parametrize("text", ["", "a", "0-", "-1", "3-1", "0,,1", "0-3:2", "1.5", "0-99999999", "True"])
def test_parse_cpulist_rejects_malformed(text):
    with pytest.raises(ValueError):
        cpu_affinity.parse_cpulist(text)


def test_cpus_from_bitmask():
    assert cpu_affinity.cpus_from_bitmask([0b1111_0000]) == {4, 5, 6, 7}
    assert cpu_affinity.cpus_from_bitmask([0b1, 0b10]) == {0, 65}


@pytest.fixture
def fake_host(monkeypatch):
    """A host with CPUs 0-7 allowed and two GPUs: NVML index 0 local to CPUs 4-7, index 1 to CPUs 8-11.
    Returns the list of sets handed to sched_setaffinity."""
    words = {0: [0b1111_0000], 1: [0b1111_0000_0000]}
    fake_nvml = SimpleNamespace(
        nvmlDeviceGetCount=lambda: 2,
        nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetHandleByUUID=lambda uuid: {"GPU-b": 1}[uuid],
        nvmlDeviceGetCpuAffinity=lambda handle, n_words: words[handle],
    )
    monkeypatch.setattr(gpu_state, "nvml", lambda: fake_nvml)
    allowed = set(range(8))
    pinned = []

    def set_affinity(pid, cpus):
        pinned.append(set(cpus))
        allowed.intersection_update(cpus)  # as the kernel would, so the record reads the CPUs in effect

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(allowed), raising=False)
    monkeypatch.setattr(os, "sched_setaffinity", set_affinity, raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    return pinned


def test_gpu_local_is_the_union_over_the_cells_gpus(fake_host, monkeypatch):
    assert cpu_affinity.gpu_local_cpus(1) == {4, 5, 6, 7}
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,GPU-b")  # a UUID entry, as a user may set it
    assert cpu_affinity.gpu_local_cpus(2) == set(range(4, 12))


def test_gpu_local_is_intersected_with_the_allowed_cpus(fake_host, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    record, warning = cpu_affinity.apply_cpu_affinity("gpu_local", num_gpus=2)
    assert warning is None
    assert fake_host == [{4, 5, 6, 7}]  # 8-11 are local to GPU 1 but not the process's to use
    assert record == {"requested": "gpu_local", "cpus": [4, 5, 6, 7], "applied": True}


def test_cpulist_is_applied(fake_host):
    record, warning = cpu_affinity.apply_cpu_affinity("1-2,5", num_gpus=1)
    assert warning is None and fake_host == [{1, 2, 5}]
    assert record == {"requested": "1-2,5", "cpus": [1, 2, 5], "applied": True}


def test_null_pins_nothing_but_records_the_cpus(fake_host):
    record, warning = cpu_affinity.apply_cpu_affinity(None, num_gpus=1)
    assert warning is None and fake_host == []
    assert record == {"requested": None, "cpus": list(range(8)), "applied": False}


def _no_nvml(monkeypatch):
    monkeypatch.setattr(gpu_state, "nvml", lambda: None)


def _no_sched_setaffinity(monkeypatch):
    monkeypatch.delattr(os, "sched_setaffinity")


@pytest.mark.parametrize("requested,env,setup,reason", [
    ("gpu_local", "", None, "no GPU"),                        # a CPU cell: qbench.run.cli masks every GPU
    ("gpu_local", "0", _no_nvml, "NVML"),                      # no driver
    ("gpu_local", "1", None, "none of those this process may use"),  # GPU 1's CPUs 8-11 are not allowed
    ("6-9", "0", None, "8-9 are not among"),                   # partly outside the allowed CPUs
    ("0", "0", _no_sched_setaffinity, "sched_setaffinity"),    # macOS
])
def test_not_applicable_warns_and_leaves_the_process_unpinned(fake_host, monkeypatch, requested, env, setup, reason):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", env)
    if setup:
        setup(monkeypatch)
    record, warning = cpu_affinity.apply_cpu_affinity(requested, num_gpus=1)
    assert fake_host == []
    assert record == {"requested": requested, "cpus": list(range(8)), "applied": False}
    assert warning.startswith(f"bench.cpu_affinity={requested} not applied") and reason in warning, warning


def test_an_nvml_error_warns_instead_of_crashing(fake_host, monkeypatch):
    def unsupported(handle, n_words):
        raise RuntimeError("NVMLError_NotSupported")

    monkeypatch.setattr(gpu_state.nvml(), "nvmlDeviceGetCpuAffinity", unsupported)
    record, warning = cpu_affinity.apply_cpu_affinity("gpu_local", num_gpus=1)
    assert not record["applied"] and "NotSupported" in warning and fake_host == []
