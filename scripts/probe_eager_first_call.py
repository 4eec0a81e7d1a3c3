"""Where the first eager ``generate`` at a batch size spends its extra seconds (issue 18).

On the H200 (8B shape, bf16, 64 tokens) the first eager generate at each batch size took 4.2-6.0 s against 1.5 s
for every later one: 15 s of the default cell's 133 s. This probe separates the candidates on one process:
  * per-step stamps of the first and second call: a cost spread over the steps is per shape (every decode step
    has a new key length), one at step 0 is set-up;
  * a fresh prompt length at a batch size already warmed: new key lengths only;
  * the same with cuDNN's attention left out of SDPA's choice: cuDNN builds an execution plan per shape;
  * the top operators of a first call under torch.profiler.
Run on a GPU: python scripts/probe_eager_first_call.py [architecture] (PYTHONPATH holding the repo)."""
import statistics
import sys
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AutoConfig, AutoModelForCausalLM

from qbench.load import models
from qbench.measure.latency import generate_timed

NEW_TOKENS = 64


def call(model, batch: int, prompt: int, note: str) -> None:
    ids = torch.randint(1000, 100000, (batch, prompt), device="cuda")
    mask = torch.ones_like(ids)
    r = generate_timed(model, ids, mask, NEW_TOKENS, "eager", "cuda", 0)
    steps = [b - a for a, b in zip(r["steps_s"][:-1], r["steps_s"][1:])]
    before_first_stamp = r["wall_s"] - r["steps_s"][-1]
    print(f"{note:<44} bs={batch:<3} prompt={prompt:<4} wall {r['wall_s']:6.2f} s | before step 1 (prefill, set-up) "
          f"{before_first_stamp * 1e3:7.1f} ms | step median {statistics.median(steps) * 1e3:6.2f} ms, "
          f"first 3 {[round(x * 1e3, 1) for x in steps[:3]]}, sum {sum(steps):5.2f} s", flush=True)


def main() -> None:
    arch = sys.argv[1] if len(sys.argv) > 1 else "llama3_1_8b_instruct"
    cfg = AutoConfig.for_model(**models.architecture_config(arch))
    t0 = time.perf_counter()
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    print(f"built {arch} on the GPU in {time.perf_counter() - t0:.1f} s; torch {torch.__version__}; "
          f"sdp enabled: flash {torch.backends.cuda.flash_sdp_enabled()}, mem_efficient "
          f"{torch.backends.cuda.mem_efficient_sdp_enabled()}, cudnn {torch.backends.cuda.cudnn_sdp_enabled()}, "
          f"math {torch.backends.cuda.math_sdp_enabled()}; attn_implementation {model.config._attn_implementation}",
          flush=True)
    for i in range(3):
        call(model, 1, 128, f"default backends, call {i + 1}")
    call(model, 1, 256, "default backends, new prompt length")
    call(model, 1, 256, "default backends, again")
    no_cudnn = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    with sdpa_kernel(no_cudnn):
        call(model, 1, 384, "without cuDNN attention, new prompt length")
        call(model, 1, 384, "without cuDNN attention, again")
        call(model, 4, 128, "without cuDNN attention, new batch size")
        call(model, 4, 128, "without cuDNN attention, again")
    call(model, 8, 128, "default backends, new batch size")
    call(model, 8, 128, "default backends, again")
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        call(model, 2, 128, "cuDNN attention only, new batch size")
        call(model, 2, 128, "cuDNN attention only, again")
    from torch.profiler import ProfilerActivity, profile

    ids = torch.randint(1000, 100000, (16, 128), device="cuda")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        generate_timed(model, ids, torch.ones_like(ids), NEW_TOKENS, "eager", "cuda", 0)
    print("first call at bs=16, top operators by CPU time:")
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=18, max_name_column_width=60), flush=True)


if __name__ == "__main__":
    main()
