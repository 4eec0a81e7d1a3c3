"""What produced the numbers: host, accelerator, library versions and the git commit, recorded in every result.
Environment variables only by the names in RECORDED_ENV: the rest carries tokens and passwords."""
from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Sequence

from qbench.store.redaction import SECRET_NAME

# Environment variables that change what a cell measures or reads, recorded by name and value in every result
# (a cell on a SLURM node inherits them from the submitting shell, so the result shows whether they arrived).
# Only these: the rest of the environment is not recorded, it carries tokens and passwords.
RECORDED_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "GPTQMODEL_OFFLINE", "HF_HOME",
                "QBENCH_DATA", "QBENCH_CACHE", "PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")


def package_versions(dists: Iterable[str]) -> Dict[str, Optional[str]]:
    """Installed version of each distribution, None where it is not installed."""
    from importlib import metadata

    out: Dict[str, Optional[str]] = {}
    for dist in dists:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def git_commit() -> Optional[str]:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True, text=True, timeout=5
        ).stdout.strip()
        return out + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def environment(method_libraries: Sequence[str] = ()) -> Dict[str, Any]:
    """What produced the numbers: host, accelerator, and library versions (qbench's own and those the cell's
    method names: qbench.methods.libraries). No environment variables."""
    env: Dict[str, Any] = {
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu_count": os.cpu_count(),
        "qbench_git_commit": git_commit(),
        "versions": package_versions(
            ("qbench", "torch", "transformers", "accelerate", *method_libraries, "lm_eval", "hydra-core", "numpy")
        ),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "variables": {k: os.environ[k] for k in RECORDED_ENV if k in os.environ},
        # names only: shows a token reached the cell (e.g. HF_TOKEN for a gated model) without recording it
        "secret_variables_withheld": sorted(k for k in os.environ if SECRET_NAME.search(k)),
        "gpus": [],
    }
    try:
        import torch

        env["torch_cuda"] = torch.version.cuda
        env["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                p = torch.cuda.get_device_properties(i)
                env["gpus"].append(
                    {"index": i, "name": p.name, "total_memory_bytes": p.total_memory, "capability": f"{p.major}.{p.minor}"}
                )
    except ImportError:  # pragma: no cover
        pass
    env.update(_nvml_info())
    env["gpu_count"] = len(env["gpus"])
    env["gpu_name"] = env["gpus"][0]["name"] if env["gpus"] else None
    return env


def _nvml_info() -> Dict[str, Any]:
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # no driver, no GPU: the fields stay absent
        return {"nvml": False}
    try:
        info: Dict[str, Any] = {"nvml": True, "driver": pynvml.nvmlSystemGetDriverVersion()}
        info["cuda_driver_version"] = pynvml.nvmlSystemGetCudaDriverVersion_v2()
        return info
    except Exception:
        return {"nvml": True}
    finally:
        pynvml.nvmlShutdown()
