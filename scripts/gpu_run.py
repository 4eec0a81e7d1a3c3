#!/usr/bin/env python3
"""The project's own GPU measurements, as named steps with a time budget each, for a lent or offline GPU node.

    python scripts/gpu_run.py --list                       what each step measures, and its default budget
    python scripts/gpu_run.py setup --wheels bundle/wheels  install carried wheels (make gpu-bundle) into --site
    python scripts/gpu_run.py latency-8b --budget 560 --methods bf16,fp16 --extra "bench.new_tokens=64"

A user's own sweep needs none of this (`make sweep EXP=...`; docs/gpu.md). These steps are how the committed
example reports and docs/stability.md were measured: each runs qbench (or scripts/bench_check.py) under a budget
in seconds (SIGINT when it is spent, so one slow step cannot eat a lease's others; the sweep skips finished cells
when run again), appends its whole output to OUT/session.log (a cut cell's own log lines are the only account of
where its time went) and packs its runs into OUT/<sweep>.tgz. Options: --methods (comma list), --extra (more
Hydra overrides, space-separated), --model, --repeats, --first-index, --affinity, --rounds, --limit, --batch, --tasks,
--sides, --items, --sweep, --runs-dir, --out
(default $OUT or gpu_out), --site (default /tmp/site: put first on PYTHONPATH where it exists).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from qbench.evaluate.lm_eval_tasks import MMLU_CATEGORIES, MMLU_SUBJECTS  # noqa: E402  (stdlib only, no torch)

# eval-vs-lm-eval-8b's tasks: lm-eval's qbench_<name> on its side; an MMLU category is qbench's mmlu over that
# category's subjects, so the whole of MMLU can be cut into calls that fit a lease's 10 minutes
EVAL_TASKS = ("mmlu", "gsm8k", *(f"mmlu_{c}" for c in MMLU_CATEGORIES))
QBENCH = [sys.executable, "-m", "qbench"]
BENCH_CHECK = [sys.executable, str(ROOT / "scripts" / "bench_check.py")]
SHORT_LATENCY = ["bench.batch_sizes=[1,8,32]", "bench.new_tokens=64", "bench.decode_paths=[eager]",
                 "bench.min_repeats=5", "bench.min_duration_s=0"]


class Step(NamedTuple):
    measures: str
    budget_s: int
    commands: Callable[[argparse.Namespace], List[List[str]]]  # each command gets the whole budget
    sweeps: Callable[[argparse.Namespace], List[str]]           # folders under --runs-dir to pack


def _sweep(a: argparse.Namespace, default: str) -> str:
    return a.sweep or default


def _q(a: argparse.Namespace, *overrides: str) -> List[str]:
    return [*QBENCH, "-m", *overrides, f"run.runs_dir={a.runs_dir}", *shlex.split(a.extra or "")]


def _methods(a: argparse.Namespace, default: str) -> str:
    return a.methods or default


def _gptq_awq(a: argparse.Namespace, methods: str, sweep_pass: int, calibrated: bool = True) -> List[str]:
    """One pass of gptq-awq-cache; calibration keys only for the methods that have them (bf16 has none)."""
    calibration = [f"method.calibration.source={a.data}/gsm8k/train.jsonl", "method.calibration.text_field=question"]
    return _q(a, "model=llama3_2_1b_instruct", "model.random_init=true", "+model.config_overrides.num_hidden_layers=8",
              "model.name=llama3_2_1b_8layers", f"method={methods}", f"run.sweep=gptq_awq_pass{sweep_pass}",
              *(calibration if calibrated else []), "bench.batch_sizes=[1,8]", *SHORT_LATENCY[1:])


def _spread(a: argparse.Namespace) -> List[List[str]]:
    """One bench_check call per method and CPU affinity: N fresh-process runs of one cell at batch 1."""
    cmds = []
    for aff in (a.affinity or "null,gpu_local").split(","):
        for m in _methods(a, "bf16,bnb_nf4").split(","):
            cmds.append([*BENCH_CHECK, "--runs-dir", f"{a.runs_dir}/{_sweep(a, 'spread_8b')}/{m}_affinity_{aff}",
                         "--first-index", str(a.first_index), "--repeats", str(a.repeats),
                         f"model={a.model or 'llama3_1_8b_instruct'}", "model.random_init=true", f"method={m}",
                         "bench.device=cuda", "bench.batch_sizes=[1]", "bench.prompt_tokens=[512]",
                         f"bench.cpu_affinity={aff}", *shlex.split(a.extra or "")])
    return cmds


def _tasks(a: argparse.Namespace) -> List[str]:
    return a.tasks.split(",")


def _sides(a: argparse.Namespace) -> List[str]:
    return a.sides.split(",")


def _qbench_tasks(a: argparse.Namespace) -> List[str]:
    """eval.tasks (and eval.mmlu_subjects where MMLU categories were named rather than the whole of it)."""
    tasks = _tasks(a)
    categories = {t[len("mmlu_"):] for t in tasks if t.startswith("mmlu_")}
    names = list(dict.fromkeys("mmlu" if t.startswith("mmlu_") else t for t in tasks))
    subjects = [s for s, c in MMLU_SUBJECTS.items() if c in categories]  # parse refuses mmlu beside a category
    # eval=default's few-shot counts name both tasks, and preflight refuses a count for a task not run
    unrun = [f"~eval.num_fewshot.{t}" for t in ("mmlu", "gsm8k") if t not in names]
    return ([f"eval.tasks=[{','.join(names)}]", *unrun]
            + ([f"eval.mmlu_subjects=[{','.join(subjects)}]"] if subjects else []))


def _lm_eval_limit(a: argparse.Namespace) -> str:
    """--limit 0 is every item (offline: MMLU's 14,079 hendrycks test rows, 14,042 on the Hub; GSM8K's 1,319):
    no limit flag at all."""
    return f"--limit {a.limit} " if a.limit else ""


def _eval_sweep(a: argparse.Namespace) -> str:
    """A sweep per task set, limit and batch: the cell's eval settings differ between calls, and a sweep would
    otherwise skip the second call's cell as done (or rerun the first's as stale)."""
    items = f"_items{a.items[0]}-{a.items[1]}" if a.items else ""
    return _sweep(a, f"eval_vs_lm_eval_{a.tasks.replace(',', '_')}_limit{a.limit or 'all'}{items}_batch{a.batch}")


def _gsm8k_slice(a: argparse.Namespace) -> Path:
    """--items A:B: a data folder like --data but whose GSM8K test split is its items A..B-1 (the rest linked), for
    both sides to read: a GSM8K side at batch 128 on the 8B shape is ~13 min, more than a lent call's 10. lm-eval
    draws each item's few-shot examples in turn from one seeded generator, so a slice's prompts are not the ones
    its items get in a whole run; they are the same on both sides, which is what the comparison needs."""
    start, stop = a.items
    src = Path(a.data)
    lines = (src / "gsm8k" / "test.jsonl").read_text().splitlines()
    if stop > len(lines):
        raise SystemExit(f"--items {start}:{stop}: {src / 'gsm8k' / 'test.jsonl'} has {len(lines)} items")
    dst = Path(a.runs_dir) / "data_slices" / f"gsm8k_{start}-{stop}"
    (dst / "gsm8k").mkdir(parents=True, exist_ok=True)
    for folder, target in ((src, dst), (src / "gsm8k", dst / "gsm8k")):
        for entry in folder.iterdir():
            if entry.name not in ("gsm8k", "test.jsonl") and not (target / entry.name).exists():
                (target / entry.name).symlink_to(entry.resolve())
    (dst / "gsm8k" / "test.jsonl").write_text("\n".join(lines[start:stop]) + "\n")
    return dst


def _eval_vs_lm_eval(a: argparse.Namespace) -> List[List[str]]:
    """qbench cold, qbench again with run.force=true (requests cached), lm-eval's CLI: the --sides asked for."""
    def qbench(*force: str) -> List[str]:
        return _q(a, "model=llama3_1_8b_instruct", "model.random_init=true", "method=bf16", "bench.device=cuda",
                  "bench.enabled=false", "eval=default", *_qbench_tasks(a),
                  f"eval.limit={a.limit or 'null'}", f"eval.batch_size={a.batch}",
                  f"run.sweep={_eval_sweep(a)}", *force)
    sides = {"qbench": qbench, "qbench-warm": lambda: qbench("run.force=true"), "lm-eval": lambda: _lm_eval_alone(a)}
    return [sides[side]() for side in _sides(a)]


