#!/usr/bin/env bash
# make gpu-bundle [DEST=gpu-bundle]: everything an offline GPU node needs to run qbench, in one folder to carry there.
#   DEST/wheels/    qbench's own wheel and every package of this checkout's venv except those the node keeps (its
#                   CUDA torch: torch, triton, nvidia-*), as binary wheels for the node's Python and platform
#   DEST/qbench/    the project tree (Makefile, conf/, scripts/): `make sweep` and `scripts/gpu_run.py` run from it
#   DEST/data/      the offline MMLU/GSM8K files ($QBENCH_DATA), where this machine has them
#   DEST/weights/   model files already cached here ($QBENCH_CACHE/weights: the demo's GGUF), where present
#   DEST/cache/downloads/  llama-cpp-python's sdist, where cached here (make install fetched it): install.sh builds
#                   llama.cpp from it on the node, with CUDA where nvcc is (the GGUF methods, docs/gguf.md)
#   DEST/install.sh on the node: installs the wheels into its Python with no index, keeping its torch
# usage: bash scripts/gpu_bundle.sh DEST [PYTHON]     (PYTHON: the venv whose packages to carry, default .venv/bin/python)
# Options (environment):
#   GPU_PYTHON=3.12        the node's Python version (default: PYTHON's); binary wheels are fetched for it
#   GPU_PLATFORM="..."     pip --platform tags (default: manylinux 2014..2_28 x86_64, and any)
#   KEEP="torch triton nvidia-*"   packages the node already has and must keep (glob patterns, case-insensitive)
#   REQS=FILE              the requirements to carry (default: `pip freeze` of PYTHON, minus qbench and KEEP)
#   WHEELS=0               skip the wheels (the project tree, data and weights only)
# A package with no binary wheel on the index (GPT-QModel, hqq) is built here from source: such a wheel suits the
# node only where GPU_PYTHON equals this machine's Python; the script says which ones it built.
set -euo pipefail
dest=${1:?usage: gpu_bundle.sh DEST [PYTHON]}
py=${2:-.venv/bin/python}
cd "$(dirname "$0")/.."
command -v "$py" >/dev/null || [ -x "$py" ] || { echo "gpu_bundle: no Python at $py (make install first, or pass one)" >&2; exit 2; }
git rev-parse --is-inside-work-tree >/dev/null 2>&1 || { echo "gpu_bundle: $PWD is not a git checkout (the bundle carries the files git tracks)" >&2; exit 2; }
here=$("$py" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
gpu_python=${GPU_PYTHON:-$here}
keep=${KEEP:-torch triton nvidia-* cuda-*}
cache=${QBENCH_CACHE:-.cache/qbench}
# llama-cpp-python's sdist as make install cached it (nullglob: none, an empty list)
shopt -s nullglob; sdists=("$cache"/downloads/llama_cpp_python-*.tar.gz); shopt -u nullglob
mkdir -p "$dest/wheels" "$dest/qbench"
dest=$(cd "$dest" && pwd)

# The project as git sees it: tracked and untracked-but-not-ignored files (no .venv, runs/, caches), less the
# committed example reports (27 MB a node does not need)
git ls-files -z -co --exclude-standard -- . ':!reports/examples' | tar --null -T - --ignore-failed-read -cf - 2>/dev/null | tar -xf - -C "$dest/qbench"
echo "gpu_bundle: project -> $dest/qbench ($(du -sh "$dest/qbench" | cut -f1))"

if [ "${WHEELS:-1}" != 0 ]; then
  "$py" -m pip wheel -q --no-deps -w "$dest/wheels" .
  reqs=$(mktemp)
  if [ -n "${REQS:-}" ]; then cp "$REQS" "$reqs"; else
    # local version labels (+cpu) name this machine's build, not the node's; editable installs are qbench itself
    "$py" -m pip freeze --exclude-editable | grep -v '^#' | grep -iv '^qbench[=@ ]' | sed 's/+[^ ;]*$//' > "$reqs"
  fi
  # llama-cpp-python has no binary wheel: one built here would be a CPU build for this Python; the node builds its
  # own from the carried sdist (below), with the build tools carried as wheels
  grep -iv '^llama[-_]cpp[-_]python==' "$reqs" > "$reqs.k" || true; mv "$reqs.k" "$reqs"
  if [ ${#sdists[@]} -gt 0 ]; then
    printf '%s\n' scikit-build-core cmake ninja pathspec packaging >> "$reqs"
  fi
  for pattern in $keep; do
    grep -iv "^${pattern//\*/.*}==" "$reqs" > "$reqs.k" || true; mv "$reqs.k" "$reqs"
  done
  read -r -a plat <<< "${GPU_PLATFORM:---platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any}"
  fetch=(-m pip download -q --no-deps --only-binary=:all: --python-version "$gpu_python" --implementation cp "${plat[@]}" -d "$dest/wheels")
  built=()
  # one call for all (fast); where one package has no binary wheel, one call each, building from source what lacks one
  if ! "$py" "${fetch[@]}" -r "$reqs" 2>/dev/null; then
    while read -r req; do
      [ -z "$req" ] && continue
      "$py" "${fetch[@]}" "$req" 2>/dev/null && continue
      DISABLE_CUDA=1 "$py" -m pip wheel -q --no-deps -w "$dest/wheels" "$req" && built+=("$req")
    done < "$reqs"
  fi
  echo "gpu_bundle: $(ls "$dest/wheels" | wc -l) wheels for Python $gpu_python -> $dest/wheels ($(du -sh "$dest/wheels" | cut -f1))"
  if [ ${#built[@]} -gt 0 ]; then
    echo "gpu_bundle: built here from source (a wheel tagged cp${here/./} suits Python $here only): ${built[*]}"
  fi
  rm -f "$reqs"
fi

data=${QBENCH_DATA:-}
if [ -n "$data" ] && [ -d "$data" ]; then cp -r "$data" "$dest/data"; echo "gpu_bundle: data <- $data"; fi
weights=$cache/weights
if [ -d "$weights" ]; then mkdir -p "$dest/weights" && cp -r "$weights/." "$dest/weights/"; echo "gpu_bundle: weights <- $weights"; fi
for sdist in "${sdists[@]}"; do
  mkdir -p "$dest/cache/downloads" && cp "$sdist" "$dest/cache/downloads/"
  echo "gpu_bundle: llama.cpp sdist <- $sdist (install.sh builds it on the node)"
done

cat > "$dest/install.sh" <<'EOF'
#!/usr/bin/env bash
# On the GPU node: install qbench and the carried wheels into this Python, with no package index, keeping its torch.
# Then: cd qbench && make sweep EXP=<experiment>   (see qbench/docs/gpu.md)
set -euo pipefail
cd "$(dirname "$0")"
python3 -m pip install --no-index --find-links wheels "qbench[methods,eval,report,slurm]"
mkdir -p weights && echo "export QBENCH_DATA=$PWD/data QBENCH_CACHE=$PWD/cache HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1" > env.sh
mkdir -p cache && ln -sfn "$PWD/weights" cache/weights
# llama.cpp for the GGUF methods, from the carried sdist: with CUDA where nvcc is (3.5-5 min on 16 cores), else a
# CPU build (gguf cells then run on the CPU and say so); neither stops the install when it fails
if compgen -G "cache/downloads/llama_cpp_python-*.tar.gz" >/dev/null; then
  export QBENCH_CACHE=$PWD/cache
  python3 -m qbench.methods._llamacpp setup || echo "install.sh: llama.cpp's converter not unpacked: gguf methods will not run"
  python3 -m pip install -q --no-index --find-links wheels scikit-build-core cmake ninja || true
  if command -v nvcc >/dev/null || [ -x /usr/local/cuda/bin/nvcc ]; then
    bash qbench/scripts/llama_cuda_build.sh - || echo "install.sh: the CUDA build of llama.cpp failed: gguf methods will not run"
  else
    echo "install.sh: no nvcc: building llama.cpp for the CPU (gguf cells run on the CPU and say so)"
    python3 -m pip install -q --no-index --no-deps --no-build-isolation cache/downloads/llama_cpp_python-*.tar.gz \
      || echo "install.sh: the CPU build of llama.cpp failed (a C++ compiler is needed): gguf methods will not run"
  fi
fi
echo "installed; run: source $PWD/env.sh && cd $PWD/qbench && make sweep EXP=gpu_smollm2"
EOF
chmod +x "$dest/install.sh"
echo "gpu_bundle: $dest ($(du -sh "$dest" | cut -f1)): carry it to the node, then bash install.sh there"
