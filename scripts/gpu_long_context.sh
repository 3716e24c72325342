#!/usr/bin/env bash
# The long-context comparison on one GPU, in one resumable script (a 270M model leaves the GPU mostly idle in one
# process, so conversions train side by side):
#   1. each conversion of RUNS trained with `linearize convert --preset $PRESET` (in the background, in parallel);
#   2. `linearize diagnose MODEL --what long`: the base and its training-free window+sinks baselines, once;
#   3. `linearize diagnose RUN --what long --no-base` for every finished conversion, and for the training-free
#      VARIANTS of a trained one (`--hybrid FIELD=VALUE`), a few at a time;
#   4. `linearize report --long-out`: every record merged into one comparison, paired over the same items.
# A finished conversion is packed at once into OUT/packs/<name>/ (`linearize pack-run`): copy that off the machine.
# Every step is skipped when its output exists and a cut-off conversion resumes, so calling the script again with
# the same OUT continues where a time limit stopped it. Nothing runs past SECONDS.
#   usage: scripts/gpu_long_context.sh MODEL OUT SECONDS
# Settings (environment): PRESET (gpu-small), MAX_TRAIN (4 conversions at a time), PARALLEL_EVALS (3),
# BASELINE_WINDOWS (auto,512,64), MORE_BASELINES (';'-separated HybridConfig changes, e.g. sparse_memory=2048+memory_select=query:
# a cut of the bytes of the conversion with them, each in long/base-<changes>/), MEMORY_BASELINES (';'-separated: 2048 or
# auto+CHANGES, each a query-memory baseline in long/base-memory-<...>/; MEMORY_REREAD: the prompt tokens they read
# again against it, default linearize.config.MEMORY_REREAD; MEMORY_FILL (1, the default: keys leaving the window later take
# its free slots, in long/base-memory-<...>-fill/; 0: --no-memory-fill, as the records before session 17); MEMORY_PREFILL
# (none, the default; recall: the prompt before the re-read tokens read with the online recall memory, in
# long/base-memory-<...>-prefill/)), BASE_ARGS (the layers and window the baselines cut: --layers global --window 64), LONG_ARGS (extra `diagnose` options), and
# RUN_EVALS (1; 0: evaluate only the VARIANTS of a trained run, not the run itself in every component mode), BASELINES
# (1; 0: no base, MORE_BASELINES or MEMORY_BASELINES evaluation: train, pack and evaluate the runs only),
# RUNS_OVERRIDE / VARIANTS_OVERRIDE (';'-separated entries in the format of RUNS / VARIANTS below), RUN_NAMES (a
# comma-separated subset of the runs' names). Run from an exported copy of the sources? Set LINEARIZE_COMMIT so the records name the commit.
set -uo pipefail
model=$1 out=$2 seconds=$3
deadline=$((SECONDS + seconds))
left() { echo $((deadline - SECONDS)); }
say() { printf '[long-study %4ss] %s\n' "$SECONDS" "$*"; }
mkdir -p "$out/runs" "$out/long" "$out/logs"

# name | recipe | convert options
RUNS=(
  "lolcats|lolcats|"
  "la-only|la-only|"
  "hedgecats|hedgecats|"
  "ssd|ssd|"
  "ssd-mix|ssd|--set hybrid.combine=mix"
  "ssd-global-mix|ssd|--set hybrid.combine=mix --set hybrid.layers=global"
)
[ -n "${RUNS_OVERRIDE:-}" ] && IFS=';' read -ra RUNS <<< "$RUNS_OVERRIDE"
if [ -n "${RUN_NAMES:-}" ]; then  # keep only these runs (comma-separated names)
  kept=(); for r in "${RUNS[@]}"; do [[ ",$RUN_NAMES," == *",${r%%|*},"* ]] && kept+=("$r"); done
  RUNS=("${kept[@]}")
fi
# name | trained run | training-free changes at load
VARIANTS=(
  "ssd-global-mix-w512|ssd-global-mix|--hybrid window=512"
)
[ -n "${VARIANTS_OVERRIDE+set}" ] && IFS=';' read -ra VARIANTS <<< "$VARIANTS_OVERRIDE"
LONG=(--what long --dtype bfloat16 --bootstrap 1000 ${LONG_ARGS:-})

