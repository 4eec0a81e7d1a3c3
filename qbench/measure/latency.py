"""The "latency" section: time to first token, decode speed, one-time costs, and how far from the bounds.

Each phase is timed on its own, never derived by subtracting one mean from another:
  * prefill / TTFT: one forward pass over the prompt that produces the first token (logits of the last
    position, argmax), timed per call, at every (batch size, prompt length);
  * decode: per-step timestamps taken inside ``generate`` by a logits processor (called once per step, right
    after that step's forward): on CUDA it records an event on the stream (no sync, so it does not slow the
    loop), on CPU it reads perf_counter. Step intervals are the per-token latencies; tokens/s of a run is
    batch * (steps - 1) / (last stamp - first stamp), which excludes the prefill.
Generation is forced to ``bench.new_tokens``: min_new_tokens == max_new_tokens (EOS suppressed by
transformers' MinNewTokensLengthLogitsProcessor for every step), greedy; a run that comes back shorter raises.
"""
from __future__ import annotations

import contextlib
import time
from typing import Any, Dict, List, Optional

from qbench.measure import gpu_specs, gpu_state, memory, stats, timing


def _cfg(bench_cfg: Any, key: str, default: Any = None) -> Any:
    value = getattr(bench_cfg, key, default)
    return default if value is None else value


def random_prompt(batch: int, length: int, vocab: int, special_ids: List[int], seed: int, device: Any):
    """Random token ids, the same for a given (seed, batch, length): no dataset, no tokenizer run. Special ids
    (pad, bos, eos) are replaced so that nothing in the prompt means 'stop' or 'padding'."""
    import torch

    gen = torch.Generator().manual_seed(seed * 1_000_003 + batch * 10_007 + length)
    ids = torch.randint(0, vocab, (batch, length), generator=gen)
    specials = {int(s) for s in special_ids if s is not None and 0 <= int(s) < vocab}
    if specials and len(specials) < vocab:
        remap = torch.arange(vocab)
        for s in specials:  # each special id becomes the next ordinary id above it
            t = (s + 1) % vocab
            while t in specials:
                t = (t + 1) % vocab
            remap[s] = t
        ids = remap[ids]
    return ids.to(device), torch.ones_like(ids).to(device)


def _text_config(model_config: Any):
    return model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config


def _vocab(model_config: Any, tokenizer: Any) -> int:
    vocab = int(_text_config(model_config).vocab_size)
    if tokenizer is not None:
        try:
            vocab = min(vocab, len(tokenizer))
        except TypeError:
            pass
    return vocab


def _special_ids(tokenizer: Any, model_config: Any) -> List[int]:
    ids = list(getattr(tokenizer, "all_special_ids", []) or []) if tokenizer is not None else []
    cfg = _text_config(model_config)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        v = getattr(cfg, key, None)
        ids.extend(v if isinstance(v, (list, tuple)) else [v])
    return [i for i in ids if i is not None]


def matmul_params(model) -> Dict[str, int]:
    """Weights taking part in matmuls: every linear layer's in*out (quantized linears included: bnb and
    GPT-QModel layers expose in_features / out_features), split into the output head and the rest."""
    import torch

    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    body = head = 0
    for mod in model.modules():
        fin, fout = getattr(mod, "in_features", None), getattr(mod, "out_features", None)
        if isinstance(mod, torch.nn.Embedding) or not isinstance(fin, int) or not isinstance(fout, int):
            continue
        if mod is out_emb:
            head += fin * fout
        else:
            body += fin * fout
    if out_emb is not None and head == 0 and getattr(out_emb, "weight", None) is not None:
        head = out_emb.weight.numel()
    return {"body": body, "head": head}


def prefill_flops(params: Dict[str, int], batch: int, prompt_tokens: int) -> int:
    """2 FLOPs per weight per token through the linear layers; the head runs on the last position only
    (logits_to_keep=1). Attention score FLOPs are left out, so the compute bound is a lower bound on time."""
    return 2 * params["body"] * batch * prompt_tokens + 2 * params["head"] * batch


