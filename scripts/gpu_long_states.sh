#!/usr/bin/env bash
# Issue 20's linear-state comparison on one GPU: Gemma 3's 3 global layers converted with the `ssd` recipe, the `mix`
# rule with an input-dependent gate (trained in stage 2) and 8 softmax sinks, trained on 2k-token rows (text and instructions), with the linear state `sum` (today's
# Hedgehog linear attention), `gated` (per-head data-dependent decay) or `delta` (gated delta rule), at the base's own
# local window (512) and at window 64. It is scripts/gpu_long_context.sh with these RUNS and VARIANTS; the base's record
# and its window+sinks baselines are reused from results/long/gemma3-270m/base (same items, same seed) when OUT has none.
#   usage: scripts/gpu_long_states.sh MODEL OUT SECONDS      (call again with the same OUT to continue)
# Settings (environment): RUN_NAMES (a comma-separated subset of the runs), TRAIN_TOKENS (600000 per stage), STATES_EXTRA (more --set options for every run), and those
# of gpu_long_context.sh (MAX_TRAIN defaults to 5 here).
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
model=$1 out=$2 seconds=$3
mkdir -p "$out/long"
[ -d "$out/long/base" ] || cp -r "$here/../results/long/gemma3-270m/base" "$out/long/base"

common="--set hybrid.layers=global --set hybrid.combine=mix --set hybrid.mix_gate=dynamic --set hybrid.softmax_sinks=8"
common+=" --set hybrid.feature_size=half --set stage2.train_mixing=true --set stage2.mixing_lr=1e-3"
common+=" --set data.seq_len=2048 --set data.sources=[sharegpt,dolly,wikitext2,c4,wiki]"
common+=" --set data.train_tokens=${TRAIN_TOKENS:-600000} ${STATES_EXTRA:-}"
delta="--set hybrid.linear_state=delta --set stage1.objective=hybrid_output"
export RUNS_OVERRIDE="sum-w512|ssd|$common --set hybrid.window=512;\
gated-w512|ssd|$common --set hybrid.window=512 --set hybrid.linear_state=gated;\
delta-w512|ssd|$common --set hybrid.window=512 $delta;\
gated-w64|ssd|$common --set hybrid.linear_state=gated;\
delta-w64|ssd|$common $delta"
export VARIANTS_OVERRIDE="${VARIANTS_OVERRIDE-sum-w512-mem|sum-w512|--hybrid sparse_memory=64 --long-modes hybrid}"
export MAX_TRAIN="${MAX_TRAIN:-5}" PARALLEL_EVALS="${PARALLEL_EVALS:-4}"
export LONG_ARGS="${LONG_ARGS:---limit 50 --cell-limit 3 --long-tasks squad,drop,passkey,niah_single,qa_squad \
--lengths 2048,4096,8192,16384 --qa-lengths 8192,16384 --depths 0,0.5,1 --batch-tokens 65536 --position-docs 0}"
exec bash "$here/gpu_long_context.sh" "$model" "$out" "$seconds"