"${PYTHON:-python3}" -m linearize info "$model" > "$out/logs/info.log" 2>&1  # dequantize and cache the model once
train_all() {  # MAX_TRAIN conversions at a time (each holds a few GB of activations and 262k-vocabulary logits)
  for spec in "${RUNS[@]}"; do
    IFS='|' read -r name recipe opts <<< "$spec"
    dir="$out/runs/$name"
    [ -f "$dir/summary.json" ] && continue
    while [ "$(jobs -rp | wc -l)" -ge "${MAX_TRAIN:-4}" ]; do sleep 5; done
    resume=(); [ -d "$dir" ] && resume=(--resume)
    say "training $name ($recipe $opts)"
    # shellcheck disable=SC2086
    # then its trained parameters packed into OUT/packs/NAME (a few files of <= 15 MiB; `linearize unpack-run` +
    # `convert --resume` rebuild the model on a fresh machine, whose disk the run does not outlive)
    { timeout -s INT -k 20 "$(left)" "${PYTHON:-python3}" -m linearize convert --model "$model" --recipe "$recipe" \
        --preset "${PRESET:-gpu-small}" --out "$dir" "${resume[@]}" $opts >> "$out/logs/convert-$name.log" 2>&1 \
      && mkdir -p "$out/packs/$name" && "${PYTHON:-python3}" -m linearize pack-run "$dir" "$out/packs/$name/$name" \
        --model "$model" >> "$out/logs/convert-$name.log" 2>&1 && say "packed $name into packs/$name"; } &
  done
  wait
}
train_all &

evaluate() {  # name, model dir or spec, options...
  local name=$1 spec=$2; shift 2
  [ -f "$out/long/$name/long.json" ] && return 0
  say "evaluating $name"
  timeout -s INT -k 20 "$(left)" "${PYTHON:-python3}" -m linearize diagnose "$spec" "${LONG[@]}" "$@" --out "$out/long/$name" \
    > "$out/logs/long-$name.log" 2>&1 && say "evaluated $name" || say "evaluation of $name stopped (see logs/long-$name.log)"
}

if [ "${BASELINES:-1}" = 1 ]; then
# shellcheck disable=SC2086
evaluate base "$model" ${BASE_ARGS:---layers global --window 64} --baseline-windows "${BASELINE_WINDOWS:-auto,512,64}" &
# more cuts, each matched to the conversion with these changes (a memory's keys counted), in its own record
[ -n "${MORE_BASELINES:-}" ] && IFS=';' read -ra more <<< "$MORE_BASELINES" && for changes in "${more[@]}"; do
  # shellcheck disable=SC2086
  evaluate "base-$changes" "$model" ${BASE_ARGS:---layers global --window 64} --baselines-only \
    --baseline-windows "auto+$changes" &
done
# the query-memory baselines (the base with the window + sinks + a memory chosen by the prompt's last queries, no
# training): a number of keys, or auto+CHANGES (the memory fills the matched cut's keys beyond the window)
[ -n "${MEMORY_BASELINES:-}" ] && IFS=';' read -ra memories <<< "$MEMORY_BASELINES" && for m in "${memories[@]}"; do
  # shellcheck disable=SC2086
  r=${MEMORY_REREAD:-$("${PYTHON:-python3}" -c 'from linearize.config import MEMORY_REREAD; print(MEMORY_REREAD)')}
  suffix=""; [ "$r" -gt 1 ] && suffix="-reread$r"
  fill=(--no-memory-fill); [ "${MEMORY_FILL:-1}" = 1 ] && fill=(--memory-fill) && suffix+="-fill"
  prefill=${MEMORY_PREFILL:-none}; [ "$prefill" != none ] && suffix+="-prefill"
  evaluate "base-memory-${m#auto+}$suffix" "$model" ${BASE_ARGS:---layers global --window 64} --baselines-only \
    --baseline-windows "" --memory-baselines "$m" --memory-reread "$r" "${fill[@]}" --memory-prefill "$prefill" &
done
fi
pending=("${RUNS[@]%%|*}") variants=("${VARIANTS[@]}")
while [ "$(left)" -gt 20 ]; do
  for i in "${!pending[@]}"; do
    name=${pending[$i]}
    if [ "${RUN_EVALS:-1}" = 0 ]; then unset "pending[$i]"; continue; fi
    if [ -f "$out/runs/$name/summary.json" ]; then
      while [ "$(jobs -rp | wc -l)" -ge $(( 1 + ${PARALLEL_EVALS:-3} )) ]; do sleep 5; done  # + the trainer
      evaluate "$name" "$out/runs/$name" --no-base & unset "pending[$i]"
    fi
  done
  for i in "${!variants[@]}"; do
    IFS='|' read -r name run opts <<< "${variants[$i]}"
    if [ -f "$out/runs/$run/summary.json" ]; then
      while [ "$(jobs -rp | wc -l)" -ge $(( 1 + ${PARALLEL_EVALS:-3} )) ]; do sleep 5; done  # as the runs' evaluations
      # shellcheck disable=SC2086
      evaluate "$name" "$out/runs/$run" --no-base $opts & unset "variants[$i]"
    fi
  done
  [ "$(jobs -rp | wc -l)" -eq 0 ] && break
  sleep 10
done
wait
if compgen -G "$out/long/*/long.json" > /dev/null; then
  say "merging the records"
  "${PYTHON:-python3}" -m linearize report "$out"/long/*/long.json --long-out "$out/long_merged" > "$out/logs/report.log" 2>&1 \
    || say "merge failed (see logs/report.log)"
else
  say "no long-context record to merge (BASELINES=0 and RUN_EVALS=0 evaluate nothing)"
fi
say "done: $(ls "$out/long" | tr '\n' ' ')"
