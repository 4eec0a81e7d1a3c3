"""What the GPUs were doing around a cell: clocks, temperature, power, throttling, other processes (NVML);
and how busy the host's CPUs were, because eager decode is launch-bound and a shared host's load shows up
directly in tokens/s.

Read-only: nothing here changes a GPU setting (no clock locking, no persistence mode, no power limits). A
figure NVML does not support on a board is null. On a machine without NVML (CPU) everything is {}.
"""
from __future__ import annotations

import contextlib
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

_NVML_READY: Optional[bool] = None


def nvml():
    """The pynvml module, initialised once; None where NVML is missing (no driver, CPU machine)."""
    global _NVML_READY
    if _NVML_READY is False:
        return None
    try:
        import pynvml

        if not _NVML_READY:
            pynvml.nvmlInit()
            _NVML_READY = True
        return pynvml
    except Exception:
        _NVML_READY = False
        return None


def _safe(fn, *args, scale: float = 1.0):
    try:
        value = fn(*args)
    except Exception:  # NVMLError_NotSupported and friends: the board does not report it
        return None
    if isinstance(value, bytes):
        return value.decode()
    return value * scale if scale != 1.0 and value is not None else value


def visible_gpus() -> List[str]:
    """Physical GPU ids this process may use: CUDA_VISIBLE_DEVICES, else every GPU NVML sees (none without NVML)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g for g in env.split(",") if g.strip() not in ("", "-1")]
    pynvml = nvml()
    try:
        return [str(i) for i in range(pynvml.nvmlDeviceGetCount())] if pynvml is not None else []
    except Exception:
        return []


def nvml_handle(cuda_index: int):
    """NVML handle of the CUDA device ``cuda_index`` as torch numbers it (after CUDA_VISIBLE_DEVICES).

    NVML numbers all GPUs of the host, so CUDA index 0 may be NVML index 3: match by UUID, then by PCI bus
    id, then by CUDA_VISIBLE_DEVICES, then (no mask) by index.
    """
    pynvml = nvml()
    if pynvml is None:
        return None
    try:
        import torch

        props = torch.cuda.get_device_properties(cuda_index)
        uuid = str(getattr(props, "uuid", "") or "")
        if uuid:
            return pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}")
    except Exception:
        pass
    try:
        import torch

        props = torch.cuda.get_device_properties(cuda_index)
        bus = f"{props.pci_domain_id:08x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
        return pynvml.nvmlDeviceGetHandleByPciBusId(bus)
    except Exception:
        pass
    return nvml_handle_from_mask(cuda_index)


def nvml_handle_from_mask(cuda_index: int):
    """NVML handle of the CUDA device ``cuda_index`` read from CUDA_VISIBLE_DEVICES alone, without torch (so
    usable before CUDA initialises); None where NVML has none. A numeric mask means NVML's numbering only
    under CUDA_DEVICE_ORDER=PCI_BUS_ID, which qbench.run.cli sets for every cell."""
    pynvml = nvml()
    if pynvml is None:
        return None
    mask = os.environ.get("CUDA_VISIBLE_DEVICES")
    try:
        if mask:
            entry = mask.split(",")[cuda_index].strip()
            if entry.isdigit():
                return pynvml.nvmlDeviceGetHandleByIndex(int(entry))
            return pynvml.nvmlDeviceGetHandleByUUID(entry)
        return pynvml.nvmlDeviceGetHandleByIndex(cuda_index)
    except Exception:
        return None


def _reasons(pynvml, handle) -> Optional[List[str]]:
    """Names of the active clock-event (throttle) reasons, e.g. ["SwThermalSlowdown"]."""
    getter = getattr(pynvml, "nvmlDeviceGetCurrentClocksEventReasons", None) or getattr(
        pynvml, "nvmlDeviceGetCurrentClocksThrottleReasons", None
    )
    if getter is None:
        return None
    mask = _safe(getter, handle)
    if mask is None:
        return None
    names = []
    for attr in dir(pynvml):
        for prefix in ("nvmlClocksEventReason", "nvmlClocksThrottleReason"):
            if attr.startswith(prefix) and attr[len(prefix):] not in ("All", "None"):
                bit = getattr(pynvml, attr)
                if isinstance(bit, int) and bit and mask & bit and attr[len(prefix):] not in names:
                    names.append(attr[len(prefix):])
    return sorted(names)


def _processes(pynvml, handle) -> Optional[List[Dict[str, Any]]]:
    """Compute and graphics processes on the GPU other than this one (pid as NVML sees it: inside a container
    the host pid differs from os.getpid(), so this process may appear here too)."""
    seen: Dict[int, Dict[str, Any]] = {}
    ok = False
    for name in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
        fn = getattr(pynvml, name, None)
        procs = _safe(fn, handle) if fn else None
        if procs is None:
            continue
        ok = True
        for p in procs:
            if p.pid == os.getpid():
                continue
            used = getattr(p, "usedGpuMemory", None)
            seen[p.pid] = {"pid": p.pid, "used_memory_bytes": used if isinstance(used, int) and used < 2**63 else None}
    return list(seen.values()) if ok else None


def gpu_snapshot(cuda_index: int) -> Dict[str, Any]:
    pynvml = nvml()
    handle = nvml_handle(cuda_index)
    if pynvml is None or handle is None:
        return {"index": cuda_index, "nvml": False}
    mem = _safe(pynvml.nvmlDeviceGetMemoryInfo, handle)
    util = _safe(pynvml.nvmlDeviceGetUtilizationRates, handle)
    return {
        "index": cuda_index,
        "name": _safe(pynvml.nvmlDeviceGetName, handle),
        "uuid": _safe(pynvml.nvmlDeviceGetUUID, handle),
        "sm_clock_mhz": _safe(pynvml.nvmlDeviceGetClockInfo, handle, pynvml.NVML_CLOCK_SM),
        "mem_clock_mhz": _safe(pynvml.nvmlDeviceGetClockInfo, handle, pynvml.NVML_CLOCK_MEM),
        "sm_clock_max_mhz": _safe(pynvml.nvmlDeviceGetMaxClockInfo, handle, pynvml.NVML_CLOCK_SM),
        "mem_clock_max_mhz": _safe(pynvml.nvmlDeviceGetMaxClockInfo, handle, pynvml.NVML_CLOCK_MEM),
        "temperature_c": _safe(pynvml.nvmlDeviceGetTemperature, handle, pynvml.NVML_TEMPERATURE_GPU),
        "power_draw_w": _safe(pynvml.nvmlDeviceGetPowerUsage, handle, scale=1e-3),  # NVML: milliwatts
        "power_limit_w": _safe(pynvml.nvmlDeviceGetEnforcedPowerLimit, handle, scale=1e-3),
        "performance_state": _safe(pynvml.nvmlDeviceGetPerformanceState, handle),
        "clock_event_reasons": _reasons(pynvml, handle),
        "utilization_gpu_pct": getattr(util, "gpu", None),
        "memory_used_bytes": getattr(mem, "used", None),
        "memory_total_bytes": getattr(mem, "total", None),
        "other_processes": _processes(pynvml, handle),
    }


def cuda_indices(device: Any, indices: Optional[List[int]] = None) -> List[int]:
    if not str(device).startswith("cuda"):
        return []
    import torch

    if not torch.cuda.is_available():
        return []
    return list(indices) if indices is not None else list(range(torch.cuda.device_count()))


def snapshot(device: Any, indices: Optional[List[int]] = None) -> Dict[str, Any]:
    """State of the GPUs the cell uses: ``{"gpus": [per-GPU dict]}``; {} on CPU or without NVML."""
    idx = cuda_indices(device, indices)
    if not idx or nvml() is None:
        return {}
    return {"gpus": [gpu_snapshot(i) for i in idx]}


def _sum_over_gpus(device: Any, indices: Optional[List[int]], read) -> Optional[float]:
    """Sum ``read(pynvml, handle)`` over the cell's GPUs; None if NVML or any GPU's reading is missing."""
    idx = cuda_indices(device, indices)
    pynvml = nvml()
    if not idx or pynvml is None:
        return None
    total = 0.0
    for i in idx:
        handle = nvml_handle(i)
        value = _safe(read, pynvml, handle) if handle is not None else None
        if value is None:
            return None
        total += value
    return total


def total_energy_j(device: Any, indices: Optional[List[int]] = None) -> Optional[float]:
    """Sum over the GPUs of NVML's total energy counter (joules since the driver loaded); None where the
    counter is missing (pre-Volta boards, CPU). Differences of two reads give the energy in between."""
    # NVML counts millijoules
    return _sum_over_gpus(device, indices, lambda nv, h: nv.nvmlDeviceGetTotalEnergyConsumption(h) * 1e-3)


def nvml_used_bytes(device: Any, indices: Optional[List[int]] = None) -> Optional[int]:
    """Device memory used as NVML reports it (all processes, the CUDA context included), summed over GPUs."""
    total = _sum_over_gpus(device, indices, lambda nv, h: nv.nvmlDeviceGetMemoryInfo(h).used)
    return None if total is None else int(total)


# Linux counts guest time inside user and nice as well, so it is left out of the total.
_COUNTED_TWICE = ("guest", "guest_nice")


def cpu_times() -> Optional[Dict[str, float]]:
    """The host's cumulative CPU time by kind (seconds, all CPUs) from psutil; None where it cannot be read.
    The kinds are the OS's: Linux has iowait and steal, macOS only user, nice, system and idle."""
    try:
        import psutil

        times = psutil.cpu_times()._asdict()
    except Exception:  # no psutil, or an OS it cannot read: provenance is optional
        return None
    return {k: v for k, v in times.items() if k not in _COUNTED_TWICE}


