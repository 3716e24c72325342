#!/usr/bin/env bash
# Runs study tables side by side on one GPU (one process per table; a 270M model leaves the GPU mostly idle
# in a single process), each for at most SECONDS. `linearize study` is resumable: call this again with the
# same OUT to continue where a cut-off left off. A job still running 30 s after its SIGINT is killed, so that a
# caller with a hard time limit gets control back.
#   usage: scripts/gpu_study.sh MODEL OUT SECONDS JOB... [-- extra `linearize study` options]
# A JOB is a table name, or TABLE:PATTERNS to run only some of its runs in that process (PATTERNS as in
# `linearize study --runs`, e.g. remedies:ssd-0.75*,ssd-fixed*), so that one table can use several processes.
# Run from an exported copy of the sources (no git checkout)? Set LINEARIZE_COMMIT so the records name the commit.
set -uo pipefail
model=$1 out=$2 seconds=$3; shift 3
tables=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do tables+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift
mkdir -p "$out"
python -m linearize info "$model" > "$out/info.log" 2>&1  # dequantize/cache the model once, before parallel loads
for job in "${tables[@]}"; do
  table=${job%%:*} select=()
  [ "$job" != "$table" ] && select=(--runs "${job#*:}")
  timeout -s INT -k 30 "$seconds" python -m linearize study "$table" --model "$model" --out "$out" "${select[@]}" "$@" \
    >> "$out/$(echo "$job" | tr -c 'A-Za-z0-9_.\n-' '_').log" 2>&1 &
done
wait
