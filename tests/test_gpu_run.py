"""scripts/gpu_run.py (the project's GPU measurements as named steps under a budget) and scripts/gpu_bundle.sh
(make gpu-bundle: what an offline GPU node needs). Nothing here needs a GPU: every step's commands are composed
with --cfg job, the budget is tried on a command that prints nothing, and the bundle is built without wheels."""
from __future__ import annotations

import importlib.util
import os
import shlex
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from qbench.config import validate_eval

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpu_run():
    spec = importlib.util.spec_from_file_location("gpu_run", ROOT / "scripts" / "gpu_run.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def qbench_overrides(gpu_run, cmd: list) -> list | None:
    """The Hydra overrides of a step's command (bench_check's too, after its own flags); None for other tools."""
    if cmd[:3] == gpu_run.QBENCH:
        return [a for a in cmd[3:] if a != "-m"]
    if cmd[:2] == gpu_run.BENCH_CHECK:
        args, out = cmd[2:], []
        while args:
            if args[0].startswith("--"):
                args = args[2:]
            else:
                out.append(args.pop(0))
        return out
    return None


@pytest.mark.slow  # ~13 compositions of ~3 s each
def test_every_step_composes(gpu_run, tmp_path):
    """A renamed config key or option breaks a step at compose time, here, not on a lent GPU."""
    a = gpu_run.parse(["latency-8b", "--runs-dir", str(tmp_path), "--data", str(tmp_path)])
    checked = 0
    for name, step in gpu_run.STEPS.items():
        for cmd in step.commands(a):
            overrides = qbench_overrides(gpu_run, cmd)
            if overrides is None:
                if cmd[0] == "sh" and " -m lm_eval " in cmd[2]:  # on a folder only known at run time
                    assert str(ROOT / "qbench" / "evaluate" / "lm_eval_tasks") in cmd[2], name
                elif cmd[0] == "sh":  # a probe on a folder only known at run time: the script must exist
                    script = Path(shlex.split(cmd[2])[2])
                    assert script.is_file() and script.parent == ROOT / "scripts", f"{name}: {cmd[2]}"
                else:
                    assert Path(cmd[1]).is_file(), f"{name}: {cmd[1]} does not exist"
                continue
            proc = subprocess.run([sys.executable, "-m", "qbench", "-m", *overrides, "--cfg", "job"], cwd=ROOT,
                                  capture_output=True, text=True, timeout=120,
                                  env=dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT)))
            assert proc.returncode == 0, f"{name}: {overrides}\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}"
            checked += 1
    assert checked >= 12


def test_options_reach_the_commands(gpu_run):
    a = gpu_run.parse(["spread-8b", "--methods", "bf16", "--affinity", "gpu_local", "--repeats", "3",
                       "--first-index", "2", "--extra", "bench.new_tokens=32 bench.max_time_per_figure_s=3"])
    (cmd,) = gpu_run.STEPS["spread-8b"].commands(a)
    assert cmd[cmd.index("--repeats") + 1] == "3" and cmd[cmd.index("--first-index") + 1] == "2"
    assert "bench.cpu_affinity=gpu_local" in cmd and cmd[-2:] == ["bench.new_tokens=32", "bench.max_time_per_figure_s=3"]
    per_method = gpu_run.STEPS["methods-8b"].commands(gpu_run.parse(["methods-8b", "--methods", "hqq,fp8"]))
    assert [next(x for x in c if x.startswith("method=")) for c in per_method] == ["method=hqq", "method=fp8"]


