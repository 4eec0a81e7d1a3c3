"""llama.cpp plumbing for the gguf method: the converter, the quantizer, a runtime that looks like a causal LM to
qbench's quality path, and llama.cpp's own latency figures.

The runtime is llama-cpp-python (pinned: LLAMA_CPP_PYTHON), which builds the llama.cpp it vendors from source.
Two things the wheel does not ship come from the same sdist, unpacked once by ``python -m qbench.methods._llamacpp
setup`` (``make install`` runs it) into ``<cache>/llama.cpp-<version>/``: ``convert_hf_to_gguf.py`` with its
``conversion/`` package and the matching ``gguf-py`` (HF folder -> f32 GGUF). Same sdist, same llama.cpp commit,
so converter, quantizer and runtime agree on the format.
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

LOG = logging.getLogger(__name__)

LLAMA_CPP_PYTHON = "0.3.36"  # pinned: pyproject.toml's gguf extra says the same
# The llama.cpp commit llama-cpp-python LLAMA_CPP_PYTHON vendors: the gitlink of vendor/llama.cpp in the git index
# the v0.3.36 sdist carries (llama_cpp_python-0.3.36/.git/index; its .git/modules/vendor/llama.cpp/HEAD says the
# same). sdist_commit() reads it again from the sdist, and build_tools() refuses an sdist that disagrees.
LLAMA_CPP_COMMIT = ("0.3.36", "0c1e57098bba43ac29e6e3b677cdceebdd22334f")  # (llama-cpp-python version, commit)
SOURCES_ENV = "QBENCH_LLAMACPP_SRC"  # a llama.cpp checkout (or unpacked vendor/llama.cpp) to take the converter from
CONVERTER_FILES = ("convert_hf_to_gguf.py", "conversion", "gguf-py", "tools/perplexity", "LICENSE")
# llama_ftype values of llama.h (llama_cpp.LLAMA_FTYPE_MOSTLY_*), by llama-quantize's names
FTYPES = {"Q8_0": 7, "Q6_K": 18, "Q5_K_M": 17, "Q4_K_M": 15, "Q3_K_M": 12}
# The base tensor type of each ftype and its bits per weight (ggml block bytes * 8 / block weights): Q8_0 34 B per
# 32 weights; the k-quants 256-weight super-blocks (Q6_K 210 B, Q5_K 176 B, Q4_K 144 B, Q3_K 110 B). The _M mixes
# put some tensors (attn_v, ffn_down) one type higher: Q4_K_M averages about 4.8 bits on a 7B Llama.
BASE_TYPE = {"Q8_0": ("Q8_0", 8.5), "Q6_K": ("Q6_K", 6.5625), "Q5_K_M": ("Q5_K", 5.5), "Q4_K_M": ("Q4_K", 4.5),
             "Q3_K_M": ("Q3_K", 3.4375)}


# ------------------------------------------------------------------------------------------------ sources
CHECKOUT_CACHE = Path(__file__).resolve().parents[2] / ".cache" / "qbench"  # make's default QBENCH_CACHE


def sources_dir(cache_root: Path) -> Path:
    """Where the converter lives: $QBENCH_LLAMACPP_SRC, else ``<cache>/llama.cpp-<pinned version>``."""
    env = os.environ.get(SOURCES_ENV)
    if env:
        return Path(env).expanduser()
    name = f"llama.cpp-{LLAMA_CPP_PYTHON}"
    # make install unpacks it into the default cache; a sweep with its own run.cache_dir finds it there too
    for root in (Path(cache_root), Path(os.environ.get("QBENCH_CACHE", ".cache/qbench")), CHECKOUT_CACHE):
        if (root / name / "convert_hf_to_gguf.py").is_file():
            return root / name
    return Path(cache_root) / name


def check_sources(src: Path) -> None:
    from qbench.errors import ConfigError

    if not (src / "convert_hf_to_gguf.py").is_file() or not (src / "gguf-py").is_dir():
        raise ConfigError(f"method.kind gguf: llama.cpp's converter is not in {src}; run `python -m "
                          f"qbench.methods._llamacpp setup` (make install does) or set {SOURCES_ENV}")


def fetch_sdist(cache_root: Path, sdist: Optional[Path] = None) -> Path:
    """llama-cpp-python's sdist: ``sdist`` when given, else ``<cache>/downloads/`` (pip downloads it once)."""
    if sdist is not None:
        return Path(sdist)
    dl = Path(cache_root) / "downloads"
    sdist = dl / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
    if not sdist.is_file():
        dl.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", str(dl),
                        f"llama-cpp-python=={LLAMA_CPP_PYTHON}"], check=True)
    return sdist