def compute_bound_s(flops: float, peak_flops: Optional[float]) -> Optional[float]:
    return flops / peak_flops if peak_flops else None


def bandwidth_bound_tokens_per_s(
    bandwidth_bytes_per_s: Optional[float], weight_bytes: float, kv_bytes_per_seq: float, batch: int
) -> Optional[float]:
    """Upper bound on decode tokens/s from memory bandwidth: one step reads the weights once for the whole
    batch plus every sequence's KV cache, and yields one token per sequence:
    batch * bandwidth / (weight_bytes + batch * kv_bytes_per_seq)."""
    if not bandwidth_bytes_per_s:
        return None
    return batch * bandwidth_bytes_per_s / (weight_bytes + batch * kv_bytes_per_seq)


def mean_decode_context(prompt_tokens: int, new_tokens: int) -> float:
    """Mean KV length read by the timed decode steps: step i (1..new_tokens-1) attends over prompt + i
    tokens, so the mean is prompt + new_tokens / 2."""
    return prompt_tokens + new_tokens / 2.0


def _step_stamper(device: Any, n_steps: int):
    """A LogitsProcessor that timestamps each generation step and leaves the scores alone."""
    import torch
    from transformers import LogitsProcessor

    class StepStamps(LogitsProcessor):
        def __init__(self):
            self.cuda = timing.is_cuda(device)
            self.events = [torch.cuda.Event(enable_timing=True) for _ in range(n_steps)] if self.cuda else []
            self.times: List[float] = []
            self.calls = 0

        def __call__(self, input_ids, scores):
            if self.cuda:
                if self.calls >= len(self.events):
                    self.events.append(torch.cuda.Event(enable_timing=True))
                self.events[self.calls].record(torch.cuda.current_stream(scores.device))
            else:
                self.times.append(time.perf_counter())
            self.calls += 1
            return scores

        def seconds(self) -> List[float]:
            """Stamps in seconds, relative to the first."""
            if not self.cuda:
                return [t - self.times[0] for t in self.times]
            used = self.events[: self.calls]
            used[-1].synchronize()
            return [used[0].elapsed_time(e) / 1e3 for e in used]

    return StepStamps()


