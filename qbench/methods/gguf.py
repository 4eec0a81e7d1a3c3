"""GGUF quantization through llama.cpp (Q8_0 and the k-quants Q6_K, Q5_K_M, Q4_K_M, Q3_K_M), run by llama.cpp.

The source folder is converted once to an f32 GGUF by llama.cpp's own converter and quantized by
``llama_model_quantize`` (what ``llama-quantize`` runs), both cached under ``<cache>/quantized/<key>`` keyed by the
source's fingerprint, the quant type and llama-cpp-python's version (qbench/load/quant_cache.py). The model then runs
in llama.cpp, not torch, in a worker process of its own (llama.cpp and torch crash in one process on a CUDA node:
qbench/methods/_llamacpp_worker.py), so this module measures it itself, through three hooks qbench/run/cell.py calls when a method
has them: ``measure_memory`` (the weight bytes llama.cpp holds; the tensor types the file holds),
``measure_latency`` (prefill and decode in llama.cpp's loop) and ``lm_eval_model`` (lm-eval's MMLU/GSM8K through
an adapter over the same llama.cpp model: qbench/methods/_llamacpp_lm.py).
Quality needs no hook: the loaded model answers ``model(ids).logits`` from llama.cpp's full-vocabulary logits, so
qbench.evaluate.quality scores it on the same windows against the same baseline as every torch cell.

k-quants work on super-blocks of 256 weights along a row: a tensor whose rows are not a multiple of 256 long
(SmolLM2-135M's hidden 576, the tiny model's 128) gets llama.cpp's fallback type (Q4_K -> Q5_0, Q5_K -> Q5_1,
Q6_K -> Q8_0, Q3_K -> Q4_0). The result counts the tensors of each type (metrics.memory.tensor_types).
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from omegaconf import MISSING

from qbench.config import MethodBase
from qbench.methods import _llamacpp as lc

LOG = logging.getLogger(__name__)

KIND = "gguf"
EXTRA = "gguf"
LIBRARIES = ("llama-cpp-python", "gguf", "sentencepiece")
QUANT_TYPES = tuple(lc.FTYPES)
SUPER_BLOCK = 256  # weights per k-quant super-block (QK_K)
# llama.cpp's tensor_type_fallback (src/llama-quant.cpp): the type a row not divisible by 256 gets, and its bits
FALLBACK = {"Q6_K": ("Q8_0", 8.5), "Q5_K": ("Q5_1", 6.0), "Q4_K": ("Q5_0", 5.5), "Q3_K": ("Q4_0", 4.5)}


@dataclass
class ImatrixConfig:
    """method.imatrix: an importance matrix from llama-imatrix on the f32 GGUF over a calibration text, applied by
    llama-quantize --imatrix (both built by `make llama-tools`). Off in every shipped YAML, as llama-quantize has it;
    each key's value comes from the method's YAML."""

    enabled: bool = MISSING
    # calibration text: as gptq/awq's method.calibration.source (qbench/load/calibration.py), local sources only:
    # builtin:tiny_text or a .txt / .jsonl file (text_field of each row)
    source: str = MISSING
    text_field: str = MISSING  # field read from .jsonl rows
    ctx_tokens: int = MISSING  # llama-imatrix -c: tokens per chunk (its default)
    chunks: Optional[int] = MISSING  # llama-imatrix --chunks: chunks (count) to use; null = the whole text


@dataclass
class Config(MethodBase):
    """gguf's keys; each value comes from its YAML (conf/method/gguf_*.yaml): none is declared here. method.dtype
    is float32 there: the f32 GGUF llama.cpp quantizes from (no rounding before quantizing)."""

    quant_type: str = MISSING  # Q8_0 | Q6_K | Q5_K_M | Q4_K_M | Q3_K_M (llama-quantize's names)
    n_threads: Optional[int] = MISSING  # llama.cpp threads (count); null: the CPUs this cell may run on
    n_ctx_tokens: int = MISSING  # llama.cpp context (tokens): at least eval.quality.ctx_tokens and the longest prompt
    n_batch_tokens: int = MISSING  # tokens per llama.cpp decode call (prefill, quality windows)
    # layers llama.cpp offloads to the GPU: null = all of them when the cell's device is cuda and this llama.cpp
    # build can offload (a CUDA build), else 0; 0 = CPU only; N = the first N layers
    n_gpu_layers: Optional[int] = MISSING
    imatrix: ImatrixConfig = field(default_factory=ImatrixConfig)  # importance matrix; its keys MISSING as well


def validate(cfg: Any) -> None:
    from qbench.errors import ConfigError

    if cfg.quant_type not in QUANT_TYPES:
        raise ConfigError(f"method.quant_type: '{cfg.quant_type}' is not one of {', '.join(QUANT_TYPES)}")
    if cfg.dtype != "float32":
        raise ConfigError(f"method.dtype: '{cfg.dtype}': gguf quantizes from an f32 GGUF; use float32")
    if cfg.n_threads is not None and int(cfg.n_threads) < 1:
        raise ConfigError(f"method.n_threads: {cfg.n_threads} must be at least 1 (or null)")
    for key in ("n_ctx_tokens", "n_batch_tokens"):
        if int(cfg[key]) < 1:
            raise ConfigError(f"method.{key}: {cfg[key]} must be at least 1")
    if cfg.get("n_gpu_layers") is not None and int(cfg.n_gpu_layers) < -1:
        raise ConfigError(f"method.n_gpu_layers: {cfg.n_gpu_layers} must be null, -1 (all), 0 (CPU) or a layer count")
    validate_imatrix(cfg)


def threads(cfg: Any) -> int:
    """llama.cpp threads: the configured count, else every CPU this process may run on (its affinity)."""
    return int(cfg.n_threads) if cfg.n_threads else len(os.sched_getaffinity(0))


def linear_weight_bytes(out_features: int, in_features: int, cfg: Any) -> float:
    """Bytes of one linear in the quant type's base tensor type, or in llama.cpp's fallback type when its rows
    (in_features) are not a multiple of 256. The _M mixes put attn_v and ffn_down one type higher in some layers:
    this nominal figure is below the file's; metrics.memory gives the file's own, tensor by tensor."""
    base, bits = lc.BASE_TYPE[cfg.quant_type]
    if base in FALLBACK and in_features % SUPER_BLOCK:
        bits = FALLBACK[base][1]
    return out_features * in_features * bits / 8


def load(source: Any, cfg: Any, device_map: Any):
    """(LlamaCppLM, info): the source converted and quantized once (cached), loaded into llama.cpp in its worker
    process, on the GPU where the cell's device is one and the build can offload (gpu_layers)."""
    from qbench.load import quant_cache
    from qbench.methods._llamacpp_worker import LlamaWorker

    root = quant_cache.cache_root(source)
    src = lc.sources_dir(root)
    lc.check_sources(src)
    t0 = time.perf_counter()
    fingerprint = quant_cache.source_fingerprint(source)
    f32_key = quant_cache.cache_key({"kind": "gguf_f32", "source": fingerprint,
                                     "llama_cpp_python": lc.LLAMA_CPP_PYTHON})
    f32_dir, f32_meta, f32_hit = quant_cache.get_or_build(
        root, f32_key, lambda tmp: lc.convert(Path(source.path), tmp / "model-f32.gguf", src, tmp / "quantize.log"))
    n_threads = threads(cfg)
    imx = imatrix(root, cfg, f32_dir / "model-f32.gguf", f32_key, n_threads)  # None: method.imatrix off
    key = quant_cache.cache_key({"kind": KIND, "quant_type": cfg.quant_type, "f32_key": f32_key,
                                 "llama_cpp_python": lc.LLAMA_CPP_PYTHON, **imatrix_key(imx)})
    q_dir, q_meta, hit = quant_cache.get_or_build(root, key, quantizer(root, cfg, f32_dir, n_threads, imx))
    gguf_file = q_dir / f"model-{cfg.quant_type}.gguf"
    t_built = time.perf_counter()
    worker = LlamaWorker()  # llama.cpp's own process: never beside torch (qbench/methods/_llamacpp_worker.py)
    try:
        build = lc.build_info(worker.call("runtime_facts"))
    except BaseException:
        worker.close()
        raise
    n_gpu, gpu_note = gpu_layers(cfg, device_map != {"": "cpu"}, bool(build["gpu_offload_supported"]))
    model = lc.LlamaCppLM(gguf_file, int(cfg.n_ctx_tokens), n_threads, int(cfg.n_batch_tokens), n_gpu, worker)
    info: Dict[str, Any] = {
        **build, "quant_type": cfg.quant_type, "gguf_file": str(gguf_file),
        "gguf_file_bytes": gguf_file.stat().st_size, "cache_key": key, "cache_hit": hit, "f32_cache_hit": f32_hit,
        "convert_s": f32_meta.get("convert_s"), "quantize_s": q_meta.get("quantize_s"),
        "tokenizer_pre_fallback": f32_meta.get("tokenizer_pre_fallback"), "n_threads": n_threads,
        "n_ctx_tokens": int(cfg.n_ctx_tokens), "n_batch_tokens": int(cfg.n_batch_tokens), "n_gpu_layers": n_gpu,
        "runs_on": "cuda" if n_gpu else "cpu",
        "load_s_excluding_quantize": time.perf_counter() - t_built, "prepare_s": t_built - t0,
        "imatrix": imx, "quantizer": q_meta.get("quantizer"),
        **_source_note(source, cfg)}
    if gpu_note:
        info["gpu_note"] = gpu_note
        LOG.warning("gguf: %s", gpu_note)
    return model, info