VENDOR_PREFIX = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"


def _extract_vendor(sdist: Path, dest: Path, keep: Optional[Tuple[str, ...]] = None) -> None:
    """Unpack the sdist's vendor/llama.cpp (only the paths under ``keep`` when given) into ``dest``."""
    with tarfile.open(sdist) as tar:
        members = []
        for m in tar.getmembers():
            rel = m.name[len(VENDOR_PREFIX):] if m.name.startswith(VENDOR_PREFIX) else None
            if rel and (keep is None or any(rel == f or rel.startswith(f + "/") for f in keep)):
                m.name = rel
                members.append(m)
        tar.extractall(dest, members=members, filter="data")


def sdist_commit(sdist: Path) -> Optional[str]:
    """The llama.cpp commit an sdist vendors: HEAD of the submodule's git dir the sdist carries (None if absent)."""
    name = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/.git/modules/vendor/llama.cpp/HEAD"
    with tarfile.open(sdist) as tar:
        try:
            f = tar.extractfile(name)
        except KeyError:
            return None
        return f.read().decode().strip() if f is not None else None


def setup(cache_root: Path, sdist: Optional[Path] = None) -> Path:
    """Unpack the converter from llama-cpp-python's sdist (downloaded by pip when ``sdist`` is None)."""
    dest = sources_dir(cache_root)
    if (dest / "convert_hf_to_gguf.py").is_file():
        return dest
    sdist = fetch_sdist(cache_root, sdist)
    tmp = dest.with_name(dest.name + f".tmp-{os.getpid()}")
    _extract_vendor(sdist, tmp, CONVERTER_FILES)
    os.replace(tmp, dest)
    return dest


# ------------------------------------------------------------------------------------------------ tools
# llama.cpp's own command-line tools, built from the same sdist (same commit) as the runtime: llama-perplexity (the
# KLD cross-check, scripts/gguf_kld_check.py), llama-imatrix and llama-quantize (method.imatrix).
TOOLS = ("llama-perplexity", "llama-imatrix", "llama-quantize")
# CPU only, Release, static (the binaries outlive the build tree they are linked in); no HTTPS client (this llama.cpp
# deprecated LLAMA_CURL: LLAMA_OPENSSL is its switch now); nothing but the three targets is compiled.
TOOLS_CMAKE_ARGS = ("-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DGGML_CUDA=OFF", "-DLLAMA_OPENSSL=OFF",
                    "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF")
TOOLS_INFO = "build-info.json"  # beside the binaries: commit, cmake arguments, compiler, build time


def tools_dir(cache_root: Path) -> Path:
    """``<llama.cpp sources>/bin``: where build_tools puts llama-perplexity, llama-imatrix and llama-quantize."""
    return sources_dir(cache_root) / "bin"


def tools_info(cache_root: Path) -> Optional[Dict[str, Any]]:
    """The tools' build-info.json, or None when they are not (completely) built."""
    bin_dir = tools_dir(cache_root)
    if not all((bin_dir / t).is_file() for t in TOOLS) or not (bin_dir / TOOLS_INFO).is_file():
        return None
    return {**json.loads((bin_dir / TOOLS_INFO).read_text(encoding="utf-8")), "bin_dir": str(bin_dir)}


