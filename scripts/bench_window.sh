#!/usr/bin/env bash
# Frame times of the real window during an edit: starts Xvfb, opens the release build with
# --generate on MODEL and IMAGE, and prints the window's frame statistics (JSON) once the edit is
# done and the screenshot written. During the edit the window redraws continuously (as while a
# slider is dragged), so `worst_gap_during_edit_ms` is the longest the window went without a frame.
#
#   scripts/bench_window.sh MODEL_DIR IMAGE [STEPS] [RESOLUTION] [REDRAW_FPS]
#
# REDRAW_FPS (default 60) is how often the window redraws during the edit; 0 is the normal mode
# (a frame only when something arrives).
#
# Needs Xvfb and Mesa (see .ci/run). Numbers go to docs/benchmarks.md.
set -euo pipefail
model=$1
image=$2
steps=${3:-4}
resolution=${4:-256}
redraw_fps=${5:-60}
cd "$(dirname "$0")/.."
cargo build --release --locked --quiet
work=$(mktemp -d)
trap 'kill $xvfb 2>/dev/null || true; rm -rf "$work"' EXIT
Xvfb :77 -screen 0 1400x1000x24 -nolisten tcp >/dev/null 2>&1 &
xvfb=$!
sleep 1
mkdir -p "$work/config"
# Steps and the resolution cap are window settings: write them as the window stores them.
printf '{"steps": %d, "max_side": %d, "randomize_seed": false, "seed": 1}\n' "$steps" "$resolution" \
  > "$work/config/settings.json"
DISPLAY=:77 INSTRUCT_PIX2PIX_CONFIG_DIR="$work/config" target/release/instruct-pix2pix "$image" \
  --model "$model" --prompt "make it snowy" --generate \
  --screenshot "$work/shot.png" --exit-after-screenshot --frame-stats "$work/frames.json" --redraw-fps "$redraw_fps" >&2
cat "$work/frames.json"
echo