def test_eval_vs_lm_eval_full_size_one_task_per_call(gpu_run):
    """--limit 0 is every item on both sides (no limit key, no --limit flag), and --tasks/--sides cut the comparison
    into calls that fit a lease: one task, one side at a time, with the same batch size on both."""
    a = gpu_run.parse(["eval-vs-lm-eval-8b", "--limit", "0", "--tasks", "gsm8k", "--sides", "qbench,lm-eval",
                       "--batch", "96"])
    qbench, lm_eval = gpu_run.STEPS["eval-vs-lm-eval-8b"].commands(a)
    assert "eval.limit=null" in qbench and "eval.tasks=[gsm8k]" in qbench and "eval.batch_size=96" in qbench
    assert "run.sweep=eval_vs_lm_eval_gsm8k_limitall_batch96" in qbench  # its own sweep: not skipped as done
    assert "run.force=true" not in qbench
    shell = lm_eval[2]
    assert "--tasks qbench_gsm8k " in shell and "--limit" not in shell and "--batch_size 96 " in shell
    # the CLI's results file is written before its table is printed, beside qbench's sweep, and packed with it
    assert shell.endswith(f"--output_path {a.runs_dir}/eval_vs_lm_eval_gsm8k_limitall_batch96_lm_eval_cli")
    assert gpu_run.STEPS["eval-vs-lm-eval-8b"].sweeps(a) == ["eval_vs_lm_eval_gsm8k_limitall_batch96",
                                                             "eval_vs_lm_eval_gsm8k_limitall_batch96_lm_eval_cli"]
    qbench_only = gpu_run.parse(["eval-vs-lm-eval-8b", "--limit", "0", "--tasks", "gsm8k", "--sides", "qbench"])
    assert gpu_run.STEPS["eval-vs-lm-eval-8b"].sweeps(qbench_only) == ["eval_vs_lm_eval_gsm8k_limitall_batch32"]
    # an MMLU category is lm-eval's group on its side and qbench's mmlu over the same subjects on the other
    a = gpu_run.parse(["eval-vs-lm-eval-8b", "--limit", "0", "--tasks", "mmlu_stem,mmlu_other", "--sides", "qbench,lm-eval"])
    qbench, lm_eval = gpu_run.STEPS["eval-vs-lm-eval-8b"].commands(a)
    assert "eval.tasks=[mmlu]" in qbench and "--tasks qbench_mmlu_stem,qbench_mmlu_other " in lm_eval[2]
    subjects = next(o for o in qbench if o.startswith("eval.mmlu_subjects="))[len("eval.mmlu_subjects=["):-1].split(",")
    assert "anatomy" in subjects and "business_ethics" in subjects and "philosophy" not in subjects
    assert len(subjects) == sum(c in ("stem", "other") for c in gpu_run.MMLU_SUBJECTS.values())
    for tasks in ("mmlu_maths", "mmlu,mmlu_stem"):  # unknown; a category inside the whole MMLU, twice on lm-eval's side
        with pytest.raises(SystemExit):
            gpu_run.parse(["eval-vs-lm-eval-8b", "--tasks", tasks])
    # eval=default's few-shot counts name mmlu and gsm8k: a task set without one of them drops its count, which
    # the cell's validation refuses otherwise (this failed on a lent H200 before a model was loaded)
    for tasks in ("gsm8k", "mmlu_humanities"):
        (qbench,) = gpu_run.STEPS["eval-vs-lm-eval-8b"].commands(
            gpu_run.parse(["eval-vs-lm-eval-8b", "--limit", "0", "--tasks", tasks, "--sides", "qbench"]))
        proc = subprocess.run([sys.executable, "-m", "qbench", "-m", *qbench_overrides(gpu_run, qbench), "--cfg", "job"],
                              cwd=ROOT, capture_output=True, text=True, timeout=120,
                              env=dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT)))
        assert proc.returncode == 0, proc.stderr[-2000:]
        validate_eval(OmegaConf.create(proc.stdout).eval)
    default = gpu_run.STEPS["eval-vs-lm-eval-8b"].commands(gpu_run.parse(["eval-vs-lm-eval-8b"]))
    assert len(default) == 3 and "run.force=true" in default[1] and "eval.limit=24" in default[0]
    assert "--tasks qbench_mmlu,qbench_gsm8k " in default[2][2] and "--limit 24 " in default[2][2]


def test_eval_vs_lm_eval_gsm8k_items_cut_into_slices(gpu_run, tmp_path, monkeypatch):
    """--items A:B: both sides read a data folder whose GSM8K test split is items A..B-1 of --data's, with MMLU and
    GSM8K's train split (the few-shot examples) linked unchanged, in a sweep of its own; main builds it."""
    import json

    data = tmp_path / "data"
    (data / "gsm8k").mkdir(parents=True)
    (data / "mmlu" / "test").mkdir(parents=True)
    lines = [json.dumps({"question": f"q{i}", "answer": f"#### {i}"}) for i in range(10)]
    (data / "gsm8k" / "test.jsonl").write_text("\n".join(lines) + "\n")
    (data / "gsm8k" / "train.jsonl").write_text(lines[0] + "\n")
    argv = ["eval-vs-lm-eval-8b", "--limit", "0", "--tasks", "gsm8k", "--items", "3:7", "--sides", "qbench,lm-eval",
            "--data", str(data), "--runs-dir", str(tmp_path / "runs"), "--out", str(tmp_path / "out")]
    calls = []
    monkeypatch.setattr(gpu_run, "run", lambda cmd, budget, log, env: calls.append((cmd, env)) or 0)
    monkeypatch.setattr(gpu_run, "pack", lambda *args: None)
    assert gpu_run.main(argv) == 0
    (qbench, qenv), (lm_eval, lenv) = calls
    sliced = Path(qenv["QBENCH_DATA"])
    assert sliced != data and lenv["QBENCH_DATA"] == str(sliced) and json.dumps(str(sliced)) in lm_eval[2].replace("\\", "")
    assert (sliced / "gsm8k" / "test.jsonl").read_text().splitlines() == lines[3:7]
    assert (sliced / "gsm8k" / "train.jsonl").resolve() == (data / "gsm8k" / "train.jsonl").resolve()
    assert (sliced / "mmlu").resolve() == (data / "mmlu").resolve()
    assert "run.sweep=eval_vs_lm_eval_gsm8k_limitall_items3-7_batch32" in qbench
    assert gpu_run.main(argv) == 0  # a second call finds the folder there and writes the same slice
    assert (sliced / "gsm8k" / "test.jsonl").read_text().splitlines() == lines[3:7]
    with pytest.raises(SystemExit, match="has 10 items"):
        gpu_run.main([*argv[:5], "--items", "8:12", *argv[7:]])
    for bad in (["--items", "7:3"], ["--items", "x"], ["--items", "0:5", "--tasks", "mmlu_stem"],
                ["--items", "0:5", "--limit", "24"]):
        with pytest.raises(SystemExit):
            gpu_run.parse(["eval-vs-lm-eval-8b", "--limit", "0", "--tasks", "gsm8k", *bad])
    with pytest.raises(SystemExit):  # another step would silently run every item
        gpu_run.parse(["latency-8b", "--limit", "0", "--tasks", "gsm8k", "--items", "0:5"])