def build_tools(cache_root: Path, sdist: Optional[Path] = None, jobs: Optional[int] = None) -> Path:
    """Build the three tools with cmake from the sdist's vendored llama.cpp into ``<sources>/bin`` once: under a file
    lock, in a temporary directory renamed into place, so a second call (or a parallel one) finds them built."""
    from qbench.store.locks import file_lock

    src = setup(cache_root, sdist)
    bin_dir = src / "bin"
    if tools_info(cache_root) is not None:
        return bin_dir
    with file_lock(src.parent / f".{src.name}-tools.lock"):
        if tools_info(cache_root) is not None:  # built by another process while this one waited
            return bin_dir
        sdist = fetch_sdist(cache_root, sdist)
        commit = sdist_commit(sdist)
        if commit is not None and commit != LLAMA_CPP_COMMIT[1]:
            raise RuntimeError(f"{sdist} vendors llama.cpp {commit}, not {LLAMA_CPP_COMMIT[1]} (LLAMA_CPP_COMMIT)")
        work = Path(tempfile.mkdtemp(prefix=f".{src.name}-tools-", dir=src.parent))
        try:
            info = _cmake_tools(sdist, work, jobs or len(os.sched_getaffinity(0)))
            info.update(llama_cpp_python=LLAMA_CPP_PYTHON, llama_cpp_commit=commit or LLAMA_CPP_COMMIT[1],
                        sdist=sdist.name)
            (work / "bin" / TOOLS_INFO).write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
            if bin_dir.exists():  # binaries without build-info.json: a hand-made or half-copied folder
                shutil.rmtree(bin_dir)
            os.replace(work / "bin", bin_dir)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return bin_dir


def _cmake_tools(sdist: Path, work: Path, jobs: int) -> Dict[str, Any]:
    """Configure and build the TOOLS targets in ``work``; the binaries land in ``work/bin``. The cmake log goes to
    ``work/build.log``; a failure raises with its last line (and the log is copied beside the sources)."""
    src, build, log_file = work / "src", work / "build", work / "build.log"
    _extract_vendor(sdist, src)
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    configure = ["cmake", "-S", str(src), "-B", str(build), *generator, *TOOLS_CMAKE_ARGS]
    compile_ = ["cmake", "--build", str(build), "--config", "Release", "-j", str(jobs), "--target", *TOOLS]
    t0 = time.perf_counter()
    with open(log_file, "w", encoding="utf-8") as log:
        for cmd in (configure, compile_):
            log.write("$ " + " ".join(cmd) + "\n")
            log.flush()
            if subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode != 0:
                kept = work.parent / f"{work.name.split('-tools-')[0]}-tools.failed.log"
                shutil.copyfile(log_file, kept)
                lines = log_file.read_text(encoding="utf-8", errors="replace").strip().splitlines()
                raise RuntimeError(f"building llama.cpp's tools failed ({kept}): {lines[-1] if lines else cmd}")
    build_s = time.perf_counter() - t0
    (work / "bin").mkdir()
    for tool in TOOLS:
        found = next(p for p in (build / "bin" / tool, build / "bin" / "Release" / tool) if p.is_file())
        shutil.copy2(found, work / "bin" / tool)
    compiler = subprocess.run(["c++", "--version"], capture_output=True, text=True).stdout.splitlines()
    return {"cmake_args": list(TOOLS_CMAKE_ARGS), "tools": list(TOOLS), "build_s": round(build_s, 1), "jobs": jobs,
            "compiler": compiler[0] if compiler else None, "load_average": list(os.getloadavg())}


