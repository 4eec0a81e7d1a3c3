"""qbench: what quantizing an LLM really costs and buys.

One folder per pipeline stage, arrows pointing down:
run/ (the sweep and one cell's recipe) → load/ (sources, calibration, quantized cache) and methods/ (one module per
method) → measure/ (memory, latency) and evaluate/ (lm-eval accuracy with its task files, quality vs the baseline)
→ store (result.json) → config, errors. report/ reads runs/ afterwards and imports nothing from run/.
"""

__version__ = "0.1.0"