def host_cpu_load(before: Optional[Dict[str, float]], after: Optional[Dict[str, float]]) -> Dict[str, Any]:
    """Share of the host's CPU time that was busy and stolen (by the hypervisor) between two ``cpu_times``
    reads, in percent of all CPUs, with the 1-minute load average; {} where the times are missing, and
    steal_pct null where the OS does not report steal. The measuring process itself keeps about one CPU busy,
    i.e. 100 / cpu_count percent."""
    if not before or not after:
        return {}
    delta = {k: after[k] - before[k] for k in before if k in after}
    total = sum(delta.values())
    if total <= 0:
        return {}
    idle = delta.get("idle", 0.0) + delta.get("iowait", 0.0)
    try:
        load_1m = round(os.getloadavg()[0], 2)
    except OSError:
        load_1m = None
    return {"busy_pct": 100.0 * (total - idle) / total,
            "steal_pct": 100.0 * delta["steal"] / total if "steal" in delta else None,
            "cpu_count": os.cpu_count(), "loadavg_1m": load_1m}


# ---------------------------------------------------------------------------------------------------------
# Which process measures on which device, host-wide


def lock_dir() -> Path:
    """Where GPU/CPU slot locks and the measuring registry live: $QBENCH_LOCK_DIR, else one fixed folder per
    host (/tmp/qbench-locks), never a path relative to where qbench started, so that sweeps started from
    different directories (or with different caches) still take turns on a device. The folder is sticky and
    world-writable like /tmp itself, so two users' sweeps see each other's locks too; where another user made
    it unusable, a folder per user is the fallback."""
    env = os.environ.get("QBENCH_LOCK_DIR")
    if env:
        return Path(env).expanduser()
    shared = Path(tempfile.gettempdir()) / "qbench-locks"
    try:
        shared.mkdir(mode=0o1777, exist_ok=True)
        if shared.stat().st_uid == os.getuid():
            os.chmod(shared, 0o1777)  # mkdir's mode is cut by the umask
        if os.access(shared, os.W_OK | os.X_OK) and not shared.is_symlink():
            return shared
    except OSError:
        pass
    return Path(tempfile.gettempdir()) / f"qbench-locks-{os.getuid()}"


