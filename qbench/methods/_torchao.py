"""What every torchao method passes to its torchao config, and why.

torchao 0.18's configs default to ``set_inductor_config=True``: applying one calls
``torchao.quantization.utils.recommended_inductor_config_setter()``, which switches on Inductor's coordinate-descent
tuning (all directions) and int-mm fusion for the whole process. A torchao cell's compiled decode paths (static,
graph) would then get kernel tuning that no other method's cell gets, and take far longer to compile, since
that tuning benchmarks each generated kernel's block sizes: on the H200, 8B shape, torchao int8 weight-only's
first static generate had not finished after about 140 s, and float8's after about 8 min, against 37-61 s for bf16. Every
method compiles under the same Inductor settings instead; ``quantization_config`` in the result records it.
"""
from __future__ import annotations

CONFIG_KWARGS = {"set_inductor_config": False}
