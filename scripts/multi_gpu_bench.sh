#!/usr/bin/env bash
# Data-parallel training speed (issue 13): the same training on 1 GPU and on N GPUs of one machine
# (`train --multi_gpu`, NCCL), same per-GPU batch, printing one JSON line per run with seconds per
# optimizer step (median of the steps after the first two, from metrics.jsonl) and examples per
# second. On a lent GPU machine, after scripts/gpu_prepare.sh, as the device tool's command with
# carry ["gpu-bundle"]:
#   bash scripts/multi_gpu_bench.sh [MODEL_DIR]
# MODEL_DIR defaults to a full-size random-weight model made there by scripts/make_bench_model.py.
# Tried here on the CPU (two CPU processes summing over TCP instead of N GPUs):
#   MULTI_BENCH_BINARY=target/debug/instruct-pix2pix MULTI_BENCH_DEVICE=cpu \
#     bash scripts/multi_gpu_bench.sh tests/fixtures/pipelines/sd1-tiny
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-multi-gpu-out}
mkdir -p "$out"
python=${PYTHON:-$(command -v /opt/torch/.venv/bin/python3 || command -v python3)}
device=${MULTI_BENCH_DEVICE:-cuda}
steps=${MULTI_BENCH_STEPS:-12}
batch=${MULTI_BENCH_BATCH:-4}
resolution=${MULTI_BENCH_RESOLUTION:-256}

binary=${MULTI_BENCH_BINARY:-}
if [[ -z $binary ]]; then
  binary=/tmp/gpu-bundle/instruct-pix2pix
  mkdir -p /tmp/gpu-bundle
  xz -d -c gpu-bundle/instruct-pix2pix.xz > "$binary" && chmod +x "$binary" || exit 1
  libs=$(find /opt/torch/.venv -path '*nvidia*' -name 'lib*.so*' -printf '%h\n' 2>/dev/null | sort -u | paste -sd:)
  export LD_LIBRARY_PATH=${libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
fi

model=${1:-/tmp/bench-model}
if [[ ! -f $model/model_index.json ]]; then
  "$python" scripts/make_bench_model.py "$model" || exit 1
fi

if [[ $device == cuda ]]; then
  gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
  one=(--device cuda:0)
  many=(--multi_gpu --num_processes "$gpus")
else
  gpus=2
  one=(--device cpu)
  many=(--device cpu --num_processes 2)
fi

common=(train --pretrained_model_name_or_path "$model"
  --train_data_dir tests/fixtures/train_data/imagefolder --resolution "$resolution"
  --train_batch_size "$batch" --max_train_steps "$steps" --lr_warmup_steps 0 --seed 0
  --report_to none --checkpointing_steps 100000 --skip_memory_check --quiet)

measure() {
  local name=$1 processes=$2; shift 2
  local dir=$out/$name
  rm -rf "$dir"
  "$binary" "${common[@]}" --output_dir "$dir" "$@" >"$out/$name.log" 2>&1
  local status=$?
  "$python" - "$dir/metrics.jsonl" "$name" "$processes" "$batch" "$status" <<'EOF'
import json, statistics, sys
path, name, processes, batch, status = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
try:
    seconds = [json.loads(l)["seconds"] for l in open(path) if '"loss"' in l]
except OSError:
    seconds = []
gaps = [b - a for a, b in zip(seconds, seconds[1:])][2:]
step = statistics.median(gaps) if gaps else None
print(json.dumps({"run": name, "processes": processes, "exit": status, "steps": len(seconds),
                  "s_per_step": step,
                  "examples_per_s": (batch * processes / step) if step else None}))
EOF
}

measure one 1 "${one[@]}"
if (( gpus > 1 )); then
  measure many "$gpus" "${many[@]}"
else
  echo '{"run": "many", "skipped": "this machine has one GPU"}'
fi