def _lm_eval_sweep(a: argparse.Namespace) -> str:
    """The CLI side's --output_path, a folder under --runs-dir beside qbench's sweep (packed with it): lm-eval writes
    its results_<time>.json there before it prints its table, so its scores and total_evaluation_time_seconds
    survive a crash in the printing (a lent H100 lacked pytz, which the table's cell typing imports, and lost them)."""
    return f"{_eval_sweep(a)}_lm_eval_cli"


def _lm_eval_alone(a: argparse.Namespace) -> List[str]:
    """lm-eval's own CLI on the folder qbench materialised for the random 8B (found under the cache at run time),
    with qbench's offline task files and the same few-shot count, limit, batch size and seed."""
    folder = '"$(ls -d "${QBENCH_CACHE:-/tmp/qbench-cache}"/models/random-llama3_1_8b_instruct-* | head -1)"'
    metadata = shlex.quote(json.dumps({"qbench_data_dir": a.data}))
    return ["sh", "-c", f"exec {shlex.quote(sys.executable)} -m lm_eval --model hf --model_args "
            f"pretrained={folder},dtype=bfloat16 --device cuda:0 --batch_size {a.batch} "
            f"--tasks {','.join('qbench_' + t for t in _tasks(a))} --num_fewshot 5 {_lm_eval_limit(a)}--seed 1234 "
            f"--include_path {ROOT / 'qbench' / 'evaluate' / 'lm_eval_tasks'} --metadata {metadata} "
            f"--output_path {shlex.quote(f'{a.runs_dir}/{_lm_eval_sweep(a)}')}"]


