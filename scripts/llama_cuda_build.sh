#!/usr/bin/env bash
# Build llama-cpp-python with CUDA on a GPU node, offline, from the sdist qbench keeps under $QBENCH_CACHE/downloads
# (python -m qbench.methods._llamacpp setup fetches it; make gpu-bundle users carry it), and install it into SITE
# (SITE "-": into the running python3's own environment, replacing a CPU build; make install-gpu does that).
# The flags are those measured in docs/gguf.md ("CUDA build on a GPU node": 205-298 s on an H100 node's 16 cores
# with CUDA_ARCH=90). usage: scripts/llama_cuda_build.sh SITE [SDIST]   env: CUDA_ARCH (default native), QBENCH_CACHE,
# PACK=FILE.tar.gz: also pack the installed package to carry to other nodes (scripts/llama_pack.sh: 31 MB against
# the 187 MB wheel for CUDA_ARCH=90)
set -euo pipefail
site=${1:?usage: llama_cuda_build.sh SITE [SDIST]}
sdist=${2:-${QBENCH_CACHE:-/tmp/qbench-cache}/downloads/llama_cpp_python-0.3.36.tar.gz}
[ -f "$sdist" ] || { echo "llama_cuda_build: no sdist at $sdist (python -m qbench.methods._llamacpp setup)" >&2; exit 2; }
command -v nvcc >/dev/null || export PATH=/usr/local/cuda/bin:$PATH
command -v nvcc >/dev/null || { echo "llama_cuda_build: no nvcc on this node: gguf cells run on its CPU" >&2; exit 2; }
# FA off: flash-attention kernels are most of the build; llama.cpp then takes its plain attention path
export CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=${CUDA_ARCH:-native} -DGGML_CUDA_FA=OFF -DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF -DLLAMA_OPENSSL=OFF"
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
wheels=$(mktemp -d)
t0=$(date +%s)
python3 -m pip wheel -q --no-build-isolation --no-index --no-deps -w "$wheels" "$sdist"
if [ "$site" = - ]; then
  python3 -m pip install -q --no-index --no-deps --force-reinstall "$wheels"/llama_cpp_python-*.whl
  site=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
else
  python3 -m pip install -q --no-index --no-deps --upgrade --target "$site" "$wheels"/llama_cpp_python-*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
rm -rf "$wheels"
echo "llama_cuda_build: built in $(( $(date +%s) - t0 )) s, CMAKE_ARGS=$CMAKE_ARGS"
python3 -c "import llama_cpp; print('llama_cuda_build: gpu offload', llama_cpp.llama_supports_gpu_offload())"
[ -z "${PACK:-}" ] || bash "$(dirname "$0")/llama_pack.sh" "$site" "$PACK"
