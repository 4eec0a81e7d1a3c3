"""The "memory" section: weight bytes measured from the tensors, expected from arithmetic, KV cache, peaks.

Measured and analytic figures are computed independently, so that their ratio checks both: a method whose
quantization state hides somewhere the walk does not look shows up as a ratio below 1, a method module whose
``linear_weight_bytes`` forgets its scales as a ratio above 1.
"""
from __future__ import annotations

import contextlib
import copy
import math
import resource
import sys
from typing import Any, Dict, Iterator, List, Optional, Tuple

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1, "float8_e4m3fn": 1, "float8_e5m2": 1}

# Where a quantization library keeps tensors that are neither parameters nor buffers is the method's to say
# (its module's STATE_ATTRS: attribute names on weights and on layers). Tensor subclasses (torchao's quantized
# weights) hold no storage of their own: their inner tensors (__tensor_flatten__) are counted instead.


def dtype_bytes(dtype: Any) -> int:
    name = str(dtype).replace("torch.", "")
    if name not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype '{dtype}'; known: {', '.join(DTYPE_BYTES)}")
    return DTYPE_BYTES[name]


def _tensors_in(obj: Any, prefix: str, depth: int = 0) -> Iterator[Tuple[str, Any]]:
    """Tensors inside a quantization-state object (a QuantState, a dict of scales), nested states included."""
    import torch

    if obj is None or depth > 3:
        return
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
        return
    if isinstance(obj, (list, tuple)):
        for i, item in enumerate(obj):
            yield from _tensors_in(item, f"{prefix}.{i}", depth + 1)
        return
    if isinstance(obj, dict):
        for k, item in obj.items():
            yield from _tensors_in(item, f"{prefix}.{k}", depth + 1)
        return
    if isinstance(obj, (torch.nn.Module, str, bytes, int, float, bool, torch.dtype, torch.Size)):
        return
    attrs = getattr(obj, "__dict__", None)
    if attrs:
        for k, item in attrs.items():
            yield from _tensors_in(item, f"{prefix}.{k}", depth + 1)


def _storage_tensors(t: Any, name: str, depth: int = 0) -> Iterator[Tuple[str, Any]]:
    """The plain tensors holding ``t``'s bytes: ``t`` itself, or for a wrapper tensor subclass (torchao's
    Int8Tensor, Int4OpaqueTensor, Float8Tensor, ...) the inner tensors it flattens into, recursively."""
    import torch

    flatten = getattr(t, "__tensor_flatten__", None)
    if flatten is None or type(t) in (torch.Tensor, torch.nn.Parameter) or depth > 3:
        yield name, t
        return
    inner_names, _ctx = flatten()
    for inner in inner_names:
        value = getattr(t, inner, None)
        if isinstance(value, torch.Tensor):
            yield from _storage_tensors(value, f"{name}.{inner}", depth + 1)


def _byte_span(t) -> Tuple[int, int]:
    """[start, end) address range the tensor's elements occupy (strides considered, views handled)."""
    if t.numel() == 0:
        return t.data_ptr(), t.data_ptr()
    extent = 1 + sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))
    return t.data_ptr(), t.data_ptr() + extent * t.element_size()


def _union_bytes(spans: List[Tuple[int, int]]) -> int:
    total, cur_start, cur_end = 0, None, None
    for start, end in sorted(spans):
        if cur_end is None or start > cur_end:
            if cur_end is not None:
                total += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    if cur_end is not None:
        total += cur_end - cur_start
    return total


def model_tensors(model, method: Any = None) -> List[Tuple[str, str, Any]]:
    """(kind, name, tensor) for every tensor the model holds: parameters, persistent buffers, non-persistent
    buffers and the tensors of quantization states where ``method`` (a qbench.methods module) says its library
    keeps them (``STATE_ATTRS``). Tensor subclasses are replaced by their inner tensors. The same tensor may
    appear twice (tied weights, CB that is the weight's data): the byte counts dedupe by address."""
    state_attrs = getattr(method, "STATE_ATTRS", None) or {}
    param_attrs, module_attrs = state_attrs.get("parameter", ()), state_attrs.get("module", ())
    out: List[Tuple[str, str, Any]] = []
    for mod_name, module in model.named_modules(remove_duplicate=False):
        dot = f"{mod_name}." if mod_name else ""
        for name, p in module._parameters.items():
            if p is None:
                continue
            out.extend(("parameter", n, t) for n, t in _storage_tensors(p, dot + name))
            for attr in param_attrs:
                for tname, t in _tensors_in(getattr(p, attr, None), f"{dot}{name}.{attr}"):
                    out.append(("quant_state", tname, t))
        non_persistent = getattr(module, "_non_persistent_buffers_set", set())
        for name, b in module._buffers.items():
            if b is None:
                continue
            kind = "buffer_nonpersistent" if name in non_persistent else "buffer"
            out.extend((kind, n, t) for n, t in _storage_tensors(b, dot + name))
        for attr in module_attrs:
            value = module.__dict__.get(attr)
            for tname, t in _tensors_in(value, f"{dot}{attr}"):
                out.extend(("quant_state", n, inner) for n, inner in _storage_tensors(t, tname))
    return out


