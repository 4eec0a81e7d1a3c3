"""The "latency" section: time to first token, decode speed, one-time costs, and how far from the bounds.

Each phase is timed on its own, never derived by subtracting one mean from another:
  * prefill / TTFT: one forward pass over the prompt that produces the first token (logits of the last
    position, argmax), timed per call, at every (batch size, prompt length);
  * decode, three paths, each timed by per-step stamps (CUDA events on the stream, no sync inside the loop;
    perf_counter on CPU); step intervals are the per-token latencies, and tokens/s of a run is
    batch * (steps - 1) / (last stamp - first stamp), which excludes the prefill:
      - ``eager``: ``generate`` with the dynamic cache (stamped by a logits processor after each step's forward);
      - ``static``: ``generate`` with the static cache, whose decode step transformers compiles to CUDA graphs;
      - ``graph``: the modeling code's ceiling: the very compiled decode step ``static`` uses (same compiled
        function, same static cache, same arguments: no second compile), called in a tight loop with the
        previous step's argmax fed back, and nothing of ``generate``'s per-step Python around it.
Generation is forced to ``bench.new_tokens``: min_new_tokens == max_new_tokens (EOS suppressed by
transformers' MinNewTokensLengthLogitsProcessor for every step), greedy; a run that comes back shorter raises.

Every timed figure repeats until the 95 % CI of its median is within ``bench.target_ci_pct`` % of it, or its
time cap ``bench.max_time_per_figure_s`` is spent (then ``precision.stopped_by`` says ``time_cap``): see
qbench.measure.timing.repeat. The first calls of the compiled paths at each batch size (where torch.compile
traces and code-generates the step) may take ``bench.max_compile_s`` together: the one that runs past what is left
is stopped and its path recorded as unsupported from that batch size, with that reason, not left to hold the GPU
for many minutes (a compile with Inductor's kernel tuning on can take many times a plain one:
docs/latency.md#what-the-defaults-cost). The
loop is batch-major (every path at batch 1, then at batch 8, ...) so that ``graph`` reuses what ``static`` just
compiled and warmed up at the same shapes.
"""
from __future__ import annotations

import contextlib
import inspect
import itertools
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

from qbench.measure import bandwidth, gpu_specs, gpu_state, memory, stats, timing

DECODE_PATHS = ("eager", "static", "graph")
COMPILED_PATHS = ("static", "graph")
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


def generate_timed(model, input_ids, attention_mask, new_tokens: int, path: str, device: Any, pad_token_id: int,
                   compile_config: Any = None) -> Dict[str, Any]:
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
    if path in COMPILED_PATHS:
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


def record_decode_steps(model, input_ids, attention_mask, new_tokens: int, device: Any, pad_token_id: int,
                        compile_config: Any = None) -> List[Dict[str, Any]]:
    """The arguments ``generate`` hands its compiled decode step, one dict per step, from one static generate.

    transformers keeps the compiled step in ``model._compiled_call`` (``get_compiled_call``) and the static cache
    in ``model._cache``, both reused by every later generate of the same shapes. Wrapping the compiled call for
    one generate records its keyword arguments: replaying them calls the same compiled function with the same
    guards (no recompile) on the same cache, which generate has just filled with this prompt (the prefill).
    Raises RuntimeError when generate did not call a compiled step once per decode token."""
    if getattr(model, "_compiled_call", None) is None:  # no static generate ran yet: one makes the compiled step
        generate_timed(model, input_ids, attention_mask, new_tokens, "static", device, pad_token_id, compile_config)
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
        generate_timed(model, input_ids, attention_mask, new_tokens, "static", device, pad_token_id, compile_config)
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


def _graph_breaks() -> Optional[int]:
    try:
        from torch._dynamo.utils import counters

        return int(sum(counters["graph_break"].values()))
    except Exception:
        return None


