#!/usr/bin/env bash
# Prepares what the GPU check carries to a lent GPU machine (which has no Rust, no diffusers and no
# network): the release binary built here with `--features cuda` for compute capability 9.0 (H100,
# H200), xz-compressed, and diffusers as a wheel. Writes gpu-bundle/ (git-ignored); then, with the
# device tool: run `bash scripts/gpu_run.sh` with carry ["gpu-bundle"] (scripts/gpu_run.sh says how).
#
#   bash scripts/gpu_prepare.sh            # about 20 minutes on 2 cores (nvcc builds candle's kernels)
set -euo pipefail
cd "$(dirname "$0")/.."
bundle=gpu-bundle
mkdir -p "$bundle"

eval "$(.ci/cuda-toolchain.sh)"
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target/cuda} cargo build --locked --release --features cuda --bin instruct-pix2pix
binary=${CARGO_TARGET_DIR:-target/cuda}/release/instruct-pix2pix
xz -T0 -9 -c "$binary" > "$bundle/instruct-pix2pix.xz"

# The pinned diffusers (pure Python; its needs are on the GPU machine's image).
python3 -m pip download -q --no-deps --only-binary=:all: -d "$bundle" diffusers==0.42.1

# libcurand only if the GPU machine lacks it (its image lists nvidia-curand; gpu_run.sh looks
# there first): BUNDLE_CURAND=1 adds the toolchain's copy, xz-compressed.
if [[ ${BUNDLE_CURAND:-0} == 1 ]]; then
  curand=$(ls "$HOME"/.cache/cuda-13.0/venv/lib/python3*/site-packages/nvidia/cu13/lib/libcurand.so.10)
  xz -T0 -9 -c "$curand" > "$bundle/libcurand.so.10.xz"
fi
du -sh "$bundle"/*
echo "the working tree and $bundle travel together: keep them under 64 MiB"