def weight_footprint(model, method: Any = None) -> Dict[str, Any]:
    """Bytes of the weights as held in memory, from every tensor, each byte counted once.

    ``weight_bytes_measured`` = parameters + persistent buffers + quantization states where ``method`` says
    its library keeps them (qbench.methods: STATE_ATTRS). Non-persistent buffers (rotary
    ``inv_freq``: derived, not weights) are reported apart in ``nonpersistent_buffer_bytes``. Tensors on the
    meta device (offloaded to disk) hold no memory here and are counted in ``meta_tensors``.
    Also ``weight_bytes_get_memory_footprint`` (transformers' figure, for comparison) and
    ``weight_bytes_read_per_token``: what one decode step reads, i.e. everything except an untied input
    embedding table, of which a step reads only one row per sequence.
    """
    by_kind_spans: Dict[str, Dict[str, List[Tuple[int, int]]]] = {}
    meta = 0
    n_tensors = 0
    for kind, _name, t in model_tensors(model, method):
        if t.device.type == "meta":
            meta += 1
            continue
        n_tensors += 1
        dev = str(t.device)
        bucket = "nonpersistent" if kind == "buffer_nonpersistent" else "weights"
        by_kind_spans.setdefault(bucket, {}).setdefault(dev, []).append(_byte_span(t))
        by_kind_spans.setdefault(kind, {}).setdefault(dev, []).append(_byte_span(t))

    def total(bucket: str) -> int:
        return sum(_union_bytes(s) for s in by_kind_spans.get(bucket, {}).values())

    by_device = {dev: _union_bytes(s) for dev, s in by_kind_spans.get("weights", {}).items()}
    measured = total("weights")

    try:
        emb = model.get_input_embeddings()
        out_emb = model.get_output_embeddings()
    except (AttributeError, NotImplementedError):  # not a causal LM: nothing to subtract
        emb = out_emb = None
    emb_bytes = 0
    tied = False
    if emb is not None and getattr(emb, "weight", None) is not None and emb.weight.device.type != "meta":
        w = emb.weight
        tied = out_emb is not None and getattr(out_emb, "weight", None) is not None and out_emb.weight.data_ptr() == w.data_ptr()
        emb_bytes = _union_bytes([_byte_span(w)])

    try:
        hf_footprint = int(model.get_memory_footprint())
    except Exception:  # not a transformers model (a bare nn.Module in tests) or a wrapper without it
        hf_footprint = None
    return {
        "weight_bytes_measured": measured,
        "weight_bytes_get_memory_footprint": hf_footprint,
        "weight_bytes_read_per_token": measured - (0 if tied else emb_bytes),
        "input_embedding_bytes": emb_bytes,
        "tied_embeddings": tied,
        "weight_bytes_by_kind": {k: total(k) for k in ("parameter", "buffer", "quant_state")},
        "weight_bytes_by_device": by_device,
        "nonpersistent_buffer_bytes": total("nonpersistent"),
        "tensors_counted": n_tensors,
        "meta_tensors": meta,
    }


# ---------------------------------------------------------------------------------------------------------
# What the method actually quantized

# A method that leaves more than this share of the decoder layers' weights untouched says so (MoE experts held
# as 3-D parameters, not nn.Linear, are invisible to most quantizers); and measured / analytic outside this band
# means the memory model does not describe what the model holds.
UNQUANTIZED_WARN_FRACTION = 0.10
RATIO_BAND = (0.99, 1.01)