def run_tool(tool: str, args: List[str], log_file: Path, cache_root: Optional[Path] = None) -> str:
    """Run one of the built TOOLS with ``args``; its output is appended to ``log_file`` and returned. A failure
    raises with the tool's last output line."""
    exe = tools_dir(cache_root or Path(os.environ.get("QBENCH_CACHE") or ".cache/qbench")) / tool
    cmd = [str(exe), *args]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
    with open(log_file, "a", encoding="utf-8") as log:
        log.write("$ " + " ".join(cmd) + "\n" + proc.stdout)
    if proc.returncode != 0:
        lines = proc.stdout.strip().splitlines()
        raise RuntimeError(f"{tool} exited {proc.returncode}: {lines[-1] if lines else ''}")
    return proc.stdout


def compute_imatrix(f32: Path, text_file: Path, out: Path, ctx_tokens: int, chunks: Optional[int], n_threads: int,
                    cache_root: Path) -> Dict[str, Any]:
    """llama-imatrix on the f32 GGUF over ``text_file`` (chunks of ``ctx_tokens``, llama.cpp's own tokenization):
    the importance matrix as a GGUF file, its sha256 and how many tokens it saw (chunks x ctx)."""
    import re

    args = ["-m", str(f32), "-f", str(text_file), "-o", str(out), "-c", str(int(ctx_tokens)), "-b", str(int(ctx_tokens)),
            "-t", str(int(n_threads)), "--no-ppl", "-ngl", "0"]
    if chunks is not None:
        args += ["--chunks", str(int(chunks))]
    t0 = time.perf_counter()
    text = run_tool("llama-imatrix", args, out.with_suffix(".log"), cache_root)
    found = re.search(r"computing over (\d+) chunks, n_ctx=(\d+)", text)
    n_chunks, n_ctx = (int(found.group(1)), int(found.group(2))) if found else (None, None)
    return {"imatrix_s": time.perf_counter() - t0, "imatrix_sha256": sha256_file(out), "chunks": n_chunks,
            "ctx_tokens": n_ctx, "tokens": n_chunks * n_ctx if found else None}


def quantize_with_tool(src: Path, dst: Path, quant_type: str, n_threads: int, imatrix_file: Path,
                       cache_root: Path) -> Dict[str, Any]:
    """``llama-quantize --imatrix``: the python binding takes the importance matrix only as a raw pointer to
    llama.cpp's C++ map, so a quantization with one goes through the tool (same commit as the runtime)."""
    t0 = time.perf_counter()
    run_tool("llama-quantize", ["--imatrix", str(imatrix_file), str(src), str(dst), quant_type, str(int(n_threads))],
             dst.with_suffix(".log"), cache_root)
    return {"quantize_s": time.perf_counter() - t0, "quantize_threads": int(n_threads), "quantizer": "llama-quantize"}


def sha256_file(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------ convert
def convert(hf_dir: Path, out_file: Path, src: Path, log_file: Path) -> Dict[str, Any]:
    """HF folder -> f32 GGUF with llama.cpp's own converter, in a child process (it imports its own gguf-py)."""
    env = {**os.environ, SOURCES_ENV: str(src)}
    t0 = time.perf_counter()
    with open(log_file, "a", encoding="utf-8") as log:
        proc = subprocess.run([sys.executable, "-m", __name__, "convert", str(hf_dir), str(out_file)], env=env,
                              stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = log_file.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-1:]
        raise RuntimeError(f"convert_hf_to_gguf.py failed on {hf_dir}: {tail[0] if tail else proc.returncode}")
    text = log_file.read_text(encoding="utf-8", errors="replace")
    return {"convert_s": time.perf_counter() - t0, "outtype": "f32",
            "tokenizer_pre_fallback": "gpt-2" if "qbench: pre-tokenizer fallback gpt-2" in text else None}


def _convert_child(hf_dir: str, out_file: str) -> None:
    """Runs convert_hf_to_gguf.py. One patch: a byte-level BPE tokenizer whose pre-tokenizer hash llama.cpp does not
    know (qbench's tiny tokenizer, trained here) is written as "gpt-2", which is what a plain ByteLevel pre-tokenizer
    is; the converter otherwise refuses it. Any other tokenizer still fails as the converter decides."""
    import runpy

    src = Path(os.environ[SOURCES_ENV])
    sys.path[:0] = [str(src / "gguf-py"), str(src)]
    from conversion import base

    original = base.TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer):
        try:
            return original(self, tokenizer)
        except NotImplementedError:
            pre = getattr(getattr(tokenizer, "backend_tokenizer", None), "pre_tokenizer", None)
            if type(pre).__name__ != "ByteLevel":
                raise
            print("qbench: pre-tokenizer fallback gpt-2 (plain ByteLevel, hash unknown to llama.cpp)", flush=True)
            return "gpt-2"

    base.TextModel.get_vocab_base_pre = get_vocab_base_pre
    sys.argv = ["convert_hf_to_gguf.py", hf_dir, "--outfile", out_file, "--outtype", "f32"]
    runpy.run_path(str(src / "convert_hf_to_gguf.py"), run_name="__main__")


