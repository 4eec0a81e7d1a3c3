"""What the generate-based paths share: one forced-length greedy ``generate`` with per-step stamps, and the rules
under which transformers compiles generate's decode step (those of every compiled path built on it)."""
from __future__ import annotations

import time
from typing import Any, Dict, List, Optional

from qbench.measure import timing


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


def generate_timed(model, input_ids, attention_mask, new_tokens: int, path: str, device: Any, pad_token_id: int,
                   compile_config: Any = None) -> Dict[str, Any]:
    """One forced-length greedy generate with per-step stamps. Returns {"steps_s", "wall_s", "output_ids"}.
    A compiled ``path`` generates with the static cache: the only cache whose decode step transformers compiles.

    Raises RuntimeError if the output is not exactly ``new_tokens`` longer than the prompt: a shorter run would
    make every figure wrong without anything looking wrong.
    """
    import torch
    from transformers import LogitsProcessorList

    from qbench.measure import decode_paths

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
    if decode_paths.compiled(path):
        kwargs["cache_implementation"] = "static"
        if compile_config is not None:
            kwargs["compile_config"] = compile_config
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


def static_unsupported_reason(model, device: Any, compile_anywhere: bool = False) -> Optional[str]:
    """Why transformers would not compile the static-cache decode of this model (then the path would time an
    uncompiled static cache under the name 'static'), or None. Mirrors GenerationMixin's auto-compile rules.
    ``compile_anywhere``: a compile config that asks for compilation on every device (tests on CPU)."""
    if not timing.is_cuda(device) and not compile_anywhere:
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


def compiled_generate_unsupported(t: Any) -> Optional[str]:
    """static_unsupported_reason for a latency Target: its compile config may ask to compile on every device."""
    compile_anywhere = bool(getattr(t.compile_config, "_compile_all_devices", False))
    return static_unsupported_reason(t.model, t.device, compile_anywhere)