def _logical_params(mod) -> int:
    """Weights a quantized layer stands for (its unquantized out x in), not the packed storage."""
    i, o = getattr(mod, "in_features", None), getattr(mod, "out_features", None)
    if isinstance(i, int) and isinstance(o, int):
        return i * o
    w = mod._parameters.get("weight")
    return int(math.prod(w.shape)) if w is not None else 0


def _owner(name: str, modules: Dict[str, Any]) -> Optional[str]:
    """The longest module name in ``modules`` that ``name`` (a tensor's dotted name) lies under."""
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        if ".".join(parts[:i]) in modules:
            return ".".join(parts[:i])
    return None


def quantized_share(model, method: Any = None) -> Dict[str, Any]:
    """Which share of the weights the method quantized, from the loaded model: parameters (logical counts:
    a 4-bit layer counts its out x in weights) and bytes (as held, quantization state included), of the whole
    model and of the decoder layers' weight matrices and tensors (ndim >= 2) alone, which every quantizing
    method here is meant to cover; plus the largest unquantized ones there, layer index as '*'. Which layers
    hold their weight quantized is the method's to say (``is_quantized_module``; none without it)."""
    import re

    is_quantized = getattr(method, "is_quantized_module", None) or (lambda _mod: False)
    qmods = {n: m for n, m in model.named_modules() if is_quantized(m)}
    layers = _decoder_layers(model, model.config) if hasattr(model, "config") else None
    in_layers = (lambda n: n.startswith(layers[0] + ".")) if layers else (lambda n: False)
    q_spans: Dict[str, List[Tuple[int, int]]] = {}
    all_spans: Dict[str, List[Tuple[int, int]]] = {}
    for kind, name, t in model_tensors(model, method):
        if t.device.type == "meta" or kind == "buffer_nonpersistent":
            continue
        all_spans.setdefault(str(t.device), []).append(_byte_span(t))
        if _owner(name, qmods) is not None and not name.endswith(".bias"):
            q_spans.setdefault(str(t.device), []).append(_byte_span(t))
    params_q = sum(_logical_params(m) for m in qmods.values())
    layer_q = sum(_logical_params(m) for n, m in qmods.items() if in_layers(n))
    params_other, layer_other, examples = 0, 0, {}
    for name, p in model.named_parameters():
        if _owner(name, qmods) is not None and not name.endswith(".bias"):
            continue
        params_other += p.numel()
        if in_layers(name) and p.dim() >= 2:
            layer_other += p.numel()
            pattern = re.sub(r"\.\d+\.", ".*.", name)
            examples[pattern] = examples.get(pattern, 0) + p.numel()
    q_bytes = sum(_union_bytes(s) for s in q_spans.values())
    all_bytes = sum(_union_bytes(s) for s in all_spans.values())
    layer_total = layer_q + layer_other
    return {
        "params_quantized_measured": params_q,
        "params_unquantized_measured": params_other,
        "quantized_params_fraction": params_q / (params_q + params_other) if params_q + params_other else None,
        "weight_bytes_quantized_measured": q_bytes,
        "quantized_bytes_fraction": q_bytes / all_bytes if all_bytes else None,
        "decoder_weight_params_total": layer_total,
        "decoder_weight_params_unquantized": layer_other,
        "decoder_unquantized_fraction": layer_other / layer_total if layer_total else None,
        "decoder_unquantized_largest": [k for k, _ in sorted(examples.items(), key=lambda kv: -kv[1])[:3]],
    }


def method_quantizes(method_module: Any, method_cfg: Any) -> bool:
    """Whether the method stores a linear layer in fewer bytes than its dtype (fp16/bf16/fp32 do not)."""
    n = 4096
    return float(method_module.linear_weight_bytes(n, n, method_cfg)) < n * n * dtype_bytes(method_cfg.dtype)


def memory_warnings(mem: Dict[str, Any], quantizes: bool) -> List[str]:
    """The warnings a cell's memory section calls for: the analytic model not matching what was measured,
    and a quantizing method that left a large share of the decoder layers' weights untouched."""
    out = []
    ratio = mem.get("weight_measured_over_analytic")
    lo, hi = RATIO_BAND
    if ratio is not None and not lo <= ratio <= hi:
        out.append(f"weight bytes measured / analytic = {ratio:.3f}, outside {lo}-{hi}: the memory model does not "
                   "describe what this model holds, so compression and bandwidth-bound figures are off")
    frac = mem.get("decoder_unquantized_fraction")
    if quantizes and frac is not None and frac > UNQUANTIZED_WARN_FRACTION:
        largest = ", ".join(mem.get("decoder_unquantized_largest") or []) or "?"
        out.append(f"{100 * frac:.1f} % of the decoder layers' weights stay unquantized (largest: {largest}): "
                   "memory, speed and accuracy mostly reflect the unquantized dtype, not this method")
    return out


