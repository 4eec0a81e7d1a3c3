"""GPU spec table: device names map to the right row, unknown GPUs get none, overrides apply."""
from __future__ import annotations

import pytest
import torch

from qbench.measure import gpu_specs, gpu_state


@pytest.mark.parametrize(
    "device_name,row",
    [
        ("NVIDIA H100 80GB HBM3", "H100 SXM"),
        ("NVIDIA H100 PCIe", "H100 PCIe"),
        ("NVIDIA H100 NVL", "H100 NVL"),
        ("NVIDIA H200", "H200"),
        ("NVIDIA H200 NVL", "H200 NVL"),
        ("NVIDIA A100-SXM4-40GB", "A100 40GB SXM"),
        ("NVIDIA A100-SXM4-80GB", "A100 80GB SXM"),
        ("NVIDIA A100-PCIE-40GB", "A100 40GB PCIe"),
        ("NVIDIA A100 80GB PCIe", "A100 80GB PCIe"),
        ("NVIDIA L40S", "L40S"),
        ("NVIDIA A10", "A10"),
        ("NVIDIA L4", "L4"),
        ("Tesla T4", "T4"),
        ("NVIDIA GeForce RTX 4090", "RTX 4090"),
        ("NVIDIA GeForce RTX 3090", "RTX 3090"),
        # unknown: never guessed from a near miss
        ("NVIDIA A10G", None),
        ("NVIDIA L40", None),
        ("NVIDIA GeForce RTX 3090 Ti", None),
        ("NVIDIA GH200 480GB", None),
        ("NVIDIA H100", None),
        ("NVIDIA B200", None),
    ],
)
def test_match(device_name, row):
    assert gpu_specs.match(device_name) == row
    spec = gpu_specs.lookup(device_name)
    assert (spec is None) == (row is None)
    if spec is not None:
        assert spec["name"] == row and spec["device_name"] == device_name


def test_datasheet_figures_dense():
    h100 = gpu_specs.lookup("NVIDIA H100 80GB HBM3")
    assert gpu_specs.bandwidth_bytes_per_s(h100) == 3.35e12
    assert gpu_specs.peak_flops(h100, torch.bfloat16) == 989.5e12  # 1,979 with sparsity, halved
    assert gpu_specs.peak_flops(h100, "float16") == 989.5e12
    assert gpu_specs.peak_flops(h100, "int8") == 1979e12
    h200 = gpu_specs.lookup("NVIDIA H200")
    assert h200["mem_bandwidth_gb_s"] == 4800 and h200["peak_tflops_bf16"] == 989.5
    t4 = gpu_specs.lookup("Tesla T4")
    assert gpu_specs.peak_flops(t4, torch.bfloat16) is None  # Turing has no bf16 tensor cores: null, not a guess
    assert gpu_specs.peak_flops(None, torch.bfloat16) is None
    for row in gpu_specs.SPECS.values():
        assert set(row) == set(gpu_specs.FIELDS)


def test_overrides():
    over = {"H100 SXM": {"mem_bandwidth_gb_s": 3000}, "NVIDIA B200": {"mem_bandwidth_gb_s": 8000, "peak_tflops_bf16": 2250}}
    h100 = gpu_specs.lookup("NVIDIA H100 80GB HBM3", over)
    assert h100["mem_bandwidth_gb_s"] == 3000 and h100["peak_tflops_bf16"] == 989.5
    assert h100["source"] == "datasheet+override"
    b200 = gpu_specs.lookup("NVIDIA B200", over)
    assert b200["mem_bandwidth_gb_s"] == 8000 and b200["peak_tflops_fp32"] is None and b200["source"] == "override"
    assert gpu_specs.lookup("NVIDIA H100 80GB HBM3")["mem_bandwidth_gb_s"] == 3350  # table untouched
    with pytest.raises(ValueError, match="bandwidth_gbs"):
        gpu_specs.lookup("NVIDIA L4", {"L4": {"bandwidth_gbs": 1}})


def test_cpu_has_no_spec_and_no_state():
    assert gpu_specs.for_device("cpu") is None
    assert gpu_state.snapshot("cpu") == {}
    assert gpu_state.total_energy_j("cpu") is None
    assert gpu_state.nvml_used_bytes("cpu") is None


def test_host_cpu_load_from_cpu_times(monkeypatch):
    import collections

    import psutil

    # psutil.cpu_times() on Linux: user nice system idle iowait irq softirq steal guest guest_nice (seconds)
    fields = ["user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal", "guest", "guest_nice"]
    Times = collections.namedtuple("scputimes", fields)
    monkeypatch.setattr(psutil, "cpu_times", lambda: Times(100, 0, 50, 800, 40, 0, 10, 0, 7, 0))
    before = gpu_state.cpu_times()
    assert before == {"user": 100, "nice": 0, "system": 50, "idle": 800, "iowait": 40, "irq": 0, "softirq": 10,
                      "steal": 0}
    monkeypatch.setattr(psutil, "cpu_times", lambda: Times(400, 0, 150, 1200, 40, 0, 10, 200, 99, 0))
    load = gpu_state.host_cpu_load(before, gpu_state.cpu_times())
    # 1000 s went by: 300 user + 100 system + 200 steal busy, 400 idle; guest (already in user) not counted
    assert load["busy_pct"] == pytest.approx(60.0) and load["steal_pct"] == pytest.approx(20.0)
    assert load["cpu_count"] >= 1
    assert gpu_state.host_cpu_load(None, before) == {} and gpu_state.host_cpu_load(before, before) == {}
    # macOS reports no steal: null, not a guessed 0
    Mac = collections.namedtuple("scputimes", "user nice system idle")
    monkeypatch.setattr(psutil, "cpu_times", lambda: Mac(10, 0, 10, 80))
    mac_before = gpu_state.cpu_times()
    monkeypatch.setattr(psutil, "cpu_times", lambda: Mac(40, 0, 20, 140))
    mac = gpu_state.host_cpu_load(mac_before, gpu_state.cpu_times())
    assert mac["busy_pct"] == pytest.approx(40.0) and mac["steal_pct"] is None

    def unreadable():
        raise OSError("no /proc")
    monkeypatch.setattr(psutil, "cpu_times", unreadable)
    assert gpu_state.cpu_times() is None


@pytest.mark.gpu
def test_gpu_state_on_gpu():
    snap = gpu_state.snapshot("cuda")
    assert snap["gpus"][0]["index"] == 0
    g = snap["gpus"][0]
    assert g["name"] and g["sm_clock_mhz"] and g["memory_total_bytes"] > 0
    assert isinstance(g["other_processes"], list)
    e = gpu_state.total_energy_j("cuda")
    assert e is None or e > 0
