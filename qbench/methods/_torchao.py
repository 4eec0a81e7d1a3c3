"""What every torchao method passes to its torchao config, and why.

torchao 0.18's configs default to ``set_inductor_config=True``: applying one calls
``torchao.quantization.utils.recommended_inductor_config_setter()``, which switches on Inductor's coordinate-descent
tuning (all directions) and int-mm fusion for the whole process. A torchao cell's compiled decode paths (static,
graph) would then get kernel tuning that no other method's cell gets, and take far longer to compile, since
that tuning benchmarks each generated kernel's block sizes, many times a plain compile
(docs/latency.md#what-the-defaults-cost). Every method compiles under the same Inductor settings instead, so
that compile times and kernels compare; ``quantization_config`` in the result records it.
"""
from __future__ import annotations

CONFIG_KWARGS = {"set_inductor_config": False}
