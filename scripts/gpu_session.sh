#!/usr/bin/env bash
# The GPU checks of the closing notes, as run on a lent H100 (no network). Each step has its own time budget
# so that one slow step cannot eat the others; results go to $OUT (or ./gpu_out) as tarballs of runs/.
#   bash scripts/gpu_session.sh setup            install the carried wheels (.whl/) into /tmp/site
#   bash scripts/gpu_session.sh sweep1b          issue 2: Llama-3.2-1B shape, random init x 5 methods
#   bash scripts/gpu_session.sh eval1b           issue 4: bf16 and bnb_nf4 on MMLU + GSM8K (stated limits)
#   bash scripts/gpu_session.sh gptq_awq         issue 5: GPTQ + AWQ on an 8-layer 1B shape, then the cache hit
#   bash scripts/gpu_session.sh repeat           issue 3: batch-1 decode, both paths, 5 fresh runs per method
#   bash scripts/gpu_session.sh report1b         issue 6: latency and accuracy in the same cells, for the example
#   bash scripts/gpu_session.sh topup            issue 3: add runs to the committed 8B bench-check until each method has 5
#   bash scripts/gpu_session.sh smollm2          issue 15: the real SmolLM2-135M x 7 methods, quality + MMLU/GSM8K subset
#                                                (its GGUF travels in parts: GGUF_PARTS, default /tmp/gguf.part*)
#   bash scripts/gpu_session.sh latency8b        issue 18: the default gpu_8b cell (bf16, fp16): CI-until-precise, graph path
#   bash scripts/gpu_session.sh rounds8b         issue 18: 3 interleaved rounds of bf16 and bnb_nf4, batch 1
#   bash scripts/gpu_session.sh benchcheck8b     issue 18: bench-check bf16 and bnb_nf4, batch 1, N fresh runs, +- affinity
#   bash scripts/gpu_session.sh newmethods8b     issue 17: hqq, torchao_int8wo, torchao_int4wo, fp8 on the 8B shape
#   bash scripts/gpu_session.sh eagerprobe       issue 18: where the first eager generate at a batch size spends its time
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 GPTQMODEL_OFFLINE=1 PYTHONUNBUFFERED=1
export QBENCH_CACHE=${QBENCH_CACHE:-/tmp/qbench-cache} QBENCH_DATA=${QBENCH_DATA:-$PWD/.gpudata}
Q="python3 -m qbench.cli"
RUNS=/tmp/gpu_runs
# every step's whole output also goes to $OUT/session.log: a cell's own log lines (its child process's) are the only
# account of where a cut cell spent its time, and the caller usually filters what it prints
step() {
  local budget=$1; shift; echo "=== $(date +%T) [$budget s] $*" | tee -a "$OUT/session.log"
  timeout --signal=INT "$budget" "$@" 2>&1 | tee -a "$OUT/session.log"
  echo "=== rc=${PIPESTATUS[0]} $(date +%T)" | tee -a "$OUT/session.log"
}
# bench_check.py on issue 3's cell: batch-1 decode of TOKENS tokens on both paths, prefill at 512 tokens
bench_cell() {  # budget dir first-index repeats model method tokens
  step "$1" python3 scripts/bench_check.py --runs-dir "$2" --first-index "$3" --repeats "$4" \
    model=$5 model.random_init=true method=$6 bench.batch_sizes=[1] bench.prompt_tokens=[512] \
    bench.new_tokens=$7 bench.decode_paths=[eager,static] bench.min_repeats=10 ${EXTRA:-}
}
pack() { tar czf "$OUT/$1.tgz" --exclude='.submitit' -C "$RUNS" "$1"; ls -la "$OUT/$1.tgz"; }