def test_budget_interrupts_a_command_that_prints_nothing(gpu_run, tmp_path):
    """SIGINT at the budget even while the command is silent (a compile), and the log says what happened."""
    script = ("import signal, sys, time\n"
              "signal.signal(signal.SIGINT, lambda *a: (print('interrupted', flush=True), sys.exit(3)))\n"
              "time.sleep(60)\n")
    log = tmp_path / "session.log"
    start = time.monotonic()
    rc = gpu_run.run([sys.executable, "-c", script], 1.0, log, dict(os.environ))
    assert rc == 3 and time.monotonic() - start < 20
    text = log.read_text()
    assert "[1 s]" in text and "interrupted" in text and "=== rc=3" in text


def test_pack_leaves_out_job_folders(gpu_run, tmp_path):
    cell = tmp_path / "runs" / "latency_8b" / "m__bf16"
    cell.mkdir(parents=True)
    (cell / "result.json").write_text("{}")
    (tmp_path / "runs" / "latency_8b" / ".submitit" / "1").mkdir(parents=True)
    (tmp_path / "runs" / "latency_8b" / ".submitit" / "1" / "log.out").write_text("x")
    gpu_run.pack(tmp_path / "runs", "latency_8b", tmp_path)
    with tarfile.open(tmp_path / "latency_8b.tgz") as tar:
        assert sorted(tar.getnames()) == ["latency_8b", "latency_8b/m__bf16", "latency_8b/m__bf16/result.json"]


def test_setup_without_wheels_says_so(gpu_run, tmp_path, capsys):
    assert gpu_run.main(["setup", "--wheels", str(tmp_path), "--site", str(tmp_path / "site")]) == 2
    assert "no .whl under --wheels" in capsys.readouterr().err


def test_bundle_holds_the_project_data_and_an_install_script(tmp_path):
    data = tmp_path / "data" / "gsm8k"
    data.mkdir(parents=True)
    (data / "test.jsonl").write_text("{}\n")
    dest = tmp_path / "bundle"
    downloads = tmp_path / "cache" / "downloads"  # llama-cpp-python's sdist, as make install caches it
    downloads.mkdir(parents=True)
    (downloads / "llama_cpp_python-0.3.36.tar.gz").write_bytes(b"sdist stand-in")
    proc = subprocess.run(["bash", "scripts/gpu_bundle.sh", str(dest), sys.executable], cwd=ROOT, text=True,
                          capture_output=True, timeout=300,
                          env=dict(os.environ, WHEELS="0", QBENCH_DATA=str(tmp_path / "data"),
                                   QBENCH_CACHE=str(tmp_path / "cache")))
    assert proc.returncode == 0, proc.stderr
    # the node builds llama.cpp from the carried sdist: with CUDA where nvcc is, else for its CPU
    assert (dest / "cache" / "downloads" / "llama_cpp_python-0.3.36.tar.gz").read_bytes() == b"sdist stand-in"
    install = (dest / "install.sh").read_text()
    assert "bash qbench/scripts/llama_cuda_build.sh -" in install and "--no-build-isolation cache/downloads/" in install
    assert subprocess.run(["bash", "-n", str(dest / "install.sh")]).returncode == 0
    assert (dest / "qbench" / "Makefile").is_file() and (dest / "qbench" / "conf" / "config.yaml").is_file()
    assert (dest / "qbench" / "scripts" / "gpu_run.py").is_file()
    assert not (dest / "qbench" / ".venv").exists() and not (dest / "qbench" / "reports" / "examples").exists()
    assert (dest / "data" / "gsm8k" / "test.jsonl").is_file() and not (dest / "weights").exists()
    assert os.access(dest / "install.sh", os.X_OK) and "--no-index" in (dest / "install.sh").read_text()


