#!/usr/bin/env bash
# Runs the GPU check (scripts/gpu_check.py) on a lent GPU machine with what scripts/gpu_prepare.sh
# put in gpu-bundle/, writing the JSON lines and the log to $OUT (or ./gpu-out). As the device
# tool's command, with carry ["gpu-bundle"] and a timeout that leaves room:
#   PYTHONUNBUFFERED=1 bash scripts/gpu_run.sh [--stages env,parity,half,model,edit,train]
# Tried here first with the CPU build and the same arguments:
#   GPU_CHECK_BINARY=target/debug/instruct-pix2pix GPU_CHECK_DEVICE=cpu bash scripts/gpu_run.sh --quick
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-out}
mkdir -p "$out"
python=${PYTHON:-$(command -v /opt/torch/.venv/bin/python3 || command -v python3)}
device=${GPU_CHECK_DEVICE:-cuda}

binary=${GPU_CHECK_BINARY:-}
if [[ -z $binary ]]; then
  binary=/tmp/gpu-bundle/instruct-pix2pix
  mkdir -p /tmp/gpu-bundle
  xz -d -c gpu-bundle/instruct-pix2pix.xz > "$binary" && chmod +x "$binary" || exit 1
fi

# The CUDA libraries: torch's pip packages on the machine, and a carried libcurand if given.
libs=$(find /opt/torch/.venv -path '*nvidia*' -name 'lib*.so*' -printf '%h\n' 2>/dev/null | sort -u | paste -sd:)
if [[ -f gpu-bundle/libcurand.so.10.xz ]]; then
  xz -d -c gpu-bundle/libcurand.so.10.xz > /tmp/gpu-bundle/libcurand.so.10
  libs=/tmp/gpu-bundle:$libs
fi
export LD_LIBRARY_PATH=${libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}

# diffusers from the carried wheel, unless it imports already.
if ls gpu-bundle/diffusers-*.whl >/dev/null 2>&1 && ! "$python" -c 'import diffusers' 2>/dev/null; then
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/gpu-site gpu-bundle/diffusers-*.whl
  export PYTHONPATH=/tmp/gpu-site${PYTHONPATH:+:$PYTHONPATH}
fi

ldd "$binary" | grep -E 'not found|cuda|cublas|curand' >"$out/ldd.txt" 2>&1
nvidia-smi >"$out/nvidia-smi.txt" 2>&1
PYTHONUNBUFFERED=1 "$python" scripts/gpu_check.py --binary "$binary" --device "$device" --work /tmp/gpu-check "$@" \
  2> >(tee "$out/gpu_check.log" >&2) | tee "$out/gpu_check.jsonl"