def generate_timed(model, input_ids, attention_mask, new_tokens: int, path: str, device: Any, pad_token_id: int) -> Dict[str, Any]:
    """One forced-length greedy generate with per-step stamps. Returns {"steps_s", "wall_s", "output_ids"}.

    Raises RuntimeError if the output is not exactly ``new_tokens`` longer than the prompt: a shorter run would
    make every figure wrong without anything looking wrong.
    """
    import torch
    from transformers import LogitsProcessorList

    stamps = _step_stamper(device, new_tokens)
    kwargs = dict(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,  # EOS logits at -inf until new_tokens are out
        do_sample=False,
        num_beams=1,
        temperature=None,  # instruct models ship sampling defaults; greedy ignores them, say so explicitly
        top_p=None,
        top_k=None,
        pad_token_id=pad_token_id,
        use_cache=True,
        logits_processor=LogitsProcessorList([stamps]),
    )
    if path == "static":
        kwargs["cache_implementation"] = "static"
    timing.synchronize(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    timing.synchronize(device)
    wall = time.perf_counter() - t0
    produced = out.shape[1] - input_ids.shape[1]
    if produced != new_tokens or stamps.calls != new_tokens:
        raise RuntimeError(f"decode {path}: generated {produced} tokens in {stamps.calls} steps, expected {new_tokens}")
    return {"steps_s": stamps.seconds(), "wall_s": wall, "output_ids": out}


def static_unsupported_reason(model, device: Any) -> Optional[str]:
    """Why transformers would not compile the static-cache decode of this model (then the path would time an
    uncompiled static cache under the name 'static'), or None. Mirrors GenerationMixin's auto-compile rules."""
    if not timing.is_cuda(device):
        return f"transformers compiles the static-cache decode only on cuda/xpu, not on {device}"
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and not getattr(quantizer, "is_compileable", False):
        return f"transformers does not compile models quantized with {type(quantizer).__name__} (is_compileable is False)"
    device_map = getattr(model, "hf_device_map", None) or {}
    places = set(map(str, device_map.values()))
    if "disk" in places or ("cpu" in places and len(places) > 1):
        return "transformers does not compile a model offloaded to cpu or disk"
    if "llama4" in str(getattr(getattr(model, "config", None), "model_type", "")):
        return "transformers does not compile llama4 decode"
    return None


def _graph_breaks() -> Optional[int]:
    try:
        from torch._dynamo.utils import counters

        return int(sum(counters["graph_break"].values()))
    except Exception:
        return None


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
    cuda_indices: Optional[List[int]] = None,
) -> Dict[str, Any]:
    """The "latency" section of result.json (docs/results.md), plus ``warnings`` (CV above the threshold,
    unsupported paths) for the cell's top-level warnings list, and ``kv_cache_bytes_analytic`` (for memory).

    ``phase_memory``: a memory.PhaseMemory that records the "prefill" and "decode" phases (or None).
    ``weight_bytes_read_per_token``: bytes one decode step reads (memory.weight_footprint's
    ``weight_bytes_read_per_token``: the weights without an untied input embedding table).
    ``compute_dtype``: dtype of the matmuls for the compute bound ("int8" for LLM.int8); default the model's.
    """
    import torch

    device = str(device)
    warmup = int(_cfg(bench_cfg, "warmup_runs", 2))
    loop = dict(
        warmup_runs=warmup,
        min_repeats=int(_cfg(bench_cfg, "min_repeats", 10)),
        max_repeats=int(_cfg(bench_cfg, "max_repeats", 100)),
        min_duration_s=float(_cfg(bench_cfg, "min_duration_s", 1.0)),
    )
    # The compiled static path keeps speeding up for its first few generate calls after the compile (on an H100,
    # torch 2.11: the 3rd-5th calls ran ~7 % slower than the 6th onwards), so it warms up longer than the others.
    static_warmup = max(warmup, int(_cfg(bench_cfg, "static_warmup_runs", 6)))
    threshold = float(_cfg(bench_cfg, "cv_warn_threshold", 0.05))
    seed = int(_cfg(bench_cfg, "seed", 0))
    batch_sizes = [int(b) for b in _cfg(bench_cfg, "batch_sizes", [1])]
    prompt_lengths = [int(p) for p in _cfg(bench_cfg, "prompt_tokens", [128])]
    decode_prompt = int(_cfg(bench_cfg, "decode_prompt_tokens", 128))
    new_tokens = int(_cfg(bench_cfg, "new_tokens", 32))
    paths = [str(p) for p in _cfg(bench_cfg, "decode_paths", ["eager"])]
    overrides = _cfg(bench_cfg, "gpu_spec_overrides", {}) or {}

    cuda = timing.is_cuda(device)
    idx = gpu_state.cuda_indices(device, cuda_indices)
    state_start = gpu_state.snapshot(device, idx)
    cpu_start = gpu_state.cpu_times()
    spec = gpu_specs.for_device(device, overrides, index=idx[0] if idx else None)  # None on CPU
    dtype = compute_dtype or getattr(model, "dtype", None)
    peak = gpu_specs.peak_flops(spec, dtype)
    bandwidth = gpu_specs.bandwidth_bytes_per_s(spec)

    in_dev = model.get_input_embeddings().weight.device
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    out_dev = out_emb.weight.device if out_emb is not None and getattr(out_emb, "weight", None) is not None else in_dev
    vocab = _vocab(model_config, tokenizer)
    specials = _special_ids(tokenizer, model_config)
    pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    pad = pad if pad is not None else (getattr(_text_config(model_config), "pad_token_id", None) or 0)
    kv_dtype_bytes = memory.DTYPE_BYTES.get(str(getattr(model, "dtype", "bfloat16")).replace("torch.", ""), 2)
    params = matmul_params(model)
    model.eval()

    import inspect

    forward_kwargs: Dict[str, Any] = {"use_cache": True}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        forward_kwargs["logits_to_keep"] = 1  # as generate does: the head on the last position only

    warnings: List[str] = []
    one_time: Dict[str, Any] = {"first_call_s": None, "compile_s": None, "prefill": [], "decode": []}
    prefill: List[Dict[str, Any]] = []
    decode: List[Dict[str, Any]] = []
    unsupported: List[Dict[str, Any]] = []
    kv_shapes: List[Dict[str, Any]] = []

    # ---- prefill ---------------------------------------------------------------------------------------
    ctx = phase_memory.phase("prefill") if phase_memory is not None else contextlib.nullcontext()
    with ctx:
        for batch in batch_sizes:
            for plen in prompt_lengths:
                ids, mask = random_prompt(batch, plen, vocab, specials, seed, in_dev)

                def first_token(ids=ids, mask=mask):
                    with torch.inference_mode():
                        out = model(input_ids=ids, attention_mask=mask, **forward_kwargs)
                        return out.logits[:, -1, :].argmax(-1)

                def run_once(first_token=first_token):
                    secs, _ = timing.time_call(first_token, device, out_dev)
                    return secs

                res = timing.repeat(run_once, **loop)
                if one_time["first_call_s"] is None:
                    one_time["first_call_s"] = res["first_call_s"]  # the model's very first forward
                one_time["prefill"].append({"batch_size": batch, "prompt_tokens": plen, "first_call_s": res["first_call_s"]})
                ttft = stats.summarize([s * 1e3 for s in res["results"]], "ms")
                flops = prefill_flops(params, batch, plen)
                bound = compute_bound_s(flops, peak)
                p50_s = ttft["p50"] / 1e3
                prefill.append({
                    "batch_size": batch,
                    "prompt_tokens": plen,
                    "ttft_ms": ttft,
                    "tokens_per_s": batch * plen / p50_s if p50_s > 0 else None,
                    "flops": flops,
                    "compute_bound_ms": bound * 1e3 if bound is not None else None,
                    "compute_bound_fraction": bound / p50_s if bound is not None and p50_s > 0 else None,
                })
                kv_shapes.append({"batch_size": batch, "seq_len_tokens": plen,
                                  "bytes": memory.kv_cache_bytes(model_config, batch, plen, kv_dtype_bytes)})
                w = stats.cv_warning(f"prefill bs={batch} prompt={plen}", ttft, threshold)
                if w:
                    warnings.append(w)

    # ---- decode ----------------------------------------------------------------------------------------
    if new_tokens < 2:
        warnings.append(f"decode: new_tokens={new_tokens}; per-step timing needs at least 2 tokens, decode not measured")
    kv_per_token = memory.kv_cache_bytes(model_config, 1, 1, kv_dtype_bytes)
    ctx = phase_memory.phase("decode") if phase_memory is not None else contextlib.nullcontext()
    with ctx:
        for path in (paths if new_tokens >= 2 else []):
            reason = static_unsupported_reason(model, device) if path == "static" else None
            failed_batch: Optional[int] = None
            for batch in batch_sizes:
                if reason is not None:
                    break
                ids, mask = random_prompt(batch, decode_prompt, vocab, specials, seed, in_dev)
                energy_runs: List[Optional[float]] = []
                path_warmup = static_warmup if path == "static" else warmup

                def run_once(ids=ids, mask=mask, path=path, energy_runs=energy_runs):
                    e0 = gpu_state.total_energy_j(device, idx) if cuda else None
                    r = generate_timed(model, ids, mask, new_tokens, path, device, pad)
                    e1 = gpu_state.total_energy_j(device, idx) if cuda else None
                    energy_runs.append(e1 - e0 if e0 is not None and e1 is not None else None)
                    return r["steps_s"]

                breaks0 = _graph_breaks()
                try:
                    res = timing.repeat(run_once, **{**loop, "warmup_runs": path_warmup})
                except torch.OutOfMemoryError:
                    raise  # the cell records it as class oom
                except Exception as exc:  # a method whose kernels cannot take this path (compile fails, ...)
                    if path != "static":
                        raise
                    reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}"
                    failed_batch = batch
                    break
                timed_energy = energy_runs[path_warmup:]
                steps = res["results"]
                tps = stats.summarize(
                    [batch * (len(s) - 1) / (s[-1] - s[0]) for s in steps], "tokens/s")
                per_token = stats.summarize(
                    [(b - a) * 1e3 for s in steps for a, b in zip(s[:-1], s[1:])], "ms")
                kv_seq = kv_per_token * mean_decode_context(decode_prompt, new_tokens)
                bound = bandwidth_bound_tokens_per_s(bandwidth, weight_bytes_read_per_token, kv_seq, batch)
                energy = None
                if timed_energy and all(e is not None for e in timed_energy):
                    energy = sum(timed_energy) / (len(timed_energy) * batch * new_tokens)
                compiled = path == "static" and hasattr(model, "_compiled_call")
                breaks1 = _graph_breaks()
                decode.append({
                    "decode_path": path,
                    "batch_size": batch,
                    "prompt_tokens": decode_prompt,
                    "new_tokens": new_tokens,
                    "tokens_per_s": tps,
                    "per_token_ms": per_token,
                    "bandwidth_bound_tokens_per_s": bound,
                    "bandwidth_bound_fraction": tps["p50"] / bound if bound else None,
                    "weight_bytes_read_per_step": int(weight_bytes_read_per_token),
                    "kv_bytes_read_per_step": int(batch * kv_seq),
                    "energy_j_per_token": energy,  # GPU board energy over the timed generate calls (prefill included)
                    "compiled": compiled,
                    "graph_breaks": (breaks1 - breaks0) if path == "static" and breaks0 is not None and breaks1 is not None else None,
                })
                one_time["decode"].append({"decode_path": path, "batch_size": batch, "first_call_s": res["first_call_s"]})
                if path == "static" and one_time["compile_s"] is None:
                    # The first static generate compiles the decode step: its wall time (compile + one run).
                    one_time["compile_s"] = res["first_call_s"]
                kv_shapes.append({"batch_size": batch, "seq_len_tokens": decode_prompt + new_tokens,
                                  "bytes": memory.kv_cache_bytes(model_config, batch, decode_prompt + new_tokens, kv_dtype_bytes)})
                w = stats.cv_warning(f"decode {path} bs={batch}", tps, threshold)
                if w:
                    warnings.append(w)
            if reason is not None:
                # batch_size: where it failed (larger batch sizes were not tried); null: the path never applies
                unsupported.append({"decode_path": path, "reason": reason, "batch_size": failed_batch})
                at = f" from bs={failed_batch}" if failed_batch is not None else ""
                warnings.append(f"decode {path}: not measured{at} ({reason})")

    return {
        "device": "cuda" if cuda else "cpu",
        "timer": timing.timer_name(device),
        "prefill": prefill,
        "decode": decode,
        "unsupported": unsupported,
        "one_time": one_time,
        "gpu_spec": spec,
        "gpu_state": {"start": state_start, "end": gpu_state.snapshot(device, idx)} if state_start else {},
        "host_cpu": gpu_state.host_cpu_load(cpu_start, gpu_state.cpu_times()),
        "compute_dtype": gpu_specs.dtype_key(dtype) if dtype is not None else None,
        "settings": {**loop, "static_warmup_runs": static_warmup, "seed": seed, "batch_sizes": batch_sizes,
                     "prompt_tokens": prompt_lengths, "decode_prompt_tokens": decode_prompt, "new_tokens": new_tokens, "decode_paths": paths,
                     "cv_warn_threshold": threshold},
        "kv_cache_bytes_analytic": [dict(t) for t in dict.fromkeys(tuple(sorted(k.items())) for k in kv_shapes)],
        "warnings": warnings,
    }