def test_bundle_without_a_python_is_one_line(tmp_path):
    proc = subprocess.run(["bash", "scripts/gpu_bundle.sh", str(tmp_path / "b"), str(tmp_path / "nopython")],
                          cwd=ROOT, text=True, capture_output=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "make install first" in proc.stderr


def test_the_cuda_build_script_takes_the_pinned_sdist():
    from qbench.methods import _llamacpp as lc

    script = (ROOT / "scripts" / "llama_cuda_build.sh").read_text()
    assert f"/downloads/llama_cpp_python-{lc.LLAMA_CPP_PYTHON}.tar.gz" in script
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "llama_cuda_build.sh"), "/tmp/nowhere", "/nonexistent.tar.gz"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "no sdist at /nonexistent.tar.gz" in proc.stderr


def test_a_packed_llama_cpp_imports_from_its_new_site_and_evaluates(tmp_path):
    """scripts/llama_pack.sh on this machine's own llama-cpp-python: one copy of each library and a link for its
    SONAME; the unpacked package (not the installed one) loads a GGUF and evaluates."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="the gguf extra (make install builds it)")
    from qbench.load import tiny, weights
    from qbench.methods import _llamacpp as lc

    sources = Path(os.environ.get("QBENCH_LLAMACPP_SRC") or weights.default_dest().parent / "llama.cpp-0.3.36")
    gguf_file = tmp_path / "f32.gguf"
    lc.convert(tiny.build(tmp_path / "tiny"), gguf_file, sources, tmp_path / "convert.log")
    out = tmp_path / "llama_cpp.tar.gz"
    subprocess.run(["bash", str(ROOT / "scripts" / "llama_pack.sh"), str(Path(llama_cpp.__file__).parents[1]), str(out)],
                   check=True, timeout=120)
    site = tmp_path / "site"
    site.mkdir()
    subprocess.run(["tar", "xzf", str(out), "-C", str(site)], check=True, timeout=60)
    lib = site / "llama_cpp" / "lib"
    names = sorted(p.name for p in lib.iterdir())
    assert "libllama.so" in names and not (lib / "libllama.so").is_symlink()
    versioned = [n for n in names if n.split(".so", 1)[1].count(".") > 1]
    assert not versioned, f"the wheel's versioned copies are left: {versioned}"
    assert all((lib / n).is_symlink() for n in names if not n.endswith(".so")), names
    code = ("import sys, llama_cpp\n"
            "assert llama_cpp.__file__.startswith(sys.argv[1]), llama_cpp.__file__\n"
            "m = llama_cpp.Llama(model_path=sys.argv[2], n_ctx=64, logits_all=True, verbose=False)\n"
            "m.eval([5, 17, 99])\n"
            "maps = open('/proc/self/maps').read()\n"
            "print(m.scores.shape[1], sys.argv[1] + '/llama_cpp/lib/libllama.so' in maps)\n")
    done = subprocess.run([sys.executable, "-c", code, str(site), str(gguf_file)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(site)}, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    n_vocab, from_pack = done.stdout.split()
    assert int(n_vocab) > 0 and from_pack == "True", "libllama was loaded from the unpacked package"


def test_install_gpu_rebuilds_llama_cpp_with_cuda_only_where_it_cannot_offload_and_nvcc_is():
    """make install-gpu's llama.cpp step, dry-run: the check for an offloading build comes first, the CUDA build
    (into the running Python: SITE "-") only after it, and a node without nvcc is told its gguf cells run on the CPU."""
    dry = subprocess.run(["make", "-n", "--no-print-directory", "install-gpu"], cwd=ROOT, capture_output=True,
                         text=True, timeout=30)
    assert dry.returncode == 0, dry.stderr
    text = dry.stdout
    assert "qbench.methods._llamacpp setup" in text
    assert text.index("llama_supports_gpu_offload") < text.index("scripts/llama_cuda_build.sh -") < text.index("no nvcc")
    script = (ROOT / "scripts" / "llama_cuda_build.sh").read_text()
    assert '"$site" = -' in script and "--force-reinstall" in script
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "llama_cuda_build.sh"), "-", "/nonexistent.tar.gz"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "no sdist" in proc.stderr
