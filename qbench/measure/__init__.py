"""Measurement: statistics, timers, latency, memory, GPU specs and GPU state (the "memory" and "latency" sections of result.json)."""