# ------------------------------------------------------------------------------------------------ quantize
def quantize(src: Path, dst: Path, quant_type: str, n_threads: int) -> Dict[str, Any]:
    """llama_model_quantize (what llama-quantize runs) of an f32 GGUF to ``quant_type``."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[quant_type]
    params.nthread = int(n_threads)
    t0 = time.perf_counter()
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize to {quant_type} returned {rc}")
    return {"quantize_s": time.perf_counter() - t0, "quantize_threads": int(n_threads)}


def tensor_types(path: Path) -> List[Dict[str, Any]]:
    """Every tensor of a GGUF file: name, type, elements and bytes as stored (the header's tensor table)."""
    import math

    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    from qbench.load import gguf_header

    out = []
    for t in gguf_header.read(path, tensors=True)["tensors"]:
        kind = GGMLQuantizationType(t["ggml_type"])
        block, size = GGML_QUANT_SIZES[kind]
        elements = math.prod(t["dims"])
        out.append({"name": t["name"], "type": kind.name, "elements": elements, "bytes": elements * size // block})
    return out


def file_type(path: Path) -> Optional[str]:
    """general.file_type of a GGUF (llama_ftype by name, e.g. MOSTLY_Q4_1), None when absent."""
    from gguf import LlamaFileType

    from qbench.load import gguf_header

    value = gguf_header.read(path)["kv"].get("general.file_type")
    if value is None:
        return None
    try:
        return LlamaFileType(int(value)).name
    except ValueError:
        return str(value)


def build_info(facts: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """What the runtime was built as: llama-cpp-python's version, the llama.cpp commit it vendors (None when the
    installed version is not the one LLAMA_CPP_COMMIT was read for), llama.cpp's system info as it prints it and
    parsed into the GGML features it was compiled with (SIMD, OpenMP, BLAS, CUDA: what CMAKE_ARGS decided).
    ``facts``: a worker's answer to runtime_facts (a gguf cell asks the process that runs the model); else this
    process's."""
    from qbench.methods._llamacpp_worker import runtime_facts

    facts = facts if facts is not None else runtime_facts()
    version, text = facts["version"], facts["system_info"]
    return {"llama_cpp_python": version,
            "llama_cpp_commit": LLAMA_CPP_COMMIT[1] if version == LLAMA_CPP_COMMIT[0] else None,
            "llama_cpp_system_info": text, "llama_cpp_features": parse_system_info(text),
            "gpu_offload_supported": bool(facts["gpu_offload_supported"])}


def parse_system_info(text: str) -> Dict[str, Dict[str, str]]:
    """``"CPU : SSE3 = 1 | AVX2 = 1 | OPENMP = 1 | "`` -> ``{"CPU": {"SSE3": "1", "AVX2": "1", "OPENMP": "1"}}``:
    llama_print_system_info's "<backend> : <flag> = <value> | ..." per backend, values as printed."""
    out: Dict[str, Dict[str, str]] = {}
    backend = ""
    for part in (p.strip() for p in text.split("|")):
        if " : " in part:  # a new backend's first flag: "CPU : SSE3 = 1"
            backend, part = (x.strip() for x in part.split(" : ", 1))
        if "=" in part:
            key, value = (x.strip() for x in part.split("=", 1))
            out.setdefault(backend, {})[key] = value
    return out


# ------------------------------------------------------------------------------------------------ runtime
class LlamaCppLM:
    """A GGUF model in llama.cpp, shaped like the causal LM that qbench.evaluate.quality reads: ``model(ids).logits``
    ([batch, tokens, vocab] float32 torch, from llama.cpp's full-vocabulary logits) and ``parameters()`` (where those
    logits land: the CPU). So quality runs its own code on the same windows as every torch cell.

    llama.cpp itself runs in a worker process without torch (qbench/methods/_llamacpp_worker.py says why); ``llm`` is
    the worker's model, its logits in memory both processes map. ``close()`` ends the worker."""

    def __init__(self, path: Path, n_ctx: int, n_threads: int, n_batch: int, n_gpu_layers: int = 0,
                 worker: Optional[Any] = None):
        from qbench.methods._llamacpp_worker import LlamaWorker, WorkerLlama

        self.path, self.n_threads, self.n_gpu_layers = Path(path), int(n_threads), int(n_gpu_layers)
        worker = worker if worker is not None else LlamaWorker()
        try:
            self.llm = WorkerLlama(worker, self.path, int(n_ctx), self.n_threads, int(n_batch), self.n_gpu_layers)
        except BaseException:
            worker.close()
            raise
        info = self.llm.info
        self.n_vocab, self.n_ctx, self.n_ctx_train = info["n_vocab"], info["n_ctx"], info["n_ctx_train"]
        self.metadata, self.token_bos = info["metadata"], info["token_bos"]
        self.config = None
        atexit.register(self.close)  # the worker ends with the cell, whichever way the cell ends

    def close(self) -> None:
        self.llm.close()

    def eval(self) -> LlamaCppLM:
        return self

    def parameters(self):
        import torch

        yield torch.zeros(0)

    def get_input_embeddings(self):
        from types import SimpleNamespace

        return SimpleNamespace(num_embeddings=self.n_vocab)

    def __call__(self, input_ids: Any):
        """Logits of every position of every row; each row from an empty KV cache (rows are independent)."""
        from types import SimpleNamespace

        import torch

        rows = []
        for seq in input_ids.tolist():
            self.llm.reset()
            self.llm.eval(seq)
            rows.append(torch.from_numpy(self.llm.scores[: len(seq)].copy()))
        return SimpleNamespace(logits=torch.stack(rows))

    def weight_bytes(self) -> int:
        """llama.cpp's own count of the bytes its weight tensors hold (llama_model_size)."""
        return int(self.llm.info["weight_bytes"])

    def worker_rss_peak_bytes(self) -> int:
        """The worker process's peak resident set so far, bytes: llama.cpp's weights, context and buffers."""
        return int(self.llm.worker.call("rss_peak"))


# ------------------------------------------------------------------------------------------------ latency
def measure_latency(model: LlamaCppLM, bench_cfg: Any, vocab: int, special_ids: List[int]) -> Dict[str, Any]:
    """The latency section for a llama.cpp model: prefill (time to first token) and decode (tokens/s) at batch 1,
    in llama.cpp's own loop, on random prompts drawn like the torch path's (special tokens excluded).

    Only the last position's logits are computed while timing (as generate() does), not every position's as the
    quality path needs. Decode feeds one token per step (random ids: a dense model's step costs the same for any
    token). Batch sizes above 1 are recorded as unsupported: qbench drives one llama.cpp sequence at a time."""
    from qbench.measure import timing
    from qbench.measure.latency.settings import Settings
    from qbench.measure.stats import cv_warning, summarize

    s = Settings.from_bench(bench_cfg)
    plan = {"seed": s.seed, "prompt_tokens": [int(p) for p in s.prompt_tokens], "new_tokens": int(s.new_tokens),
            "decode_prompt_tokens": int(s.decode_prompt_tokens), "warmup_runs": int(s.warmup_runs),
            "min_repeats": int(s.min_repeats), "max_repeats": int(s.max_repeats),
            "max_time_per_figure_s": s.max_time_per_figure_s}
    raw = model.llm.worker.call("latency", plan, int(vocab), [int(i) for i in special_ids])  # timed in the worker
    timing.account(**raw["spent"])  # the worker's warm-ups and timed runs are measuring time in the cell's budget
    out: Dict[str, Any] = {"device": "cuda" if model.n_gpu_layers else "cpu",  # offloaded: its GPU runs the loop
                           "timer": "time.perf_counter", "runtime": "llama.cpp",
                           "threads": model.n_threads,
                           "n_gpu_layers": model.n_gpu_layers, "prefill": [], "decode": [], "unsupported": [],
                           "warnings": [], "one_time": {"first_call_s": None, "compile_s": None}}
    for p, times in raw["prefill"]:
        ttft = summarize([t * 1e3 for t in times], "ms")
        out["prefill"].append({"batch_size": 1, "prompt_tokens": int(p), "ttft_ms": ttft,
                               "tokens_per_s": int(p) / (ttft["p50"] / 1e3), "compute_bound_fraction": None})
        LOG.info("llama.cpp prefill bs=1 prompt=%d: %.1f ms (median of %d, %d threads)", p, ttft["p50"],
                 len(times), model.n_threads)
    step_ms = [t * 1e3 for t in raw["decode"]["step_s"]]
    n = len(step_ms) // raw["decode"]["runs"]
    runs = [step_ms[i * n:(i + 1) * n] for i in range(raw["decode"]["runs"])]
    out["decode"].append({"decode_path": "llama.cpp", "batch_size": 1, "prompt_tokens": int(s.decode_prompt_tokens),
                          "new_tokens": int(s.new_tokens),
                          "tokens_per_s": summarize([len(r) / (sum(r) / 1e3) for r in runs], "tokens/s"),
                          "per_token_ms": summarize([sum(r) / len(r) for r in runs], "ms"),
                          "bandwidth_bound_tokens_per_s": None, "bandwidth_bound_fraction": None,
                          "energy_j_per_token": None})
    LOG.info("llama.cpp decode bs=1: %.1f tokens/s (median of %d runs of %d tokens)",
             out["decode"][0]["tokens_per_s"]["p50"], out["decode"][0]["tokens_per_s"]["n"], s.new_tokens)
    for b in s.batch_sizes:
        if int(b) > 1:
            out["unsupported"].append({"decode_path": "llama.cpp", "batch_size": int(b),
                                       "reason": "qbench drives one llama.cpp sequence at a time (batch 1 only)"})
    for row in out["prefill"] + out["decode"]:
        dist = row.get("ttft_ms") or row.get("tokens_per_s")
        warning = cv_warning(f"llama.cpp bs={row['batch_size']}", dist, s.cv_warn_threshold)
        if warning:
            out["warnings"].append(warning)
    return out


def main(argv: List[str]) -> int:
    if argv[:1] == ["convert"] and len(argv) == 3:
        _convert_child(argv[1], argv[2])
        return 0
    if argv[:1] == ["setup"]:
        cache = Path(os.environ.get("QBENCH_CACHE") or ".cache/qbench").expanduser()
        print(setup(cache, Path(argv[1]) if len(argv) > 1 else None))
        return 0
    if argv[:1] == ["build-tools"]:
        cache = Path(os.environ.get("QBENCH_CACHE") or ".cache/qbench").expanduser()
        print(build_tools(cache, Path(argv[1]) if len(argv) > 1 else None))
        return 0
    print("usage: python -m qbench.methods._llamacpp setup [SDIST.tar.gz] | build-tools [SDIST.tar.gz] | "
          "convert HF_DIR OUT.gguf", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
