"""Imported by run.preload's fork server before torch: keep the server's imports from poisoning fork.

torch.cuda.is_available() asks the CUDA runtime for the device count unless PYTORCH_NVML_BASED_CUDA_CHECK=1, and
that call registers torch's fork handler even though no context is created (torch.cuda.is_initialized() stays
False): every process forked afterwards is marked a bad fork, and its first CUDA use fails with "Cannot
re-initialize CUDA in forked subprocess". transformers and lm-eval ask is_available() while they import, so on a GPU
node every preloaded cell failed (seen on an H100, 2026-12-05). With NVML answering, nothing touches the runtime.
A forked cell applies its own environment (cell.forked_main), so the switch stays the server's.
"""

from __future__ import annotations

import os

os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"
