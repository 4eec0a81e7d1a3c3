"""llama.cpp's worker process (qbench/methods/_llamacpp_worker.py): torch never loads there, the logits the cell reads
are the ones llama.cpp computed, latency runs in the worker, and a worker that dies or outlives its cell does neither
silently."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("llama_cpp", reason="the gguf extra (make install builds it)")

from qbench.load import tiny, weights
from qbench.measure import timing
from qbench.methods import _llamacpp as lc
from qbench.methods._llamacpp_worker import LlamaWorker, WorkerDied
from tests.test_faults_signals import _alive, _gone_within

REPO = Path(__file__).resolve().parent.parent
SOURCES = Path(os.environ.get("QBENCH_LLAMACPP_SRC") or weights.default_dest().parent / "llama.cpp-0.3.36")


@pytest.fixture(scope="module")
def tiny_f32(tmp_path_factory):
    if not (SOURCES / "convert_hf_to_gguf.py").is_file():
        pytest.fail(f"{SOURCES} has no converter: `python -m qbench.methods._llamacpp setup` (make install runs it)")
    tmp = tmp_path_factory.mktemp("worker")
    lc.convert(tiny.build(tmp / "tiny"), tmp / "f32.gguf", SOURCES, tmp / "convert.log")
    return tmp / "f32.gguf"


def _direct_logits(path: Path, ids: list, out: Path) -> np.ndarray:
    """llama.cpp's own logits for ``ids``, in a fresh process that imports llama_cpp before numpy, as the worker does
    (a CUDA build crashes in a process that loaded numpy first, and this one has)."""
    code = textwrap.dedent("""
        import sys
        import llama_cpp
        import numpy as np
        ids = [int(t) for t in sys.argv[3].split(",")]
        m = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=256, n_batch=256, n_ubatch=256, n_threads=1,
                            n_threads_batch=1, logits_all=True, verbose=False)
        m.eval(ids)
        np.save(sys.argv[2], np.asarray(m.scores[: len(ids)]))
    """)
    subprocess.run([sys.executable, "-c", code, str(path), str(out), ",".join(map(str, ids))], check=True, timeout=120)
    return np.load(out)


def test_the_worker_holds_the_model_without_torch_and_the_cell_reads_its_logits(tiny_f32, tmp_path):
    model = lc.LlamaCppLM(tiny_f32, 256, 1, 256)
    try:
        pid = model.llm.worker.proc.pid
        maps = Path(f"/proc/{pid}/maps").read_text()
        assert "libllama" in maps and "libtorch" not in maps, "llama.cpp in the worker, torch not"
        ids = [5, 17, 99, 3, 250, 1000, 42]
        logits = model(np.asarray([ids])).logits[0].numpy()
        assert logits.shape == (len(ids), model.n_vocab)
        # the same file in llama-cpp-python's own Llama gives the same logits
        np.testing.assert_allclose(logits, _direct_logits(tiny_f32, ids, tmp_path / "direct.npy"), rtol=0, atol=1e-5)
        assert list(model.llm.input_ids[: model.llm.n_tokens]) == ids  # shared with the worker, as Llama holds it
        assert model.weight_bytes() > 0 and model.n_ctx == 256
    finally:
        model.close()
    assert model.llm.worker.proc.wait(timeout=30) == 0, "close() ends the worker"


def test_the_worker_loads_llama_cpps_library_before_numpy():
    """The import order that keeps a CUDA build of llama.cpp alive (the worker module's docstring): llama_cpp's
    library module finishes importing before numpy is first imported. ``-X importtime`` lists each module as its
    import ends; the worker exits at once on an empty stdin."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "qbench.methods._llamacpp_worker",
                           str(os.getpid())], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    order = [line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")]
    assert "llama_cpp.llama_cpp" in order and "numpy" in order
    assert order.index("llama_cpp.llama_cpp") < order.index("numpy"), "numpy was loaded before llama.cpp's library"


def test_a_gguf_cells_memory_counts_the_workers(tiny_f32, tmp_path):
    """The weights live in the worker: its peak joins the cell's, as when one process held both."""
    from types import SimpleNamespace

    from qbench.measure import memory
    from qbench.methods import gguf

    lc.quantize(tiny_f32, tmp_path / "q8_0.gguf", "Q8_0", 1)
    model = lc.LlamaCppLM(tmp_path / "q8_0.gguf", 256, 1, 256)
    try:
        mem = gguf.measure_memory(model, SimpleNamespace(quant_type="Q8_0"))
        cell_now = memory.rss_peak_bytes()
    finally:
        model.close()
    worker = mem["rss_peak_bytes_worker"]
    assert worker > mem["weight_bytes_measured"]  # the weights and llama.cpp's own buffers, in the worker
    assert mem["rss_peak_bytes"] - worker <= cell_now and mem["rss_peak_bytes"] > worker


def test_latency_is_timed_in_the_worker_and_summarized_in_the_cell(tiny_f32):
    from qbench.config import yaml_defaults

    bench = yaml_defaults("bench", "quick", prompt_tokens=[8, 16], new_tokens=4, decode_prompt_tokens=8,
                          min_repeats=2, max_repeats=2, warmup_runs=1, batch_sizes=[1, 4])
    model = lc.LlamaCppLM(tiny_f32, 256, 1, 256)
    try:
        with timing.collect() as spent:  # the cell's budget: the worker's loops are measuring time, not overhead
            t0 = time.perf_counter()
            out = lc.measure_latency(model, bench, model.n_vocab, [0, 1, 2])
            wall_s = time.perf_counter() - t0
        logits_after = model(np.asarray([[5, 6, 7]])).logits  # the latency loop left the model usable
    finally:
        model.close()
    assert [r["prompt_tokens"] for r in out["prefill"]] == [8, 16]
    assert all(r["ttft_ms"]["n"] == 2 and r["ttft_ms"]["p50"] > 0 for r in out["prefill"])
    decode = out["decode"][0]
    assert decode["tokens_per_s"]["n"] == 2 and decode["new_tokens"] == 4 and decode["tokens_per_s"]["p50"] > 0
    assert out["unsupported"] == [{"decode_path": "llama.cpp", "batch_size": 4,
                                   "reason": "qbench drives one llama.cpp sequence at a time (batch 1 only)"}]
    assert tuple(logits_after.shape[:2]) == (1, 3)
    # two prefill figures and one decode figure, each with one warm-up: the timed runs hold at least the seconds
    # the figures report, and warm-ups plus timed runs fit inside the call's wall time
    timed_ms = sum(r["ttft_ms"]["mean"] * 2 for r in out["prefill"]) + decode["per_token_ms"]["mean"] * 2 * 4
    assert spent.figures == 3 and spent.warmup_s > 0 and spent.timed_s >= timed_ms / 1e3
    assert spent.warmup_s + spent.timed_s <= wall_s


def test_a_worker_that_dies_is_an_error_naming_its_signal():
    worker = LlamaWorker()
    try:
        assert "gpu_offload_supported" in worker.call("runtime_facts")
        os.kill(worker.proc.pid, signal.SIGSEGV)  # what llama.cpp beside torch did on the CUDA node
        worker.proc.wait(timeout=30)
        with pytest.raises(WorkerDied, match=r"died of SIGSEGV during 'eval'"):
            worker.call("eval", 0, [1, 2])
    finally:
        worker.close()


def test_a_failing_request_is_an_error_and_the_worker_keeps_serving():
    worker = LlamaWorker()
    try:
        with pytest.raises(RuntimeError, match=r"llama.cpp worker, eval: KeyError"):
            worker.call("eval", 0, [1])  # no model opened yet
        with pytest.raises(RuntimeError, match=r"worker, open: ValueError"):
            worker.call("open", "/nonexistent/model.gguf", 64, 1, 64, 0)
        assert worker.call("runtime_facts")["version"] == lc.LLAMA_CPP_PYTHON
    finally:
        worker.close()


def test_the_worker_ends_when_its_cell_is_killed(tmp_path):
    """SIGKILL runs no handler in the cell: the worker (and the GPU memory it holds) must still go."""
    code = textwrap.dedent("""
        import sys, time
        from qbench.methods._llamacpp_worker import LlamaWorker
        w = LlamaWorker()
        w.call("runtime_facts")
        print(w.proc.pid, flush=True)
        time.sleep(600)
    """)
    cell = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        worker_pid = int(cell.stdout.readline())
        assert _alive(worker_pid)
        cell.kill()
        cell.wait()
        assert _gone_within(worker_pid, 30), "the worker outlived its cell"
    finally:
        if cell.poll() is None:
            cell.kill()