def open_lock_file(path: Path):
    """A file to flock, readable by every user (flock needs no write access, so another user's cell can lock
    a file this one created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)
    return os.fdopen(fd, "rb")


def gpu_uuid(gpu: str) -> str:
    """A stable name of a physical GPU: its UUID from NVML (an index, as CUDA_VISIBLE_DEVICES under
    PCI_BUS_ID order gives it, otherwise), so two lock names never mean one device."""
    if gpu.startswith(("GPU-", "MIG-")):
        return gpu
    pynvml = nvml()
    if pynvml is not None and gpu.isdigit():
        uuid = _safe(pynvml.nvmlDeviceGetUUID, _safe(pynvml.nvmlDeviceGetHandleByIndex, int(gpu)))
        if uuid:
            return str(uuid)
    return f"index{gpu}"


def device_keys(gpus: List[str]) -> List[str]:
    """Lock names of the devices a cell measures on: host + GPU UUID, or host + "cpu"."""
    host = socket.gethostname()
    return [f"{host}-gpu-{gpu_uuid(g)}" for g in gpus] or [f"{host}-cpu"]


class DeviceWatch:
    """Registers this process as measuring on its devices and says, at the end, whether another measuring
    process overlapped with it on any of them.

    Each measuring process holds an flock on its own file in ``<lock dir>/measuring/<device>/``. A process
    that starts while another one's file is locked saw it live, and leaves a note beside that file, so the
    earlier process learns of the overlap at its end too: every overlap is seen by both sides.
    """

    def __init__(self, keys: List[str], root: Optional[Path] = None):
        self.dirs = [(root or lock_dir()) / "measuring" / k for k in keys]
        self.name = f"{socket.gethostname()}-{os.getpid()}-{time.time_ns()}"
        self.own: List[Any] = []
        self.others: set = set()
        self.error: Optional[str] = None

    def _live_others(self, d: Path) -> List[str]:
        import fcntl

        live = []
        for f in d.glob("*.lock"):
            if f.stem == self.name:
                continue
            try:
                with open(f, "rb") as fh:
                    fcntl.flock(fh.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                live.append(f.stem)
            except OSError:  # vanished meanwhile: it ended
                continue
        return live

    def __enter__(self) -> DeviceWatch:
        import fcntl

        try:
            for d in self.dirs:
                d.parent.parent.mkdir(parents=True, exist_ok=True)
                for folder in (d.parent, d):  # shared by every user's cells, like the lock folder itself
                    folder.mkdir(mode=0o1777, exist_ok=True)
                    if folder.stat().st_uid == os.getuid():
                        os.chmod(folder, 0o1777)
                fh = open_lock_file(d / f"{self.name}.lock")
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
                self.own.append(fh)
                for other in self._live_others(d):
                    self.others.add(other)
                    with contextlib.suppress(OSError), open(d / f"{other}.seen", "a") as note:
                        note.write(self.name + "\n")
        except OSError as exc:  # a registry this process cannot write: the cell still runs, and says so
            self.error = f"{type(exc).__name__}: {exc}"
        return self

    def report(self) -> Dict[str, Any]:
        """{"shared": bool, "other_measuring_processes": [...]}: call before leaving the block. "shared" is
        null where the registry could not be written (and "error" says why)."""
        if self.error:
            return {"shared": None, "other_measuring_processes": [], "devices": [d.name for d in self.dirs],
                    "error": self.error}
        for d in self.dirs:
            self.others.update(self._live_others(d))
            with contextlib.suppress(OSError):
                self.others.update(x for x in (d / f"{self.name}.seen").read_text().split() if x)
        return {"shared": bool(self.others), "other_measuring_processes": sorted(self.others),
                "devices": [d.name for d in self.dirs]}

    def __exit__(self, *exc: Any) -> None:
        for d, fh in zip(self.dirs, self.own):
            for suffix in (".lock", ".seen"):
                with contextlib.suppress(OSError):
                    (d / f"{self.name}{suffix}").unlink()
            fh.close()