# ---------------------------------------------------------------------------------------------------------
# Analytic


def _as_config(hf_config: Any):
    if isinstance(hf_config, dict):
        from transformers import AutoConfig

        d = {k: v for k, v in hf_config.items() if k not in ("transformers_version",)}
        return AutoConfig.for_model(d.pop("model_type"), **d)
    return hf_config


def _decoder_layers(model, config) -> Optional[Any]:
    """The ModuleList of decoder layers: the longest ModuleList named "...layers" (Llama: model.layers)."""
    import torch

    n_layers = getattr(config.get_text_config(), "num_hidden_layers", None)
    best = None
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and name.split(".")[-1] in ("layers", "h", "blocks", "layer"):
            if best is None or len(mod) > len(best[1]) or (n_layers is not None and len(mod) == n_layers and len(best[1]) != n_layers):
                best = (name, mod)
    return best


def quantized_linears_of(model, config, rule: str) -> List[Tuple[str, Any]]:
    """(name, nn.Linear) the method quantizes, by the method module's ``QUANTIZED_LINEARS`` rule:

    - "decoder_layers": the linears inside the text decoder's layers (what GPT-QModel quantizes);
    - "transformers": every plain nn.Linear that a transformers quantizer converts by default, i.e. all but
      the modules its own ``get_modules_to_not_convert`` skips (output embedding, tied weights, the model's
      last parameter, ``_keep_in_fp32_modules``), asked of transformers rather than copied.
    """
    import torch

    if rule == "transformers":
        from transformers.quantizers.base import HfQuantizer
        from transformers.quantizers.quantizers_utils import should_convert_module

        skip = HfQuantizer.get_modules_to_not_convert(model, None, getattr(model, "_keep_in_fp32_modules", None))
        return [(name, mod) for name, mod in model.named_modules()
                if type(mod) is torch.nn.Linear and should_convert_module(name, skip)]
    if rule != "decoder_layers":
        raise ValueError(f"QUANTIZED_LINEARS: unknown rule '{rule}' (decoder_layers | transformers)")
    layers = _decoder_layers(model, config)
    if layers is None:
        return []
    return [(f"{layers[0]}.{name}", mod) for name, mod in layers[1].named_modules() if isinstance(mod, torch.nn.Linear)]


def analytic_weights(hf_config: Any, method_module: Any, method_cfg: Any, trust_remote_code: bool = False) -> Dict[str, Any]:
    """Weight bytes expected from parameter counts and the method's bits per weight.

    The architecture is built on the meta device (no memory, no weights) and walked: every nn.Linear the
    method quantizes (``quantized_linears_of``: the decoder layers', or every one a transformers quantizer
    converts, vision tower and projector of a multimodal model included) costs
    ``method_module.linear_weight_bytes(out, in, method_cfg)``, its
    bias ``method_cfg.dtype`` bytes per element (16-bit for every quantizing method); everything else
    (embeddings, norms, lm_head, persistent buffers) costs its elements times ``method_cfg.dtype`` bytes.
    Tied weights are one parameter, counted once.
    """
    import torch
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(_as_config(hf_config))
    # A loaded model's config carries its quantization_config: the analytic figure wants the plain
    # architecture, the method's bytes come from method_module.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    other_bytes = dtype_bytes(method_cfg.dtype)

    quantized_linears = quantized_linears_of(model, config, getattr(method_module, "QUANTIZED_LINEARS", "decoder_layers"))
    quantized_ids = {id(mod.weight) for _name, mod in quantized_linears}

    linear_bytes = 0.0
    params_quantized = 0
    for _name, mod in quantized_linears:
        linear_bytes += float(method_module.linear_weight_bytes(mod.out_features, mod.in_features, method_cfg))
        params_quantized += mod.out_features * mod.in_features

    params_total = 0
    other_elements = 0
    for _name, p in model.named_parameters():  # remove_duplicate=True: a tied weight is listed once
        params_total += p.numel()
        if id(p) not in quantized_ids:
            other_elements += p.numel()  # biases of quantized linears land here too, at method dtype
    buffer_bytes = 0
    for mod in model.modules():
        non_persistent = getattr(mod, "_non_persistent_buffers_set", set())
        for name, b in mod._buffers.items():
            if b is not None and name not in non_persistent:
                buffer_bytes += b.numel() * b.element_size()

    total = linear_bytes + other_elements * other_bytes + buffer_bytes
    return {
        "weight_bytes_analytic": int(round(total)),
        "weight_bytes_analytic_quantized_linears": int(round(linear_bytes)),
        "weight_bytes_analytic_other": other_elements * other_bytes + buffer_bytes,
        "params_total": params_total,
        "params_quantized": params_quantized,
        "bits_per_weight_quantized": (8.0 * linear_bytes / params_quantized) if params_quantized else None,
        "quantized_linears": len(quantized_linears),
        "tied_embeddings": bool(getattr(config.get_text_config(), "tie_word_embeddings", False)),
    }


