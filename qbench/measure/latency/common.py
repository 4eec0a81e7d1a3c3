"""What prefill and decode share: the Target (the model and device, worked out once), random prompts, and a
figure's precision, log line and warnings."""
from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from qbench.measure import gpu_specs, gpu_state, memory, timing
from qbench.measure.latency.settings import Settings

# one line per figure as it is done, into the cell's log (cell.log beside result.json): the only account of
# where a cell that was stopped (a job's time limit, a compile that does not end) spent its time
log = logging.getLogger("qbench.latency")


def _log_figure(label: str, dist: Dict[str, Any], res: Dict[str, Any]) -> None:
    ci, first = dist["median_ci"], res.get("first_call_s")
    half = "" if ci["half_width_pct"] is None else f" ± {ci['half_width_pct']:.2f} %"
    if ci["level"] < 0.95:  # too few runs for a 95 % interval: say what coverage [min, max] has
        half += f" ({100 * ci['level']:.0f} % CI)"
    log.info("%s: %.4g %s%s (%d runs, %.2f s timed, stopped by %s%s)", label, dist["p50"], dist["unit"], half,
             res["n"], res["timed_s"], res["stopped_by"], "" if first is None else f"; first call {first:.2f} s")


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



@dataclass
class Target:
    """What the timing loops need to know about the model and device, worked out once."""

    model: Any
    device: str
    cuda: bool
    gpu_indices: List[int]
    in_device: Any
    out_device: Any
    vocab: int
    special_ids: List[int]
    pad_token_id: int
    kv_dtype_bytes: int
    params: Dict[str, int]
    forward_kwargs: Dict[str, Any]
    model_config: Any
    weight_bytes_read_per_token: int
    peak_flops: Optional[float]
    datasheet_bandwidth: Optional[float]
    measured_bandwidth: Optional[float]
    compile_config: Any = None


def _target(model, tokenizer, device: str, model_config: Any, weight_bytes_read_per_token: int, spec: Any,
            compute_dtype: Any, copy_bw: Optional[Dict[str, Any]], compile_config: Any) -> Target:
    in_dev = model.get_input_embeddings().weight.device
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    out_dev = out_emb.weight.device if out_emb is not None and getattr(out_emb, "weight", None) is not None else in_dev
    pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    pad = pad if pad is not None else (getattr(_text_config(model_config), "pad_token_id", None) or 0)
    forward_kwargs: Dict[str, Any] = {"use_cache": True}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        forward_kwargs["logits_to_keep"] = 1  # as generate does: the head on the last position only
    return Target(
        model=model, device=device, cuda=timing.is_cuda(device), gpu_indices=gpu_state.cuda_indices(device),
        in_device=in_dev, out_device=out_dev, vocab=_vocab(model_config, tokenizer),
        special_ids=_special_ids(tokenizer, model_config), pad_token_id=pad,
        kv_dtype_bytes=memory.DTYPE_BYTES.get(str(getattr(model, "dtype", "bfloat16")).replace("torch.", ""), 2),
        params=matmul_params(model), forward_kwargs=forward_kwargs, model_config=model_config,
        weight_bytes_read_per_token=int(weight_bytes_read_per_token),
        peak_flops=gpu_specs.peak_flops(spec, compute_dtype), datasheet_bandwidth=gpu_specs.bandwidth_bytes_per_s(spec),
        measured_bandwidth=(copy_bw or {}).get("bytes_per_s"), compile_config=compile_config,
    )


def _precision(res: Dict[str, Any], s: Settings) -> Dict[str, Any]:
    """How a figure's repeats ended: its CI half-width, the target, and what stopped it."""
    return {"target_ci_pct": s.target_ci_pct, "ci_half_width_pct": res["ci_half_width_pct"],
            "stopped_by": res["stopped_by"], "repeats": res["n"], "warmup_runs": len(res["warmup_s"]),
            "timed_s": res["timed_s"], "warmup_s": sum(res["warmup_s"])}


SLOW_FIGURE_S = 30.0  # a figure whose timed runs alone will take this long says so before it starts them


def _say_if_slow(label: str, s: Settings, path: Optional[str] = None):
    """timing.repeat's after_warmup: one log line before the timed runs when bench.min_repeats runs at the pace
    of the last warm-up will take SLOW_FIGURE_S or more. The time cap cannot shorten them (fewer runs give no
    95 % CI of the median), so a cell that goes quiet for minutes (a slow compiled kernel at a large batch) says
    why in its cell.log, even if it is stopped before it writes a result."""
    def after_warmup(warmup_s: List[float]) -> None:
        if not warmup_s:
            return
        floor_s = s.min_repeats * warmup_s[-1]
        key, seconds = s.cap(path)
        if floor_s >= SLOW_FIGURE_S:
            cap = "" if seconds is None else f", past bench.{key}={seconds:g}"
            log.info("%s: one run takes %.1f s: the %d timed runs of bench.min_repeats will take about %.0f s%s",
                     label, warmup_s[-1], s.min_repeats, floor_s, cap)
    return after_warmup


def _precision_warning(label: str, res: Dict[str, Any], s: Settings, path: Optional[str] = None) -> Optional[str]:
    if res["stopped_by"] != "time_cap" or s.target_ci_pct is None:
        return None
    half = res["ci_half_width_pct"]
    key, seconds = s.cap(path)
    return (f"{label}: 95 % CI of the median ±{half:.1f} % after {res['n']} runs, target ±{s.target_ci_pct:g} % "
            f"not reached within bench.{key}={seconds:g}")
