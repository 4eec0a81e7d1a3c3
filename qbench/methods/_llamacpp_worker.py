"""llama.cpp in a process of its own that loads llama.cpp's libraries before numpy's: a gguf cell's model lives here.

Why (measured on a lent H100 node, 2026-12-06: the image's numpy and torch 2.11+cu130, llama-cpp-python 0.3.36 built
with -DGGML_CUDA=on by GCC 13.3 and nvcc 13.0; a 2-layer f32 GGUF, one process per variant): with that CUDA build, a
process that imported numpy before llama_cpp dies of SIGSEGV inside llama_model_load_from_file, on the GPU and on the CPU
alike (``import numpy; import llama_cpp; Llama(...)``: rc 139 with n_gpu_layers -1 and 0; ``import torch`` first, which
imports numpy, the same), while ``import llama_cpp; import numpy`` loads and evaluates (rc 0, both). Importing torch
after llama.cpp aborts (rc 134). A CPU build loads in any order. A cell has numpy and torch loaded long before it opens
a GGUF (quality, lm-eval and memory need them), so llama.cpp runs here: run as the worker, this module's first statement
imports llama_cpp (whose library loads before llama_cpp itself imports numpy), and torch is never imported. Started
from a cell that holds torch and a CUDA context, this worker loaded the same file with every layer offloaded (rc 0).

Protocol: pickled ``(op, args)`` requests on this process's stdin, ``("ok", value)`` or ``("error", text)`` replies on a
duplicate of its stdout (fd 1 itself is pointed at stderr, so nothing llama.cpp prints can corrupt a reply). Logits and
token ids never travel through the pipe: llama-cpp-python's ``Llama.scores`` and ``Llama.input_ids`` are replaced by
arrays over one shared file that both processes map, and ``Llama.eval`` writes every position's logits there in place.
The latency loops run here too, so their clocks see llama.cpp alone and no pipe round trip.

This module imports neither torch nor anything that does; ``torch`` is poisoned in the worker (an import raises).
tests/test_llamacpp_worker.py checks the import order.
"""
from __future__ import annotations

if __name__ == "__main__":  # the worker: llama.cpp's libraries load before numpy's (why: above)
    import llama_cpp  # noqa: F401

import os
import pickle
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

REQUIRED_SHM_HEADROOM = 1.5  # /dev/shm takes the logits file only with this much room to spare, else the temp dir


# ------------------------------------------------------------------------------------------------ the cell's side
class WorkerDied(RuntimeError):
    """The worker process ended while the cell waited for a reply (a crash in llama.cpp, a signal)."""


class LlamaWorker:
    """The cell's handle on one worker process: ``call(op, *args)`` returns the worker's value or raises."""

    def __init__(self) -> None:
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[2])  # above qbench/: a source checkout finds it, installed or not
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        # stderr is the cell's (cell.log): llama.cpp's own messages land beside the cell's
        self.proc = subprocess.Popen([sys.executable, "-m", "qbench.methods._llamacpp_worker", str(os.getpid())],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)

    def call(self, op: str, *args: Any) -> Any:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            pickle.dump((op, args), self.proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)
            self.proc.stdin.flush()
            status, value = pickle.load(self.proc.stdout)
        except (EOFError, BrokenPipeError) as exc:
            raise WorkerDied(f"the llama.cpp worker process {self._ended()} during {op!r}") from exc
        if status != "ok":
            raise RuntimeError(f"llama.cpp worker, {op}: {value}")
        return value

    def _ended(self) -> str:
        try:
            rc = self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            return "stopped answering"
        if rc < 0:
            return f"died of {signal.Signals(-rc).name}"
        return f"exited with status {rc}"

    def close(self) -> None:
        """Ends the worker (its model and GPU memory with it): EOF on its stdin, then a kill if it lingers."""
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.close()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