def kv_cache_bytes(hf_config: Any, batch: int, seq_len: int, dtype_bytes: int) -> int:
    """Bytes of a full-attention KV cache: K and V, per layer, per sequence, per token, per KV head.

    2 * layers * batch * seq_len * kv_heads * head_dim * dtype_bytes. (Sliding-window layers would hold less;
    the models benchmarked here use full attention in every layer.)
    """
    cfg = _as_config(hf_config) if isinstance(hf_config, dict) else hf_config
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return 2 * cfg.num_hidden_layers * batch * seq_len * kv_heads * head_dim * dtype_bytes


# ---------------------------------------------------------------------------------------------------------
# Peaks per phase


def rss_peak_bytes() -> int:
    """Peak resident set size of this process so far (ru_maxrss: kilobytes on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = int(peak) if sys.platform == "darwin" else int(peak) * 1024
    # The kernel updates ru_maxrss lazily; the current RSS can be a few pages above it.
    return max(peak, rss_bytes() or 0)


def rss_bytes() -> Optional[int]:
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except Exception:
        return None


class PhaseMemory:
    """Per-phase memory: CUDA allocator peaks (reset at each phase start), NVML used memory at each phase
    end, RSS at each phase end, and the process's RSS peak. On CPU the CUDA and NVML fields are null.

        pm = PhaseMemory(device)
        with pm.phase("load"):
            ...
        result["metrics"]["memory"].update(pm.summary())
    """

    def __init__(self, device: Any, cuda_indices: Optional[List[int]] = None):
        from qbench.measure import gpu_state

        self.device = device
        self.indices = gpu_state.cuda_indices(device, cuda_indices)
        self.peak_allocated: Dict[str, int] = {}
        self.peak_reserved: Dict[str, int] = {}
        self.nvml_used: Dict[str, Optional[int]] = {}
        self.rss_end: Dict[str, Optional[int]] = {}

    def start(self, name: str) -> None:
        if self.indices:
            import torch

            for i in self.indices:
                torch.cuda.synchronize(i)
                torch.cuda.reset_peak_memory_stats(i)

    def end(self, name: str) -> None:
        # Peaks are summed over the cell's GPUs (a model spread with device_map="auto"); with one GPU it is
        # that GPU's peak.
        if self.indices:
            import torch

            from qbench.measure import gpu_state

            for i in self.indices:
                torch.cuda.synchronize(i)
            self.peak_allocated[name] = sum(int(torch.cuda.max_memory_allocated(i)) for i in self.indices)
            self.peak_reserved[name] = sum(int(torch.cuda.max_memory_reserved(i)) for i in self.indices)
            self.nvml_used[name] = gpu_state.nvml_used_bytes(self.device, self.indices)
        self.rss_end[name] = rss_bytes()

    @contextlib.contextmanager
    def phase(self, name: str):
        self.start(name)
        try:
            yield self
        finally:
            self.end(name)

    def summary(self) -> Dict[str, Any]:
        gpu = bool(self.indices)
        return {
            "peak_allocated_bytes": dict(self.peak_allocated) if gpu else None,
            "peak_reserved_bytes": dict(self.peak_reserved) if gpu else None,
            "nvml_used_bytes": dict(self.nvml_used) if gpu else None,
            "rss_bytes_at_phase_end": dict(self.rss_end),
            "rss_peak_bytes": rss_peak_bytes(),
        }