# ----------------------------------------------------------------------------------------------- settings
@dataclass
class Settings:
    """The bench keys latency reads (qbench.config.BenchConfig documents each; its defaults are the only ones)."""

    batch_sizes: List[int]
    prompt_tokens: List[int]
    decode_prompt_tokens: int
    new_tokens: int
    decode_paths: List[str]
    compiled_batch_sizes: List[int]
    warmup_runs: int
    max_warmup_runs: int
    warmup_steady_pct: float
    min_repeats: int
    max_repeats: int
    min_duration_s: float
    target_ci_pct: Optional[float]
    max_time_per_figure_s: Optional[float]
    max_time_per_eager_figure_s: Optional[float]
    max_compile_s: Optional[float]
    cv_warn_threshold: float
    seed: int
    gpu_spec_overrides: Dict[str, Any]
    measure_copy_bandwidth: bool

    @classmethod
    def from_bench(cls, bench_cfg: Any) -> Settings:
        def get(key):
            return getattr(bench_cfg, key)

        paths = [str(p) for p in get("decode_paths")]
        unknown = [p for p in paths if p not in DECODE_PATHS]
        if unknown:
            raise ValueError(f"bench.decode_paths: unknown {unknown}; known: {', '.join(DECODE_PATHS)}")
        return cls(
            batch_sizes=[int(b) for b in get("batch_sizes")], prompt_tokens=[int(p) for p in get("prompt_tokens")],
            decode_prompt_tokens=int(get("decode_prompt_tokens")), new_tokens=int(get("new_tokens")),
            decode_paths=[p for p in DECODE_PATHS if p in paths],  # static before graph: graph replays static's
            compiled_batch_sizes=[int(b) for b in (get("compiled_batch_sizes") or get("batch_sizes"))],
            warmup_runs=int(get("warmup_runs")),
            max_warmup_runs=max(int(get("warmup_runs")), int(get("max_warmup_runs"))),
            warmup_steady_pct=float(get("warmup_steady_pct")), min_repeats=int(get("min_repeats")),
            max_repeats=int(get("max_repeats")), min_duration_s=float(get("min_duration_s")),
            target_ci_pct=None if get("target_ci_pct") is None else float(get("target_ci_pct")),
            max_time_per_figure_s=None if get("max_time_per_figure_s") is None else float(get("max_time_per_figure_s")),
            max_time_per_eager_figure_s=(None if get("max_time_per_eager_figure_s") is None
                                         else float(get("max_time_per_eager_figure_s"))),
            max_compile_s=None if get("max_compile_s") is None else float(get("max_compile_s")),
            cv_warn_threshold=float(get("cv_warn_threshold")), seed=int(get("seed")),
            gpu_spec_overrides=dict(get("gpu_spec_overrides") or {}),
            measure_copy_bandwidth=bool(get("measure_copy_bandwidth")),
        )

    def cap(self, path: Optional[str] = None) -> Tuple[str, Optional[float]]:
        """(bench key, seconds) of the time cap of a figure of decode ``path`` (None: a prefill figure)."""
        if path == "eager" and self.max_time_per_eager_figure_s is not None:
            return "max_time_per_eager_figure_s", self.max_time_per_eager_figure_s
        return "max_time_per_figure_s", self.max_time_per_figure_s

    def loop(self, path: Optional[str] = None) -> Dict[str, Any]:
        """timing.repeat's keywords for one figure of decode ``path`` (None: prefill). Prefill and the compiled
        paths have a transient after their first call (GPU clocks ramp up over the first prefill calls; a compiled
        path keeps speeding up for a few calls after its compile), so they warm up until steady, up to
        max_warmup_runs. Eager decode has none (its later warm-ups run as fast as its timed runs), and on a noisy
        host "still faster" is a coin toss that only costs time; it warms up warmup_runs only."""
        return dict(warmup_runs=self.warmup_runs,
                    max_warmup_runs=self.warmup_runs if path == "eager" else self.max_warmup_runs,
                    steady_pct=self.warmup_steady_pct, min_repeats=self.min_repeats, max_repeats=self.max_repeats,
                    min_duration_s=self.min_duration_s, target_ci_pct=self.target_ci_pct,
                    max_time_s=self.cap(path)[1])

    def record(self) -> Dict[str, Any]:
        out = dict(self.__dict__)
        out.pop("gpu_spec_overrides")
        return out


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


# ----------------------------------------------------------------------------------------------- prefill
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


# ----------------------------------------------------------------------------------------------- decode
def _tokens_per_s(batch: int) -> Callable[[List[float]], float]:
    return lambda steps: batch * (len(steps) - 1) / (steps[-1] - steps[0])


def _decode_label(path: str, batch: int) -> str:
    """How the log, the warnings and the compile messages name one decode figure."""
    return f"decode {path} bs={batch}"


def _compile_left_s(s: Settings, spent: List[float]) -> Optional[float]:
    """What is left of bench.max_compile_s after the cell's compiles so far (None: no limit)."""
    return None if s.max_compile_s is None else s.max_compile_s - sum(spent)


def _compile_deadline(s: Settings, path: str, batch: int, spent: List[float]):
    """The limit on a compiled path's first call at a batch size, where torch.compile does its work: what is left
    of bench.max_compile_s after the cell's earlier compiles, ``spent`` (none when it is null). The block's
    duration is appended to ``spent``."""
    label = _decode_label(path, batch)
    left_s = _compile_left_s(s, spent)
    if left_s is None:
        return _timed_block(contextlib.nullcontext(), spent, label)
    used = s.max_compile_s - left_s
    earlier = f" ({used:.0f} s of it spent on the cell's earlier compiles)" if used >= 0.5 else ""
    return _timed_block(timing.deadline(left_s, f"torch.compile of the {path} decode step at batch {batch} ran past "
                                                f"bench.max_compile_s={s.max_compile_s:g} s{earlier}"),
                        spent, label)