class WorkerLlama:
    """The part of llama-cpp-python's ``Llama`` that qbench's lm-eval adapter uses, over a worker's model:
    ``reset``, ``eval``, ``n_tokens`` and the shared ``scores`` [n_ctx, n_vocab] and ``input_ids`` [n_ctx] arrays."""

    def __init__(self, worker: LlamaWorker, path: Path, n_ctx: int, n_threads: int, n_batch: int,
                 n_gpu_layers: int) -> None:
        self.worker = worker
        self.info: Dict[str, Any] = worker.call("open", str(path), n_ctx, n_threads, n_batch, n_gpu_layers)
        n_ctx, n_vocab = self.info["n_ctx"], self.info["n_vocab"]
        fd, shared = tempfile.mkstemp(prefix="qbench-llama-", suffix=".logits", dir=_shared_dir(_size(n_ctx, n_vocab)))
        os.close(fd)
        try:
            worker.call("share", shared)
            self.scores, self.input_ids = _views(shared, n_ctx, n_vocab, "r")
        finally:
            os.unlink(shared)  # both processes hold it mapped: the file goes when the last mapping does
        self.n_tokens = 0

    def reset(self) -> None:
        self.n_tokens = 0

    def eval(self, tokens: List[int]) -> None:
        """Llama.eval from the current ``n_tokens`` on (the KV cache past it is dropped, as Llama.eval does)."""
        self.n_tokens = self.worker.call("eval", self.n_tokens, [int(t) for t in tokens])

    def close(self) -> None:
        self.worker.close()


def _shared_dir(nbytes: int) -> Optional[str]:
    """/dev/shm when it has room for the logits file (containers often give it 64 MiB), else the temp dir."""
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return None
    return "/dev/shm" if st.f_bavail * st.f_frsize >= REQUIRED_SHM_HEADROOM * nbytes else None


def _size(n_ctx: int, n_vocab: int) -> int:
    return n_ctx * n_vocab * np.dtype(np.single).itemsize + n_ctx * np.dtype(np.intc).itemsize


def _views(path: str, n_ctx: int, n_vocab: int, mode: str):
    """(scores [n_ctx, n_vocab] float32, input_ids [n_ctx] intc) over the shared file, as Llama holds them."""
    buf = np.memmap(path, dtype=np.uint8, mode=mode, shape=(_size(n_ctx, n_vocab),))
    scores = np.ndarray((n_ctx, n_vocab), dtype=np.single, buffer=buf, offset=0)
    ids = np.ndarray((n_ctx,), dtype=np.intc, buffer=buf, offset=n_ctx * n_vocab * np.dtype(np.single).itemsize)
    return scores, ids


# ------------------------------------------------------------------------------------------------ the worker's side
def _open(state: Dict[str, Any], path: str, n_ctx: int, n_threads: int, n_batch: int,
          n_gpu_layers: int) -> Dict[str, Any]:
    import llama_cpp
    from llama_cpp import Llama

    llm = Llama(model_path=path, n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch, n_threads=n_threads,
                n_threads_batch=n_threads, n_gpu_layers=n_gpu_layers, logits_all=True, verbose=False)
    state["llm"] = llm
    return {"n_ctx": int(llm.n_ctx()), "n_vocab": int(llm.n_vocab()), "n_ctx_train": int(llm._model.n_ctx_train()),
            "weight_bytes": int(llama_cpp.llama_model_size(llm.model)),
            "metadata": dict(llm.metadata), "token_bos": int(llm.token_bos())}


def _share(state: Dict[str, Any], shared: str) -> None:
    """Llama.eval writes into these arrays in place: the logits land in the file the cell maps."""
    llm = state["llm"]
    llm.scores, llm.input_ids = _views(shared, int(llm.n_ctx()), int(llm.n_vocab()), "w+")


def _eval(state: Dict[str, Any], n_past: int, tokens: List[int]) -> int:
    llm = state["llm"]
    llm.n_tokens = n_past
    llm.eval(tokens)
    return int(llm.n_tokens)


def _rss_peak(state: Dict[str, Any]) -> int:
    """This process's peak resident set, bytes (qbench.measure.memory needs no torch)."""
    from qbench.measure.memory import rss_peak_bytes

    return rss_peak_bytes()


