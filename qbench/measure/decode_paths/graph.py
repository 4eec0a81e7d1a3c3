"""``graph``: the modeling code's ceiling: the very compiled decode step ``static`` uses (same compiled function,
same static cache, same arguments: no second compile), called in a tight loop with the previous step's argmax fed
back, and nothing of ``generate``'s per-step Python around it. Its recording (one static generate whose compiled
calls are captured, after one that compiles the step if none ran) is its compile-time work."""
from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Dict, List, Optional

from qbench.measure import timing
from qbench.measure.decode_paths import _generate

LABEL = "graph"
DESCRIPTION = "compiled step only"
ORDER = 30  # after static: it replays the step static compiled at the same shapes
COMPILED = True
FIRST_CALL_COMPILES = False  # prepare records (and compiles, if static did not) under the compile limit
REPLAYS = "static"


def unsupported_reason(t: Any) -> Optional[str]:
    return _generate.compiled_generate_unsupported(t)


def prepare(t: Any, s: Any, ids: Any, mask: Any, compile_limit: Callable[[], Any]) -> Callable[[], List[float]]:
    with compile_limit():
        calls = record_decode_steps(t.model, ids, mask, s.new_tokens, t.device, t.pad_token_id, t.compile_config)

    def run() -> List[float]:
        return graph_decode_timed(t.model, calls, t.device)["steps_s"]

    return run


def record_decode_steps(model, input_ids, attention_mask, new_tokens: int, device: Any, pad_token_id: int,
                        compile_config: Any = None) -> List[Dict[str, Any]]:
    """The arguments ``generate`` hands its compiled decode step, one dict per step, from one static generate.

    transformers keeps the compiled step in ``model._compiled_call`` (``get_compiled_call``) and the static cache
    in ``model._cache``, both reused by every later generate of the same shapes. Wrapping the compiled call for
    one generate records its keyword arguments: replaying them calls the same compiled function with the same
    guards (no recompile) on the same cache, which generate has just filled with this prompt (the prefill).
    Raises RuntimeError when generate did not call a compiled step once per decode token."""
    if getattr(model, "_compiled_call", None) is None:  # no static generate ran yet: one makes the compiled step
        _generate.generate_timed(model, input_ids, attention_mask, new_tokens, "static", device, pad_token_id, compile_config)
    compiled = getattr(model, "_compiled_call", None)
    if compiled is None:
        raise RuntimeError("generate compiled no decode step (model._compiled_call is missing)")
    calls: List[Dict[str, Any]] = []

    def recorder(*args, **kwargs):
        if args:
            raise RuntimeError("the compiled decode step was called with positional arguments")
        calls.append(dict(kwargs))
        return compiled(**kwargs)

    model._compiled_call = recorder
    try:
        _generate.generate_timed(model, input_ids, attention_mask, new_tokens, "static", device, pad_token_id, compile_config)
    finally:
        model._compiled_call = compiled
    if len(calls) != new_tokens - 1 or "input_ids" not in calls[0]:
        raise RuntimeError(f"generate called its compiled decode step {len(calls)} times for {new_tokens - 1} "
                           "decode tokens: no tight loop to replay")
    cache = _cache_of(calls)
    filled = int(cache.get_seq_length()) if hasattr(cache, "get_seq_length") else None
    graph_decode_timed(model, calls, device)
    again = int(cache.get_seq_length()) if hasattr(cache, "get_seq_length") else None
    if filled != again:  # the replay did not write where generate wrote: this cache keeps its place elsewhere
        raise RuntimeError(f"replayed decode steps left the cache at {again} tokens, generate at {filled}")
    return calls


def _cache_of(calls: List[Dict[str, Any]]) -> Any:
    kwargs = calls[0]
    return kwargs.get("past_key_values", kwargs.get("cache"))


def rewind_cache(calls: List[Dict[str, Any]]) -> None:
    """Put the static cache back where the prefill left it. transformers 5's static layers place each new key at
    their own ``cumulative_length`` counter (a tensor, so that compiled code does not recompile as it moves), not
    at an argument of the call: a replay must first move the counters back by the steps it is about to replay.
    In place, as generate's own updates are: the compiled graphs hold the counter's address."""
    layers = getattr(_cache_of(calls), "layers", None) or []
    for layer in layers:
        counter = getattr(layer, "cumulative_length", None)
        if counter is not None and hasattr(counter, "sub_") and getattr(layer, "is_initialized", True):
            counter.sub_(len(calls))


def graph_decode_timed(model, calls: List[Dict[str, Any]], device: Any) -> Dict[str, Any]:
    """One tight loop over the recorded decode steps: the compiled step only, its argmax fed to the next step.
    Stamps as generate_timed: one before the first decode step (where generate's first stamp follows the
    prefill) and one after each step. Returns {"steps_s", "tokens"}."""
    import torch

    step = model._compiled_call
    cuda = timing.is_cuda(device)
    token = calls[0]["input_ids"]
    tokens: List[Any] = []  # each step's argmax, [batch, 1]: kept on the device, looked at only by tests
    # generate's grad mode (the compiled step's guards include it) and its decode-time switches (MoE kernels)
    decode_mode = getattr(model, "_optimize_model_for_decode", None)
    with torch.inference_mode(), torch.no_grad(), (decode_mode() if decode_mode else contextlib.nullcontext()):
        rewind_cache(calls)
        timing.synchronize(device)
        if cuda:  # events on the stream: no sync inside the loop
            events = [torch.cuda.Event(enable_timing=True) for _ in range(len(calls) + 1)]
            stamp = lambda i: events[i].record()  # noqa: E731
        else:
            stamps = [0.0] * (len(calls) + 1)
            stamp = lambda i: stamps.__setitem__(i, time.perf_counter())  # noqa: E731
        stamp(0)
        for i, kwargs in enumerate(calls):
            token = step(**{**kwargs, "input_ids": token}).logits[:, -1:, :].argmax(-1)
            tokens.append(token)
            stamp(i + 1)
    if cuda:
        events[-1].synchronize()
        return {"steps_s": [events[0].elapsed_time(e) / 1e3 for e in events], "tokens": tokens}
    return {"steps_s": [t - stamps[0] for t in stamps], "tokens": tokens}