@contextlib.contextmanager
def _timed_block(inner, spent: List[float], label: str, every_s: float = 30.0):
    """``inner`` timed into ``spent``; meanwhile a line in the log every ``every_s`` while it runs, from a thread
    of its own: if a compile outlives its deadline (stuck in native code, where no alarm reaches), the log shows
    it still going, which a cell stopped from outside would otherwise not say."""
    import threading

    t0 = time.perf_counter()
    done = threading.Event()

    def heartbeat():
        while not done.wait(every_s):
            log.info("%s: first call (compile) still running after %.0f s", label, time.perf_counter() - t0)

    threading.Thread(target=heartbeat, daemon=True, name="qbench-compile-heartbeat").start()
    try:
        with inner:
            yield
    finally:
        done.set()
        spent.append(time.perf_counter() - t0)


def _decode_runner(t: Target, s: Settings, path: str, batch: int, energy_runs: List[Optional[float]],
                   compile_spent: List[float]):
    """The run_once of one (path, batch size): returns a run's step stamps, records its GPU energy. A compiled
    path's first call (graph's: its recording, a static generate if none ran) runs under what is left of
    bench.max_compile_s, its duration appended to ``compile_spent``."""
    ids, mask = random_prompt(batch, s.decode_prompt_tokens, t.vocab, t.special_ids, s.seed, t.in_device)
    first = path == "static"
    if path == "graph":
        with _compile_deadline(s, path, batch, compile_spent):
            calls = record_decode_steps(t.model, ids, mask, s.new_tokens, t.device, t.pad_token_id, t.compile_config)

        def timed():
            return graph_decode_timed(t.model, calls, t.device)["steps_s"]
    else:
        def timed():
            return generate_timed(t.model, ids, mask, s.new_tokens, path, t.device, t.pad_token_id,
                                  t.compile_config)["steps_s"]

    def run_once():
        nonlocal first
        e0 = gpu_state.total_energy_j(t.device, t.gpu_indices) if t.cuda else None
        with _compile_deadline(s, path, batch, compile_spent) if first else contextlib.nullcontext():
            steps = timed()
        first = False
        e1 = gpu_state.total_energy_j(t.device, t.gpu_indices) if t.cuda else None
        energy_runs.append(e1 - e0 if e0 is not None and e1 is not None else None)
        return steps

    return run_once


def decode_row(t: Target, s: Settings, path: str, batch: int, compile_spent: Optional[List[float]] = None) -> tuple:
    """(row, repeat result) of one decode figure: the runs of ``path`` at ``batch`` and their bounds. A compiled
    path's first call may take what is left of bench.max_compile_s after ``compile_spent`` (the cell's earlier
    compiles), and its duration is appended there."""
    energy_runs: List[Optional[float]] = []
    run_once = _decode_runner(t, s, path, batch, energy_runs, compile_spent if compile_spent is not None else [])
    breaks0 = _graph_breaks()
    res = timing.repeat(run_once, value_of=_tokens_per_s(batch), after_warmup=_say_if_slow(_decode_label(path, batch), s, path),
                        **s.loop(path))
    breaks1 = _graph_breaks()
    steps = res["results"]
    tps = stats.summarize([_tokens_per_s(batch)(x) for x in steps], "tokens/s")
    per_token = stats.summarize([(b - a) * 1e3 for x in steps for a, b in itertools.pairwise(x)], "ms")
    kv_seq = memory.kv_cache_bytes(t.model_config, 1, 1, t.kv_dtype_bytes) * mean_decode_context(s.decode_prompt_tokens, s.new_tokens)
    bound = bandwidth_bound_tokens_per_s(t.datasheet_bandwidth, t.weight_bytes_read_per_token, kv_seq, batch)
    measured_bound = bandwidth_bound_tokens_per_s(t.measured_bandwidth, t.weight_bytes_read_per_token, kv_seq, batch)
    timed_energy = energy_runs[len(energy_runs) - len(steps):]
    energy = None
    if timed_energy and all(e is not None for e in timed_energy):
        # GPU board energy over the timed runs (generate's prefill included; graph: decode steps only)
        energy = sum(timed_energy) / (len(timed_energy) * batch * s.new_tokens)
    row = {
        "decode_path": path, "batch_size": batch, "prompt_tokens": s.decode_prompt_tokens, "new_tokens": s.new_tokens,
        "tokens_per_s": tps, "per_token_ms": per_token,
        "bandwidth_bound_tokens_per_s": bound,
        "bandwidth_bound_fraction": tps["p50"] / bound if bound else None,
        "measured_bandwidth_bound_tokens_per_s": measured_bound,
        "measured_bandwidth_bound_fraction": tps["p50"] / measured_bound if measured_bound else None,
        "weight_bytes_read_per_step": t.weight_bytes_read_per_token,
        "kv_bytes_read_per_step": int(batch * kv_seq),
        "energy_j_per_token": energy,
        "compiled": path in COMPILED_PATHS and hasattr(t.model, "_compiled_call"),
        "graph_breaks": (breaks1 - breaks0) if path in COMPILED_PATHS and None not in (breaks0, breaks1) else None,
        "precision": _precision(res, s),
    }
    return row, res