def runtime_facts(state: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """What the llama.cpp build in this process says of itself: llama-cpp-python's version, llama.cpp's system info
    as it prints it, and whether it can offload to a GPU (qbench/methods/_llamacpp.build_info reads these)."""
    import llama_cpp

    info = llama_cpp.llama_print_system_info()
    return {"version": llama_cpp.__version__,
            "system_info": info.decode(errors="replace").strip() if isinstance(info, bytes) else str(info),
            "gpu_offload_supported": bool(llama_cpp.llama_supports_gpu_offload())}


def _timed_runs(run: Any, plan: Dict[str, Any], spent: Dict[str, float]) -> List[float]:
    """Seconds of each timed run after ``warmup_runs`` discarded ones: at least min_repeats, at most max_repeats,
    and no new run once max_time_per_figure_s of timed runs is spent. The wall seconds of the warm-ups and of the
    timed runs are added to ``spent`` (the cell's time budget: measuring, not overhead)."""
    t0 = time.perf_counter()
    for _ in range(int(plan["warmup_runs"])):
        run()
    spent["warmup_s"] += time.perf_counter() - t0
    times: List[float] = []
    cap = plan["max_time_per_figure_s"]
    t_timed = time.perf_counter()
    while len(times) < int(plan["max_repeats"]):
        if len(times) >= int(plan["min_repeats"]) and (cap is None or sum(times) >= float(cap)):
            break
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    spent["timed_s"] += time.perf_counter() - t_timed
    spent["figures"] += 1
    return times


def _latency(state: Dict[str, Any], plan: Dict[str, Any], vocab: int, special_ids: List[int]) -> Dict[str, Any]:
    """Prefill runs per prompt length and decode steps, timed in llama.cpp's loop: random prompts drawn like the
    torch path's (special tokens excluded), last-position logits only (as generate() computes), one token per step."""
    llm = state["llm"]
    rng = np.random.default_rng(plan["seed"])
    allowed = np.setdiff1d(np.arange(vocab), np.asarray(special_ids, dtype=np.int64))
    spent = {"warmup_s": 0.0, "timed_s": 0.0, "figures": 0}
    out: Dict[str, Any] = {"prefill": [], "decode": None, "spent": spent}
    logits_all, llm._logits_all = llm._logits_all, False  # llama-cpp-python 0.3.36: last-position logits only
    try:
        for p in plan["prompt_tokens"]:
            ids = rng.choice(allowed, size=int(p)).tolist()
            out["prefill"].append([int(p), _timed_runs(lambda ids=ids: (llm.reset(), llm.eval(ids)), plan, spent)])
        prompt = rng.choice(allowed, size=int(plan["decode_prompt_tokens"])).tolist()
        steps = rng.choice(allowed, size=int(plan["new_tokens"])).tolist()
        per_token: List[float] = []

        def run() -> None:
            llm.reset()
            llm.eval(prompt)
            for tok in steps:
                t0 = time.perf_counter()
                llm.eval([tok])
                per_token.append(time.perf_counter() - t0)

        times = _timed_runs(run, plan, spent)
        out["decode"] = {"runs": len(times), "step_s": per_token[-len(times) * len(steps):]}
    finally:
        llm._logits_all = logits_all
        llm.reset()
    return out


OPS = {"runtime_facts": runtime_facts, "rss_peak": _rss_peak, "open": _open, "share": _share, "eval": _eval, "latency": _latency}


def _die_with(parent: int) -> None:
    """A SIGKILLed cell leaves no worker holding the GPU: SIGTERM when the parent goes (Linux), and a parent that
    was already gone before this was armed ends the worker at once."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:
        sys.exit(0)


def main(argv: List[str]) -> int:
    sys.modules["torch"] = None  # type: ignore[assignment]  # the crash this process exists to avoid
    _die_with(int(argv[0]))
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    requests = sys.stdin.buffer
    state: Dict[str, Any] = {}
    while True:
        try:
            op, args = pickle.load(requests)
        except EOFError:
            return 0
        try:
            reply = ("ok", OPS[op](state, *args))
        except Exception as exc:  # the cell raises it with the op's name; the worker keeps serving
            reply = ("error", f"{type(exc).__name__}: {exc}")
        pickle.dump(reply, replies, protocol=pickle.HIGHEST_PROTOCOL)
        replies.flush()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
