"""Prefill: time to first token at every (batch size, prompt length), against the compute bound."""
from __future__ import annotations

from typing import Any, Dict, Optional

from qbench.measure import memory, stats, timing
from qbench.measure.latency.common import (
    Target,
    _log_figure,
    _precision,
    _precision_warning,
    _say_if_slow,
    random_prompt,
)
from qbench.measure.latency.settings import Settings


def prefill_flops(params: Dict[str, int], batch: int, prompt_tokens: int) -> int:
    """2 FLOPs per weight per token through the linear layers; the head runs on the last position only
    (logits_to_keep=1). Attention score FLOPs are left out, so the compute bound is a lower bound on time."""
    return 2 * params["body"] * batch * prompt_tokens + 2 * params["head"] * batch


def compute_bound_s(flops: float, peak_flops: Optional[float]) -> Optional[float]:
    return flops / peak_flops if peak_flops else None


def measure_prefill(t: Target, s: Settings, out: Dict[str, Any]) -> None:
    """TTFT at every (batch size, prompt length) into out["prefill"]; first calls into out["one_time"]."""
    import torch

    for batch in s.batch_sizes:
        for plen in s.prompt_tokens:
            label = f"prefill bs={batch} prompt={plen}"
            ids, mask = random_prompt(batch, plen, t.vocab, t.special_ids, s.seed, t.in_device)

            def run_once(ids=ids, mask=mask):
                def first_token():
                    with torch.inference_mode():
                        return t.model(input_ids=ids, attention_mask=mask, **t.forward_kwargs).logits[:, -1, :].argmax(-1)

                return timing.time_call(first_token, t.device, t.out_device)[0]

            res = timing.repeat(run_once, after_warmup=_say_if_slow(label, s), **s.loop())
            if out["one_time"]["first_call_s"] is None:
                out["one_time"]["first_call_s"] = res["first_call_s"]  # the model's very first forward
            out["one_time"]["prefill"].append({"batch_size": batch, "prompt_tokens": plen, "first_call_s": res["first_call_s"]})
            ttft = stats.summarize([x * 1e3 for x in res["results"]], "ms")
            flops = prefill_flops(t.params, batch, plen)
            bound, p50_s = compute_bound_s(flops, t.peak_flops), ttft["p50"] / 1e3
            out["prefill"].append({
                "batch_size": batch, "prompt_tokens": plen, "ttft_ms": ttft,
                "tokens_per_s": batch * plen / p50_s if p50_s > 0 else None,
                "flops": flops, "compute_bound_ms": bound * 1e3 if bound is not None else None,
                "compute_bound_fraction": bound / p50_s if bound is not None and p50_s > 0 else None,
                "precision": _precision(res, s),
            })
            out["kv_shapes"].append({"batch_size": batch, "seq_len_tokens": plen,
                                     "bytes": memory.kv_cache_bytes(t.model_config, batch, plen, t.kv_dtype_bytes)})
            _log_figure(label, ttft, res)
            out["warnings"].extend(w for w in (stats.cv_warning(label, ttft, s.cv_warn_threshold),
                                               _precision_warning(label, res, s)) if w)
