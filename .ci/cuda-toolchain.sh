#!/usr/bin/env bash
# A CUDA 13.0 build toolchain (nvcc and headers) from PyPI wheels, so `--features cuda` compiles on a
# machine with no GPU, no driver and no CUDA packages. Prints the exports to eval:
#   eval "$(.ci/cuda-toolchain.sh [DIR])"     (default DIR: ~/.cache/cuda-13.0)
# nvcc 13.0 writes PTX the 580 driver loads (newer nvcc writes newer PTX, and cudarc refuses nvcc
# past 13.4), so the versions are pinned; nvvm too, which nvcc does not pin.
set -euo pipefail
dir=${1:-$HOME/.cache/cuda-13.0}
if [[ ! -x $dir/cuda/bin/nvcc ]]; then
  python3 -m venv "$dir/venv" >&2
  "$dir/venv/bin/pip" install -q \
    nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88 \
    nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35 >&2
  wheels=$(echo "$dir"/venv/lib/python3*/site-packages/nvidia/cu13)
  mkdir -p "$dir/cuda"
  for sub in bin include nvvm lib; do ln -sfn "$wheels/$sub" "$dir/cuda/$sub"; done
fi
echo "export CUDA_PATH=$dir/cuda CUDA_ROOT=$dir/cuda CUDA_HOME=$dir/cuda PATH=$dir/cuda/bin:\$PATH CUDA_COMPUTE_CAP=\${CUDA_COMPUTE_CAP:-90}"