def _generation_repeats(a: argparse.Namespace) -> List[List[str]]:
    """Three processes (the third with torch's deterministic algorithms), then the comparison; token files in
    <--out>/generation_repeats."""
    probe = [sys.executable, str(ROOT / "scripts" / "probe_generation_repeats.py")]
    out = ["--out", str(Path(a.out) / "generation_repeats")]
    return [[*probe, "run", "A", *out], [*probe, "run", "B", *out], [*probe, "run", "C", "--deterministic", *out],
            [*probe, "compare", *out]]


def _generation_repeats_trained(a: argparse.Namespace) -> List[List[str]]:
    """The same with trained weights: SmolLM2-135M's fp32 folder, which gpu_smollm2's first cell converts from the
    GGUF into the cache (found at run time), and prompts cut from GSM8K's test problems; 64 rows, 256 tokens."""
    folder = '"$(ls -d "${QBENCH_CACHE:-/tmp/qbench-cache}"/models/gguf-SmolLM2-135M-Instruct* | head -1)"'
    probe = shlex.join([sys.executable, str(ROOT / "scripts" / "probe_generation_repeats.py")])
    rest = shlex.join(["--text", str(Path(a.data) / "gsm8k" / "test.jsonl"), "--batch", "64", "--prompt", "200:1600",
                       "--new-tokens", "256", "--out", str(Path(a.out) / "generation_repeats_smollm2")])
    return [["sh", "-c", f"exec {probe} run {tag} --pretrained {folder} {rest}"]
            for tag in ("A", "B", "C --deterministic")] + [
        ["sh", "-c", f"exec {probe} compare --out {shlex.quote(str(Path(a.out) / 'generation_repeats_smollm2'))}"]]


