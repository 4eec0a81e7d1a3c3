"""qbench: what quantizing an LLM really costs and buys.

The pipeline, one module per stage: config (qbench.config) → load (qbench.models, qbench.methods) →
quantize (qbench.methods, qbench.quant_cache) → measure (qbench.measure) → store (qbench.store) →
report (qbench.report). qbench.cli runs cells; qbench.cell is one cell in its own process.
"""

__version__ = "0.1.0"
