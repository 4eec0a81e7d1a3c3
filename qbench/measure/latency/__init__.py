"""The "latency" section: time to first token, decode speed, one-time costs, and how far from the bounds.

Split along its seams: ``settings`` (the bench keys as latency reads them), ``common`` (the target, random
prompts, a figure's precision), ``prefill``, ``decode`` (the loop every decode path shares), and the decode paths
themselves, one module each, in the registry qbench.measure.decode_paths.

Each phase is timed on its own, never derived by subtracting one mean from another:
  * prefill / TTFT: one forward pass over the prompt that produces the first token (logits of the last
    position, argmax), timed per call, at every (batch size, prompt length);
  * decode, one figure per path of ``bench.decode_paths`` and batch size, each timed by per-step stamps (CUDA
    events on the stream, no sync inside the loop; perf_counter on CPU); step intervals are the per-token
    latencies, and tokens/s of a run is batch * (steps - 1) / (last stamp - first stamp), which excludes the
    prefill. What each path runs: its module's docstring (eager: plain generate; static: generate with the
    compiled static-cache step; graph: that compiled step alone in a tight loop).
Generation is forced to ``bench.new_tokens``: min_new_tokens == max_new_tokens (EOS suppressed by
transformers' MinNewTokensLengthLogitsProcessor for every step), greedy; a run that comes back shorter raises.

Every timed figure repeats until the 95 % CI of its median is within ``bench.target_ci_pct`` % of it, or its
time cap ``bench.max_time_per_figure_s`` is spent (then ``precision.stopped_by`` says ``time_cap``): see
qbench.measure.timing.repeat. The first calls of the compiled paths at each batch size (where torch.compile
traces and code-generates the step) may take ``bench.max_compile_s`` together: the one that runs past what is left
is stopped and its path recorded as unsupported from that batch size, with that reason, not left to hold the GPU
for many minutes (docs/latency.md has the compile times measured). The loop is batch-major (every path at batch
1, then at batch 8, ...) so that a path that replays another's compiled step (graph) reuses what that path just
compiled and warmed up at the same shapes.
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, Optional

from qbench.measure import bandwidth, gpu_specs, gpu_state, memory, timing
from qbench.measure.latency.common import _target
from qbench.measure.latency.decode import measure_decode
from qbench.measure.latency.prefill import measure_prefill
from qbench.measure.latency.settings import Settings


def torch_settings() -> Dict[str, Any]:
    """Process-wide switches that change what the timed code computes or how it is compiled, read as timing
    starts, after the method has loaded: libraries set them on import or when applied (torchao's configs
    switched on Inductor's coordinate-descent tuning until qbench turned that off), so a cell records what it
    really ran under and the report can say when cells of a sweep differ."""
    import torch
    import torch._inductor.config as inductor

    out: Dict[str, Any] = {"float32_matmul_precision": torch.get_float32_matmul_precision(),
                           "cuda_matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
                           "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32)}
    for key in ("max_autotune", "coordinate_descent_tuning", "force_fuse_int_mm_with_mul"):
        out[f"inductor_{key}"] = bool(getattr(inductor, key, False))
    return out


def measure(
    model,
    tokenizer,
    bench_cfg: Any,
    device: Any,
    phase_memory: Optional[memory.PhaseMemory],
    weight_bytes_read_per_token: int,
    model_config: Any,
    *,
    compute_dtype: Any = None,
    compile_config: Any = None,
) -> Dict[str, Any]:
    """The "latency" section of result.json (docs/results.md), plus ``warnings`` (CV above the threshold, a figure
    that hit its time cap, unsupported paths) for the cell's top-level warnings list, and
    ``kv_cache_bytes_analytic`` (for memory).

    ``phase_memory``: a memory.PhaseMemory that records the "prefill" and "decode" phases (or None).
    ``weight_bytes_read_per_token``: bytes one decode step reads (memory.weight_footprint's
    ``weight_bytes_read_per_token``: the weights without an untied input embedding table).
    ``compute_dtype``: dtype of the matmuls for the compute bound (the method's); default the model's.
    ``compile_config``: transformers CompileConfig for the compiled paths (default: generate's own).
    """
    device = str(device)
    s = Settings.from_bench(bench_cfg)
    idx = gpu_state.cuda_indices(device)
    state_start = gpu_state.snapshot(device, idx)
    cpu_start = gpu_state.cpu_times()
    spec = gpu_specs.for_device(device, s.gpu_spec_overrides, index=idx[0] if idx else None)  # None on CPU
    dtype = compute_dtype or getattr(model, "dtype", None)
    copy_bw = bandwidth.copy_bandwidth(device) if s.measure_copy_bandwidth else None
    model.eval()
    settings_at_start = torch_settings()
    t = _target(model, tokenizer, device, model_config, weight_bytes_read_per_token, spec, dtype, copy_bw, compile_config)
    out: Dict[str, Any] = {"prefill": [], "decode": [], "unsupported": [], "warnings": [], "kv_shapes": [],
                           "one_time": {"first_call_s": None, "compile_s": None, "prefill": [], "decode": []}}
    for phase, run in (("prefill", measure_prefill), ("decode", measure_decode)):
        with phase_memory.phase(phase) if phase_memory is not None else contextlib.nullcontext():
            run(t, s, out)
    kv_shapes = out.pop("kv_shapes")
    return {
        "device": "cuda" if t.cuda else "cpu",
        "timer": timing.timer_name(device),
        **out,
        "gpu_spec": spec,
        "copy_bandwidth": copy_bw,
        "gpu_state": {"start": state_start, "end": gpu_state.snapshot(device, idx)} if state_start else {},
        "host_cpu": gpu_state.host_cpu_load(cpu_start, gpu_state.cpu_times()),
        "compute_dtype": gpu_specs.dtype_key(dtype) if dtype is not None else None,
        "settings": s.record(),
        "torch_settings": settings_at_start,
        "kv_cache_bytes_analytic": [dict(k) for k in dict.fromkeys(tuple(sorted(k.items())) for k in kv_shapes)],
    }