def gpu_layers(cfg: Any, on_gpu: bool, offload_supported: bool) -> Tuple[int, Optional[str]]:
    """(layers llama.cpp puts on the GPU, a note when a GPU cell's figures are the CPU's) for ``method.n_gpu_layers``:
    null offloads every layer (-1) on a GPU cell whose llama.cpp build can, else none."""
    requested = cfg.get("n_gpu_layers")
    if not on_gpu:
        return 0, None
    if not offload_supported:
        return 0, ("this llama.cpp build has no GPU offload (built without CUDA: rebuild llama-cpp-python with "
                   "CMAKE_ARGS=-DGGML_CUDA=on, docs/gguf.md); the figures are the CPU's")
    n = -1 if requested is None else int(requested)
    return n, (None if n else "method.n_gpu_layers=0: llama.cpp runs on the CPU; the figures are the CPU's")


# ------------------------------------------------------------------------------------------------ imatrix
def validate_imatrix(cfg: Any) -> None:
    """method.imatrix: its keys, its calibration file, and the tools it needs (built by `make llama-tools`)."""
    from qbench.errors import ConfigError
    from qbench.load import calibration

    im = cfg.get("imatrix")
    if im is None or not im.enabled:
        return
    if int(im.ctx_tokens) < 8:
        raise ConfigError(f"method.imatrix.ctx_tokens: {im.ctx_tokens} must be at least 8")
    if im.chunks is not None and int(im.chunks) < 1:
        raise ConfigError(f"method.imatrix.chunks: {im.chunks} must be at least 1 (or null: the whole text)")
    try:
        path = calibration.local_path(str(im.source))
    except ValueError as exc:  # an unknown builtin; the calibration module names its own key
        raise ConfigError(str(exc).replace("method.calibration.", "method.imatrix.")) from None
    if path is None:
        raise ConfigError(f"method.imatrix.source: '{im.source}' is not a local file; llama-imatrix reads a text "
                          "file: use builtin:tiny_text or a .txt / .jsonl path")
    if not path.is_file() or path.suffix not in (".txt", ".jsonl", ".json"):
        raise ConfigError(f"method.imatrix.source: '{im.source}' is not an existing .txt or .jsonl file")
    try:
        calibration.check_file(path, str(im.text_field))
    except ConfigError as exc:  # the same checks as gptq's calibration file, under this method's key
        raise ConfigError(str(exc).replace("method.calibration.", "method.imatrix.")) from None
    missing = [t for t in lc.TOOLS if not (lc.tools_dir(_default_cache()) / t).is_file()]
    if missing:
        raise ConfigError(f"method.imatrix.enabled: llama.cpp's {', '.join(missing)} not built in "
                          f"{lc.tools_dir(_default_cache())}; run `make llama-tools`")