STEPS: Dict[str, Step] = {
    "methods-1b": Step(
        "memory and eager decode of fp32, fp16, bf16, bnb_int8, bnb_nf4 (Llama-3.2-1B shape, random weights)", 300,
        lambda a: [_q(a, "experiment=gpu_1b", f"run.sweep={_sweep(a, 'gpu_1b')}",
                      *([f"method={a.methods}"] if a.methods else []), *SHORT_LATENCY)],
        lambda a: [_sweep(a, "gpu_1b")]),
    "accuracy-1b": Step(
        "offline MMLU (5 items per subject) and GSM8K (64 items) of bf16 and bnb_nf4, no latency", 240,
        lambda a: [_q(a, "model=llama3_2_1b_instruct", "model.random_init=true", f"method={_methods(a, 'bf16,bnb_nf4')}",
                      f"run.sweep={_sweep(a, 'eval_1b')}", "bench.enabled=false", "eval=quick", "eval.limit=5",
                      "eval.task_limits.gsm8k=64", "eval.batch_size=32")],
        lambda a: [_sweep(a, "eval_1b")]),
    "latency-accuracy-1b": Step(
        "latency and accuracy in the same cells, so every chart of the report has measured numbers", 560,
        lambda a: [_q(a, "experiment=gpu_1b", f"run.sweep={_sweep(a, 'report_1b')}",
                      f"method={_methods(a, 'fp16,bf16,bnb_nf4,bnb_int8')}", *SHORT_LATENCY, "eval=quick",
                      "eval.limit=5", "eval.task_limits.gsm8k=32", "eval.max_gen_toks=128", "eval.batch_size=8")],
        lambda a: [_sweep(a, "report_1b")]),
    "quality-smollm2": Step(
        "the real SmolLM2-135M x every torch-side method (12): KL divergence, top-1, perplexity vs fp32, MMLU/GSM8K "
        "subset", 540,
        lambda a: [_q(a, "experiment=gpu_smollm2", *([f"method={a.methods}"] if a.methods else []))],
        lambda a: ["gpu_smollm2"]),
    "llama-cuda-build": Step(
        "llama-cpp-python built with CUDA from the sdist in $QBENCH_CACHE/downloads, installed into --site "
        "(scripts/llama_cuda_build.sh; start it early: the other steps need no llama.cpp)", 480,
        lambda a: [["bash", str(ROOT / "scripts" / "llama_cuda_build.sh"), a.site]], lambda a: []),
    "gguf-smollm2": Step(
        "experiment=gpu_gguf: fp32, the five GGUF k-quants in llama.cpp on the GPU (after llama-cuda-build), bnb_nf4",
        560, lambda a: [_q(a, "experiment=gpu_gguf", *([f"method={a.methods}"] if a.methods else []))],
        lambda a: ["gpu_gguf"]),
    "latency-8b": Step(
        "the latency phase of the default gpu_8b cell (8B shape): time per path, CI per figure, compiles", 560,
        lambda a: [_q(a, "experiment=gpu_8b", f"method={_methods(a, 'bf16,fp16')}",
                      f"run.sweep={_sweep(a, 'latency_8b')}")],
        lambda a: [_sweep(a, "latency_8b")]),
    "rounds-8b": Step(
        "3 interleaved rounds of bf16 and bnb_nf4 at batch 1: within- against between-round uncertainty", 560,
        lambda a: [_q(a, "experiment=gpu_8b", f"method={_methods(a, 'bf16,bnb_nf4')}",
                      f"run.sweep={_sweep(a, 'rounds_8b')}", f"run.rounds={a.rounds}",
                      "bench.batch_sizes=[1]", "bench.decode_paths=[eager,static,graph]")],
        lambda a: [_sweep(a, "rounds_8b")]),
    "spread-8b": Step(
        "spread of batch-1 figures across N fresh processes, with and without CPU pinning (bench-check)", 150,
        _spread, lambda a: [_sweep(a, "spread_8b")]),
    "methods-8b": Step(
        "hqq, torchao int8/int4 weight-only and fp8 on the 8B shape, every decode path, one budget per method", 300,
        lambda a: [_q(a, "experiment=gpu_8b", f"method={m}", f"run.sweep={_sweep(a, 'methods_8b')}",
                      "bench.new_tokens=32", "bench.max_time_per_figure_s=3", "bench.max_compile_s=150")
                   for m in _methods(a, "hqq,torchao_int8wo,torchao_int4wo,fp8").split(",")],
        lambda a: [_sweep(a, "methods_8b")]),
    "gptq-awq-cache": Step(
        "GPTQ and AWQ quantization time on an 8-layer 1B shape beside bf16, then a second sweep that must hit the "
        "quantized-checkpoint cache", 400,
        lambda a: [_gptq_awq(a, "bf16", 1, calibrated=False), _gptq_awq(a, _methods(a, "gptq,awq"), 1),
                   _gptq_awq(a, _methods(a, "gptq,awq"), 2)],
        lambda a: ["gptq_awq_pass1", "gptq_awq_pass2"]),
    "eval-vs-lm-eval-8b": Step(
        "qbench's MMLU + GSM8K (5-shot, --limit items per task, fixed batch) on the 8B shape with random weights, "
        "cold, then again with run.force=true (the request cache warm), then `lm_eval` alone with its own CLI on the "
        "same saved model folder, tasks, few-shot, limit and batch size (its results in <sweep>_lm_eval_cli)", 560,
        _eval_vs_lm_eval,
        lambda a: [_eval_sweep(a), *([_lm_eval_sweep(a)] if "lm-eval" in _sides(a) else [])]),
    "eager-first-call": Step(
        "where the first eager generate at a batch size spends its time (SDPA backends, cuDNN plans)", 150,
        lambda a: [[sys.executable, str(ROOT / "scripts" / "probe_eager_first_call.py")]], lambda a: []),
    "generation-repeats": Step(
        "whether greedy bf16 generation repeats on this GPU, in one process and across three (the 8B shape, random "
        "weights from one seed, 32 left-padded prompts, 128 tokens), and how often the top two logits tie", 200,
        _generation_repeats, lambda a: []),
    "generation-repeats-smollm2": Step(
        "the same with trained weights (after quality-smollm2's fp32 cell converted the GGUF): SmolLM2-135M in bf16, "
        "64 prompts cut from GSM8K's test problems, 256 tokens", 120, _generation_repeats_trained, lambda a: []),
}


