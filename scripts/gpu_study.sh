#!/usr/bin/env bash
# Runs study tables side by side on one GPU (one process per table; a 270M model leaves the GPU mostly idle
# in a single process), each for at most SECONDS. `linearize study` is resumable: call this again with the
# same OUT to continue where a cut-off left off.
#   usage: scripts/gpu_study.sh MODEL OUT SECONDS TABLE... [-- extra `linearize study` options]
# Run from an exported copy of the sources (no git checkout)? Set LINEARIZE_COMMIT so the records name the commit.
set -uo pipefail
model=$1 out=$2 seconds=$3; shift 3
tables=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do tables+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift
mkdir -p "$out"
python -m linearize info "$model" > "$out/info.log" 2>&1  # dequantize/cache the model once, before parallel loads
for table in "${tables[@]}"; do
  timeout -s INT "$seconds" python -m linearize study "$table" --model "$model" --out "$out" "$@" \
    >> "$out/$table.log" 2>&1 &
done
wait