case "${1:-}" in
  setup)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site ${WHL:-.whl}/*.whl
    python3 -c "import torch, transformers, bitsandbytes, lm_eval, gptqmodel, hydra; print('torch', torch.__version__, 'transformers', transformers.__version__, 'bnb', bitsandbytes.__version__, 'gpu', torch.cuda.get_device_name(0))"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem,power.limit --format=csv
    ;;
  sweep1b)
    step "${BUDGET:-300}" $Q -m experiment=gpu_1b run.runs_dir=$RUNS ${METHODS:+method=$METHODS} \
      bench.batch_sizes=[1,8,32] bench.new_tokens=64 bench.decode_paths=[eager] bench.min_repeats=5 bench.min_duration_s=0
    pack gpu_1b
    ;;
  eval1b)
    step "${BUDGET:-240}" $Q -m model=llama3_2_1b_instruct model.random_init=true method=bf16,bnb_nf4 run.sweep=eval_1b \
      run.runs_dir=$RUNS bench.enabled=false eval=quick eval.limit=5 eval.task_limits.gsm8k=64 eval.batch_size=32
    pack eval_1b
    ;;
  gptq_awq)
    # pass 1 quantizes (and builds the kernels); pass 2, a new sweep, must hit the quantized-checkpoint cache
    for pass in 1 2; do
      methods=${METHODS1:-bf16,gptq,awq}; budget=${BUDGET:-400}
      [ $pass = 2 ] && methods=${METHODS2:-gptq,awq} && budget=${BUDGET2:-120}
      [ "$budget" = 0 ] && continue
      step "$budget" $Q -m model=llama3_2_1b_instruct model.random_init=true +model.config_overrides.num_hidden_layers=8 \
        model.name=llama3_2_1b_8layers method=$methods run.sweep=gptq_awq_pass$pass run.runs_dir=$RUNS \
        method.calibration.source=$PWD/.gpudata/gsm8k/train.jsonl method.calibration.text_field=question \
        bench.batch_sizes=[1,8] bench.new_tokens=64 bench.decode_paths=[eager] bench.min_repeats=5 bench.min_duration_s=0 \
        ${EXTRA:-}
      pack gptq_awq_pass$pass
    done
    ;;
  repeat)
    # MODEL (default the 1B shape; llama3_1_8b_instruct for the issue's shape), NEW_TOKENS, BUDGET per method;
    # FIRST numbers the runs from there, to add runs to those of an earlier call on the same warm machine
    model=${MODEL:-llama3_2_1b_instruct}
    for m in ${METHODS:-bf16 fp16 bnb_nf4 bnb_int8}; do
      bench_cell "${BUDGET:-120}" $RUNS/repeat_${model}_$m "${FIRST:-0}" "${N:-5}" $model $m "${NEW_TOKENS:-128}"
    done
    tar czf "$OUT/repeat.tgz" -C $RUNS $(cd $RUNS && ls -d repeat_* 2>/dev/null) 2>/dev/null
    ;;
  topup)
    # The committed runs of STAB (docs/stability/h100_8b) are copied to $RUNS/topup/<method>, then one fresh-process
    # run at a time is added until a method has TARGET ok runs, so the step can stop between runs when BUDGET (s) is
    # spent and a later call on the warm machine goes on from there. Same shape as the committed runs (bnb_int8
    # decodes 32 tokens, at 6 tokens/s). Only this call's new result.json files come back, in $OUT/topup.tgz.
    src=${STAB:-docs/stability/h100_8b}; deadline=$((SECONDS + ${BUDGET:-540})); mark=$(mktemp)
    for m in ${METHODS:-bf16 fp16 bnb_nf4 bnb_int8}; do
      dir=$RUNS/topup/$m; mkdir -p "$dir"; [ -d "$src/$m" ] && cp -an "$src/$m/." "$dir/"
      tokens=64; [ "$m" = bnb_int8 ] && tokens=32; tries=0
      while n=$(grep -l '"status": "ok"' "$dir"/bench_check-*/*/result.json 2>/dev/null | wc -l); [ "$n" -lt "${TARGET:-5}" ]; do
        [ $((deadline - SECONDS)) -lt "${RUN_S:-150}" ] && { echo "=== $m: $n runs, no time for another"; break 2; }
        tries=$((tries + 1)); [ "$tries" -gt 5 ] && { echo "=== $m: $n ok runs after 5 tries, next method"; break; }
        bench_cell $((deadline - SECONDS)) "$dir" "$n" 1 llama3_1_8b_instruct $m $tokens
      done
    done
    (cd $RUNS && find topup -name result.json -newer "$mark" | tar czf "$OUT/topup.tgz" -T -) && tar tzf "$OUT/topup.tgz"
    ;;
  report1b)
    # one sweep whose cells carry latency AND accuracy, so every chart of the report has real numbers. On an H100
    # fp16+bf16+bnb_nf4 take ~520 s and bnb_int8 ~250 s more: the sweep skips finished cells, so run it twice
    step "${BUDGET:-560}" $Q -m experiment=gpu_1b run.sweep=report_1b run.runs_dir=$RUNS method=${METHODS:-fp16,bf16,bnb_nf4,bnb_int8} \
      bench.batch_sizes=[1,8,32] bench.new_tokens=64 bench.decode_paths=[eager] bench.min_repeats=5 bench.min_duration_s=0 \
      eval=quick eval.limit=5 eval.task_limits.gsm8k=32 eval.max_gen_toks=128 eval.batch_size=8
    pack report_1b
    ;;
  smollm2)
    # The GGUF (98 MB) is more than one call carries: earlier calls on the warm machine left its parts in /tmp
    gguf=$QBENCH_CACHE/weights/SmolLM2-135M-Instruct.Q4_1.gguf; mkdir -p "$(dirname "$gguf")"
    [ -s "$gguf" ] || cat ${GGUF_PARTS:-/tmp/gguf.part*} > "$gguf"
    python3 -c "import sys; from qbench import weights; sys.exit(weights.sha256_of(sys.argv[1]) != weights.PACKAGED['smollm2'].sha256)" "$gguf" \
      || { echo "=== $gguf: wrong sha256 (parts missing?)"; rm -f "$gguf"; exit 1; }
    step "${BUDGET:-540}" $Q -m experiment=gpu_smollm2 run.runs_dir=$RUNS ${METHODS:+method=$METHODS} ${EXTRA:-}
    tar czf "$OUT/gpu_smollm2.tgz" --exclude='.submitit' --exclude='*.npz' -C "$RUNS" gpu_smollm2 && ls -la "$OUT/gpu_smollm2.tgz"
    ;;
  latency8b)
    step "${BUDGET:-560}" $Q -m experiment=gpu_8b method=${METHODS:-bf16,fp16} run.runs_dir=$RUNS run.sweep=${SWEEP:-latency_8b} ${EXTRA:-}
    pack ${SWEEP:-latency_8b}
    ;;
  rounds8b)
    step "${BUDGET:-560}" $Q -m experiment=gpu_8b method=${METHODS:-bf16,bnb_nf4} run.runs_dir=$RUNS run.sweep=rounds_8b \
      run.rounds=${ROUNDS:-3} bench.batch_sizes=[1] bench.decode_paths=[eager,static,graph] ${EXTRA:-}
    pack rounds_8b
    ;;
  newmethods8b)
    # eager, static and graph at batch 1/8/32, shortened (32 tokens, 3 s per figure), one step per method so that
    # a slow one cannot starve the others (the sweep skips finished cells); a cell's compiles past 150 s in all are
    # recorded as the path's reason. A cell takes 220-250 s with 60 s of compiles (H200, 2026-12-02: int4wo, fp8,
    # eager + static); int8wo's static runs take ~5 s at batch 8 and more at 32, so give it BUDGET=540 alone
    for m in $(echo "${METHODS:-hqq,torchao_int8wo,torchao_int4wo,fp8}" | tr , ' '); do
      step "${BUDGET:-300}" $Q -m experiment=gpu_8b method=$m run.runs_dir=$RUNS run.sweep=newmethods_8b \
        ${EXTRA:-bench.new_tokens=32 bench.max_time_per_figure_s=3 bench.max_compile_s=150}
    done
    pack newmethods_8b
    ;;
  eagerprobe)
    step "${BUDGET:-150}" python3 scripts/probe_eager_first_call.py
    ;;
  benchcheck8b)
    for aff in ${AFFINITY:-null gpu_local}; do
      for m in ${METHODS:-bf16 bnb_nf4}; do
        # FIRST numbers the runs from there: runs added to the committed ones (docs/stability/h200_8b/benchcheck_8b)
        step "${BUDGET:-150}" python3 scripts/bench_check.py --runs-dir $RUNS/benchcheck_8b/${m}_affinity_$aff \
          --first-index "${FIRST:-0}" --repeats "${N:-5}" \
          model=llama3_1_8b_instruct model.random_init=true method=$m bench.device=cuda bench.batch_sizes=[1] \
          bench.prompt_tokens=[512] bench.decode_paths=[${PATHS:-eager}] bench.cpu_affinity=$aff ${EXTRA:-}
      done
    done
    tar czf "$OUT/benchcheck_8b.tgz" --exclude='.submitit' -C $RUNS benchcheck_8b && ls -la "$OUT/benchcheck_8b.tgz"
    ;;
  *) sed -n 2,15p "$0"; exit 2 ;;
esac