def _default_cache() -> Path:
    return Path(os.environ.get("QBENCH_CACHE") or ".cache/qbench").expanduser()


def calibration_text(im: Any) -> str:
    """The imatrix's calibration text: the source's texts joined as qbench/load/calibration.py joins them for GPTQ."""
    from qbench.load import calibration

    texts = calibration._read_texts({"source": str(im.source), "text_field": str(im.text_field)}, 0)
    return calibration.SEPARATOR.join(texts)


def imatrix(root: Path, cfg: Any, f32_file: Path, f32_key: str, n_threads: int) -> Optional[Dict[str, Any]]:
    """The importance matrix for this cell (None when method.imatrix is off): llama-imatrix on the f32 GGUF over
    the calibration text, cached under ``<cache>/quantized/<key>`` keyed by the f32 file, the text's sha256, the
    chunking and llama.cpp's commit. What method_info records: source, text hash and size, tokens seen, file hash."""
    import hashlib

    from qbench.load import quant_cache

    im = cfg.get("imatrix")
    if im is None or not im.enabled:
        return None
    text = calibration_text(im)
    text_sha = hashlib.sha256(text.encode("utf-8")).hexdigest()
    chunks = None if im.chunks is None else int(im.chunks)
    key = quant_cache.cache_key({"kind": "gguf_imatrix", "f32_key": f32_key, "text_sha256": text_sha,
                                 "ctx_tokens": int(im.ctx_tokens), "chunks": chunks,
                                 "llama_cpp_commit": lc.LLAMA_CPP_COMMIT[1]})

    def build(tmp: Path) -> Dict[str, Any]:
        (tmp / "calibration.txt").write_text(text, encoding="utf-8")
        return lc.compute_imatrix(f32_file, tmp / "calibration.txt", tmp / "imatrix.gguf", int(im.ctx_tokens),
                                  chunks, n_threads, root)

    d, meta, hit = quant_cache.get_or_build(root, key, build)
    tools = lc.tools_info(root) or {}
    return {"file": str(d / "imatrix.gguf"), "imatrix_sha256": meta["imatrix_sha256"], "cache_hit": hit,
            "imatrix_s": meta["imatrix_s"], "source": str(im.source), "text_sha256": text_sha,
            "text_chars": len(text), "tokens": meta["tokens"], "chunks": meta["chunks"],
            "ctx_tokens": meta["ctx_tokens"], "tools_commit": tools.get("llama_cpp_commit"),
            "tools_cmake_args": tools.get("cmake_args")}