def environment(a: argparse.Namespace) -> Dict[str, str]:
    """Offline, unbuffered, the carried site first, and the cache and data where the node keeps them."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               GPTQMODEL_OFFLINE="1", PYTHONUNBUFFERED="1", QBENCH_DATA=a.data)
    env.setdefault("QBENCH_CACHE", "/tmp/qbench-cache")
    paths = ([a.site] if Path(a.site).is_dir() else []) + [str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def run(cmd: List[str], budget_s: float, log: Path, env: Dict[str, str]) -> int:
    """cmd under a budget: SIGINT when it is spent (qbench then records the cut cell), SIGKILL 30 s later."""
    with log.open("a") as out:
        def say(line: str) -> None:
            print(line, flush=True)
            out.write(line + "\n")
            out.flush()

        say(f"=== {time.strftime('%H:%M:%S')} [{budget_s:.0f} s] {shlex.join(cmd)}")
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        # timers, not a check per output line: a cell compiling for minutes prints nothing
        timers = [threading.Timer(budget_s, _signal, (proc, signal.SIGINT)),
                  threading.Timer(budget_s + 30, _signal, (proc, signal.SIGKILL))]
        for t in timers:
            t.start()
        for line in proc.stdout:  # type: ignore[union-attr]
            say(line.rstrip("\n"))
        rc = proc.wait()
        for t in timers:
            t.cancel()
        say(f"=== rc={rc} {time.strftime('%H:%M:%S')}")
        return rc


def _signal(proc: subprocess.Popen, sig: int) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, sig)  # the whole session: qbench's cell processes too


def pack(runs_dir: Path, sweep: str, out: Path) -> None:
    """OUT/<sweep>.tgz of the sweep's runs, without submitit's job folders; nothing when the step wrote none."""
    src = runs_dir / sweep
    if not src.is_dir():
        print(f"=== {src}: no runs to pack")
        return
    dest = out / f"{sweep.replace('/', '_')}.tgz"
    with tarfile.open(dest, "w:gz") as tar:
        tar.add(src, arcname=sweep, filter=lambda t: None if "/.submitit" in f"/{t.name}" else t)
    print(f"=== {dest} ({dest.stat().st_size / 1e6:.1f} MB)")


def setup(a: argparse.Namespace) -> int:
    """Install the carried wheels into --site without an index, then say what the node has."""
    wheels = sorted(Path(a.wheels).glob("*.whl"))
    if not wheels:
        print(f"gpu_run: no .whl under --wheels {a.wheels} (make gpu-bundle builds them)", file=sys.stderr)
        return 2
    rc = subprocess.call([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                          "--upgrade", "--target", a.site, *map(str, wheels)])
    if rc == 0:
        rc = subprocess.call([sys.executable, "-c", "import torch, transformers, hydra, qbench; print('torch', "
                              "torch.__version__, 'transformers', transformers.__version__, 'cuda', "
                              "torch.cuda.is_available() and torch.cuda.get_device_name(0))"], env=environment(a))
    subprocess.call(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem,power.limit",
                     "--format=csv"])
    return rc


def parse(argv: List[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter,
                                epilog="steps:\n" + "\n".join(f"  {k:<20} {v.measures} ({v.budget_s} s)"
                                                               for k, v in STEPS.items()))
    p.add_argument("step", nargs="?", choices=["setup", *STEPS], help="what to measure (--list: every step)")
    p.add_argument("--list", action="store_true", help="list the steps, what each measures and its budget")
    p.add_argument("--budget", type=float, default=None, help="seconds per command (default: the step's own)")
    p.add_argument("--methods", default=None, help="comma-separated methods (default: the step's own)")
    p.add_argument("--extra", default="", help="more Hydra overrides, space-separated, appended to every command")
    p.add_argument("--model", default=None, help="spread-8b: the model config (default llama3_1_8b_instruct)")
    p.add_argument("--repeats", type=int, default=5, help="spread-8b: fresh-process runs per cell (default 5)")
    p.add_argument("--first-index", type=int, default=0, help="spread-8b: number new runs from here")
    p.add_argument("--affinity", default=None, help="spread-8b: comma list of bench.cpu_affinity values")
    p.add_argument("--limit", type=int, default=24,
                   help="eval-vs-lm-eval-8b: items per task (MMLU: per subject); 0 = every item")
    p.add_argument("--batch", type=int, default=32, help="eval-vs-lm-eval-8b: lm-eval batch size, both sides")
    p.add_argument("--tasks", default="mmlu,gsm8k",
                   help=f"eval-vs-lm-eval-8b: tasks, both sides, from {', '.join(EVAL_TASKS)} (default mmlu,gsm8k)")
    p.add_argument("--sides", default="qbench,qbench-warm,lm-eval",
                   help="eval-vs-lm-eval-8b: which runs, in order (default qbench,qbench-warm,lm-eval)")
    p.add_argument("--items", default=None,
                   help="eval-vs-lm-eval-8b with --tasks gsm8k --limit 0: GSM8K test items A:B only, e.g. 0:660, so "
                        "that the whole of it can be cut into calls that fit a lease")
    p.add_argument("--rounds", type=int, default=3, help="rounds-8b: run.rounds (default 3)")
    p.add_argument("--sweep", default=None, help="the sweep's name under --runs-dir (default: the step's own)")
    p.add_argument("--runs-dir", default="/tmp/gpu_runs", help="where the runs go (default /tmp/gpu_runs)")
    p.add_argument("--out", default=os.environ.get("OUT", "gpu_out"), help="logs and tarballs (default $OUT or gpu_out)")
    p.add_argument("--data", default=os.environ.get("QBENCH_DATA", str(ROOT / ".gpudata")),
                   help="offline MMLU/GSM8K folder (default $QBENCH_DATA or ./.gpudata)")
    p.add_argument("--site", default="/tmp/site", help="where setup installs the wheels; first on PYTHONPATH")
    p.add_argument("--wheels", default="wheels", help="setup: the folder of .whl files (default ./wheels)")
    a = p.parse_args(argv)
    if not a.list and not a.step:
        p.error("name a step, or --list")
    unknown = [t for t in _tasks(a) if t not in EVAL_TASKS]
    if unknown:
        p.error(f"--tasks: {', '.join(unknown)} unknown; choose from {', '.join(EVAL_TASKS)}")
    if "mmlu" in _tasks(a) and any(t.startswith("mmlu_") for t in _tasks(a)):
        p.error("--tasks: mmlu already holds every category; lm-eval would run the named ones twice")
    if a.items is not None:
        try:
            start, stop = (int(x) for x in a.items.split(":"))
        except ValueError:
            p.error(f"--items {a.items!r}: A:B, the first item and one past the last, e.g. 0:660")
        if not 0 <= start < stop:
            p.error(f"--items {a.items!r}: needs 0 <= A < B")
        if a.step != "eval-vs-lm-eval-8b" or a.tasks != "gsm8k" or a.limit:
            p.error("--items: a slice of GSM8K's test items, for eval-vs-lm-eval-8b with --tasks gsm8k --limit 0")
        a.items = (start, stop)
    return a


def main(argv: List[str] | None = None) -> int:
    a = parse(argv)
    if a.list:
        for name, step in STEPS.items():
            print(f"{name:<20} {step.budget_s:>4} s  {step.measures}")
        return 0
    if a.step == "setup":
        return setup(a)
    step = STEPS[a.step]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.items:
        a.data = str(_gsm8k_slice(a))
    env, rc = environment(a), 0
    for cmd in step.commands(a):
        rc = run(cmd, a.budget if a.budget is not None else step.budget_s, out / "session.log", env) or rc
    for sweep in step.sweeps(a):
        pack(Path(a.runs_dir), sweep, out)
    return rc


if __name__ == "__main__":
    sys.exit(main())