def _reason_of(exc: BaseException) -> str:
    """One line for a path that failed: a compile deadline by its own message, even where Dynamo or Inductor
    wrapped it in an error of theirs."""
    cause: Optional[BaseException] = exc
    seen = set()
    while cause is not None and id(cause) not in seen and not isinstance(cause, timing.DeadlineExceeded):
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    exc = cause if isinstance(cause, timing.DeadlineExceeded) else exc
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:300] if text else ''}"


def measure_decode(t: Target, s: Settings, out: Dict[str, Any]) -> None:
    """Every decode path at every batch size, batch-major, into out["decode"] / out["unsupported"]."""
    import torch

    if s.new_tokens < 2:
        out["warnings"].append(f"decode: new_tokens={s.new_tokens}; per-step timing needs at least 2 tokens, decode not measured")
        return
    compile_anywhere = bool(getattr(t.compile_config, "_compile_all_devices", False))
    reason = {p: static_unsupported_reason(t.model, t.device, compile_anywhere) if p in COMPILED_PATHS else None
              for p in s.decode_paths}
    failed_at: Dict[str, int] = {}
    # bench.max_compile_s bounds the cell's compiles together (static at batch 1, its batch-dynamic recompile at
    # 8, graph's recordings): a limit per call would let a cell compile for that long once per batch size
    compile_spent: List[float] = []
    for batch in s.batch_sizes:
        for path in s.decode_paths:
            if reason[path] is not None:
                continue
            label = _decode_label(path, batch)
            if path in COMPILED_PATHS and batch not in s.compiled_batch_sizes:
                log.info("%s: not run (bench.compiled_batch_sizes=%s)", label, s.compiled_batch_sizes)
                continue
            left = _compile_left_s(s, compile_spent)
            if path in COMPILED_PATHS and left is not None:
                log.info("%s: starting (compiles may take %.1f s more of bench.max_compile_s)", label, left)
            try:
                row, res = decode_row(t, s, path, batch, compile_spent)
            except torch.OutOfMemoryError:
                raise  # the cell records it as class oom
            except Exception as exc:  # a method whose kernels cannot take this path (compile fails, ...)
                if path not in COMPILED_PATHS:
                    raise
                reason[path] = _reason_of(exc)
                failed_at[path] = batch
                log.warning("%s: not measured (%s)", label, reason[path])
                if path == "static" and "graph" in reason and reason["graph"] is None:
                    # graph replays static's compiled step: without it, it would compile that step itself
                    reason["graph"], failed_at["graph"] = f"needs the static path's compiled step ({reason[path]})", batch
                continue
            out["decode"].append(row)
            out["one_time"]["decode"].append({"decode_path": path, "batch_size": batch, "first_call_s": res["first_call_s"]})
            if path == "static" and out["one_time"]["compile_s"] is None:
                out["one_time"]["compile_s"] = res["first_call_s"]  # the first static generate compiles the step
            _log_figure(label, row["tokens_per_s"], res)
            out["warnings"].extend(w for w in (stats.cv_warning(label, row["tokens_per_s"], s.cv_warn_threshold),
                                               _precision_warning(label, res, s, path)) if w)
        out["kv_shapes"].append({"batch_size": batch, "seq_len_tokens": s.decode_prompt_tokens + s.new_tokens,
                                 "bytes": memory.kv_cache_bytes(t.model_config, batch, s.decode_prompt_tokens + s.new_tokens, t.kv_dtype_bytes)})
    for path in s.decode_paths:
        if reason[path] is not None:
            # batch_size: where it failed (larger batch sizes were not tried); null: the path never applies
            out["unsupported"].append({"decode_path": path, "reason": reason[path], "batch_size": failed_at.get(path)})
            at = f" from bs={failed_at[path]}" if path in failed_at else ""
            out["warnings"].append(f"decode {path}: not measured{at} ({reason[path]})")


# ----------------------------------------------------------------------------------------------- the section
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