def imatrix_key(imx: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """What an importance matrix adds to the quantization's cache key: its file's hash (nothing when off, so the
    keys of cells without one do not change)."""
    return {} if imx is None else {"imatrix_sha256": imx["imatrix_sha256"]}


def quantizer(root: Path, cfg: Any, f32_dir: Path, n_threads: int, imx: Optional[Dict[str, Any]]) -> Any:
    """The cache's build function: llama_model_quantize through the binding, or llama-quantize --imatrix."""
    out = f"model-{cfg.quant_type}.gguf"
    if imx is None:
        return lambda tmp: lc.quantize(f32_dir / "model-f32.gguf", tmp / out, cfg.quant_type, n_threads)
    return lambda tmp: lc.quantize_with_tool(f32_dir / "model-f32.gguf", tmp / out, cfg.quant_type, n_threads,
                                             Path(imx["file"]), root)


def _source_note(source: Any, cfg: Any) -> Dict[str, Any]:
    """A source that was itself a quantized GGUF (the demo's Q4_1) was dequantized by qbench before this method
    quantizes it again: the result says so, since the k-quant then rounds already-rounded weights."""
    gguf_file = (source.info or {}).get("gguf_file")
    if not gguf_file:
        return {"requantized_from": None}
    ftype = lc.file_type(Path(gguf_file))
    if ftype in (None, "ALL_F32", "MOSTLY_F16", "MOSTLY_BF16"):
        return {"requantized_from": None, "source_gguf_file_type": ftype}
    note = (f"the source GGUF is {ftype}, dequantized to fp32 by qbench: {cfg.quant_type} requantizes weights that "
            "already carry its rounding (so does the fp32 baseline: comparisons between methods hold)")
    LOG.warning("gguf: %s", note)
    return {"requantized_from": ftype, "source_gguf_file_type": ftype, "requantize_note": note}


def measure_memory(model: Any, cfg: Any) -> Dict[str, Any]:
    """metrics.memory of a llama.cpp model: measured = the bytes llama.cpp's weight tensors hold
    (llama_model_size); analytic = every tensor's elements times its ggml type's bytes per weight (block bytes /
    block weights), from the file's tensor list; the decoder's 2-D weights are the quantized ones."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    from qbench.measure import memory

    tensors = lc.tensor_types(model.path)
    analytic = 0.0
    quantized_bytes = quantized_params = 0.0
    types: Dict[str, int] = {}
    for t in tensors:
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType[t["type"]]]
        nbytes = t["elements"] * size / block
        analytic += nbytes
        if _is_decoder_linear(t["name"]):
            quantized_bytes += nbytes
            quantized_params += t["elements"]
            types[t["type"]] = types.get(t["type"], 0) + 1
    measured = model.weight_bytes()
    worker_peak = model.worker_rss_peak_bytes()
    names = {t["name"] for t in tensors}
    embd = sum(t["bytes"] for t in tensors if t["name"] == "token_embd.weight")
    tied = "output.weight" not in names  # llama.cpp reads the token embedding as the output layer then
    base = lc.BASE_TYPE[cfg.quant_type][0]
    return {
        "weight_bytes_measured": measured,
        "weight_bytes_get_memory_footprint": None,
        "weight_bytes_read_per_token": measured - (0 if tied else embd),
        "input_embedding_bytes": embd, "tied_embeddings": tied,
        "weight_bytes_analytic": int(round(analytic)),
        "weight_measured_over_analytic": measured / analytic if analytic else None,
        "params_total": int(sum(t["elements"] for t in tensors)),
        "params_quantized": int(quantized_params),
        "bits_per_weight_quantized": 8 * quantized_bytes / quantized_params if quantized_params else None,
        "bits_per_weight_nominal": lc.BASE_TYPE[cfg.quant_type][1],
        "tensor_types": types,  # decoder linears per ggml type: the quant type's own, the _M mix's and fallbacks
        # a k-quant's decoder linears held in a legacy type: rows not a multiple of 256 (llama.cpp's fallback)
        "fallback_tensors": sum(n for ty, n in types.items() if not ty.endswith("_K")) if base.endswith("_K") else 0,
        "quantized_share": None,
        # llama.cpp's memory is its worker's (qbench/methods/_llamacpp_worker.py): the peak counts both processes,
        # each at its own peak (an upper bound of their peak together), as one process held both before
        "rss_peak_bytes": memory.rss_peak_bytes() + worker_peak,
        "rss_peak_bytes_worker": worker_peak,
    }


def _is_decoder_linear(name: str) -> bool:
    """blk.N.<attn_q|attn_k|attn_v|attn_output|ffn_gate|ffn_up|ffn_down>.weight: what the k-quant quantizes."""
    parts = name.split(".")
    return parts[0] == "blk" and parts[-1] == "weight" and not parts[2].endswith("norm")


def lm_eval_model(model: Any, tokenizer: Any, eval_cfg: Any, device: str) -> Any:
    """lm-eval's model for the accuracy phase: the loaded llama.cpp model behind lm-eval's LM API (loglikelihood
    from its full logits, greedy generate_until), tokenized by the cell's HF tokenizer so ids match the torch cells'."""
    from qbench.methods._llamacpp_lm import LlamaCppLMEval

    return LlamaCppLMEval(model, tokenizer, eval_cfg.max_length_tokens)


def measure_latency(model: Any, tokenizer: Any, bench_cfg: Any, device: Any, phases: Any,
                    weight_bytes_read_per_token: int, model_config: Any, compute_dtype: Any = None) -> Dict[str, Any]:
    """The latency section from llama.cpp's own loop (qbench/methods/_llamacpp.py: batch 1, CPU)."""
    import contextlib

    out: Dict[str, Any] = {}
    # prefill and decode run in one llama.cpp loop: its memory is recorded under "decode"
    with phases.phase("decode") if phases is not None else contextlib.nullcontext():
        out = lc.measure_latency(model, bench_cfg, model.n_vocab, list(getattr(tokenizer, "all_special_ids", [])))
    out["kv_cache_bytes_analytic"] = []
    return out
