"""The method registry: a flat name -> module map, imported lazily.

Each method is one plain module with three functions (no base class):

    validate(method_cfg) -> None
        raise qbench.config.ConfigError naming the key for values the method cannot take.
    load(source, method_cfg, device_map) -> (model, info)
        build the model from ``source`` (a qbench.models.Source) with this method applied; ``info`` is a
        dict of what the method did (library versions, quantization time, cache hit, kernels, ...) that
        goes into result.json under "method_info".
    linear_weight_bytes(out_features, in_features, method_cfg) -> float
        analytic bytes one quantized nn.Linear weight takes (scales and zeros included); the methods that
        quantize nothing return out*in*dtype_bytes.

Optional: ``QUANTIZED_LINEARS``, which linears the analytic memory model counts as quantized: "decoder_layers"
(default: the text decoder's layers, as GPT-QModel does) or "transformers_bnb" (every nn.Linear transformers'
bitsandbytes integration converts); see qbench.measure.memory.quantized_linears_of.

Adding a method: write qbench/methods/<kind>.py and conf/method/<name>.yaml, then add one line below.
"""
from __future__ import annotations

import importlib
from types import ModuleType

REGISTRY: dict[str, str] = {
    "dtype": "qbench.methods.dtype",  # fp32 / fp16 / bf16: no quantization, a cast
    "bnb_int8": "qbench.methods.bnb_int8",  # bitsandbytes LLM.int8
    "bnb_4bit": "qbench.methods.bnb_4bit",  # bitsandbytes NF4 / FP4
    "gptq": "qbench.methods.gptq",  # GPT-QModel GPTQ
    "awq": "qbench.methods.awq",  # GPT-QModel AWQ
}


def get(kind: str, key: str = "method.kind") -> ModuleType:
    """The module implementing ``kind``; an unknown kind fails naming the known ones."""
    from qbench.config import ConfigError

    if kind not in REGISTRY:
        raise ConfigError(f"{key}: unknown method '{kind}'; known: {', '.join(sorted(REGISTRY))}")
    return importlib.import_module(REGISTRY[kind])
