"""The method registry: every module of this folder whose name does not start with "_" is a method, its name the
method's ``kind``. Modules are imported lazily, and a method module imports nothing heavy (torch, transformers,
its library) at import time, so that listing, composing and validating stay fast and work without the library.

A method module owns everything about its method (no base class, no shared behaviour):

    Config                 its typed config block: a dataclass adding its own keys to qbench.config.MethodBase
                           (name, kind, dtype, description). Registered in Hydra's ConfigStore as
                           method/schema/<kind>; its YAML names it (``defaults: [schema/<kind>, _self_]``), so a
                           misspelt key fails at compose time and a result records only this method's keys.
                           Its fields declare MISSING: every value comes from the method's YAML (docs/config.md)
    EXTRA                  its install extra in pyproject.toml (None: needs nothing beyond qbench's own dependencies)
    LIBRARIES              the distributions whose versions every result of this method records
    validate(cfg)          raise qbench.errors.ConfigError naming the key for values the method cannot take
    load(source, cfg, device_map) -> (model, info)
                           the model from ``source`` (a qbench.load.models.Source) with the method applied; ``info``
                           is what the method did (library versions, quantize time, cache hit, kernels, ...),
                           stored in result.json under "method_info"
    linear_weight_bytes(out_features, in_features, cfg) -> float
                           analytic bytes of one quantized nn.Linear weight, scales and zeros included (a method
                           that quantizes nothing returns out*in*dtype_bytes)

Optional:

    QUANTIZED_LINEARS      which linears the analytic memory model counts as quantized: "decoder_layers"
                           (default: the text decoder's layers, as GPT-QModel does) or "transformers" (every
                           nn.Linear a transformers quantizer converts); see qbench.measure.memory
    STATE_ATTRS            where the library keeps quantization state that is neither a parameter nor a buffer:
                           {"parameter": attribute names on a weight, "module": attribute names on a layer};
                           qbench.measure.memory walks them (tensor subclasses are unpacked there, generically)
    is_quantized_module(module) -> bool
                           whether a loaded layer holds its weight quantized (qbench.measure.memory.quantized_share)
    COMPUTE_DTYPE          dtype of the matmuls when it is not the model's (e.g. "int8"): the compute bound's peak
    check_widths(cfg, widths, model_name)
                           preflight: ConfigError when the model's layer widths do not fit (e.g. group size)
    check_device(cfg, device, capability)
                           preflight and load: ConfigError when the method cannot run on this device
                           ("cpu" | "cuda", with the GPU's (major, minor) compute capability or None)

Adding a method: write qbench/methods/<kind>.py and conf/method/<name>.yaml, and add its extra to pyproject.toml
(and to the ``methods`` extra there). Nothing else names a method.
"""
from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType
from typing import List


def kinds() -> List[str]:
    """Every method kind: the public modules of this folder."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def get(kind: str, key: str = "method.kind") -> ModuleType:
    """The module implementing ``kind``; an unknown kind fails in one line naming the known ones."""
    from qbench.errors import ConfigError

    known = kinds()
    if kind not in known:
        raise ConfigError(f"{key}: unknown method '{kind}'; known: {', '.join(known)}")
    return importlib.import_module(f"{__name__}.{kind}")


def register_schemas() -> None:
    """Each method's Config as method/schema/<kind> in Hydra's ConfigStore (what its YAML's defaults name)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    for kind in kinds():
        cs.store(group="method/schema", name=kind, node=get(kind).Config)


def libraries(module: ModuleType) -> tuple:
    """The distributions whose versions a result of this method records."""
    return tuple(getattr(module, "LIBRARIES", ()))
