#!/usr/bin/env bash
# Issue 20 on its second real model, Qwen2.5-Coder-1.5B-Instruct (qwen2: 28 layers, every one full attention,
# head_dim 128), on one GPU:
#   1. `linearize select-layers`: each layer's loss increase on 4k-token rows when it alone is cut to its window +
#      sinks (the measured criterion for which layers keep full softmax), with the ranking and plot;
#   2. scripts/gpu_long_context.sh with these RUNS: the `ssd` recipe at window 512 with 8 softmax sinks, the `mix`
#      rule with an input-dependent gate, 4k-token rows (8 per step in micro-batches of 2, gradient checkpointing,
#      SSD drawn per layer); every layer converted (`all`) or all but the KEEP layers
#      the measurement ranks highest (`measured:KEEP`), with the delta-rule state (the best reader on Gemma) and
#      the plain sum; the base and its window+sinks baselines cut every layer (`--layers all`).
#   usage: scripts/gpu_long_qwen.sh MODEL OUT SECONDS      (call again with the same OUT to continue)
# Settings (environment): KEEP (4), TRAIN_TOKENS (500000 per stage: the measured delta-all run, 388 s for both
# stages on an H200 at 0444c9a; delta-all-memtrain is the long-context-all recipe), RUN_NAMES (a comma-separated
# subset of delta-all, delta-keep, sum-all, delta-all-memtrain, delta-all-conv4, delta-all-kl, delta-all-kl-g09,
# delta-all-memtrain-g09, delta-all-kl-s1gate, delta-all-s1gate-w64-stage1, delta-all-kl-g09-r8k), SSD_SCHEDULE (the stage-2 p(drop the window) per layer,
# below), and those of gpu_long_context.sh (MAX_TRAIN 3 here, LONG_ARGS below). Every run here trains stage 1 on the `hybrid_output`
# objective (the layer's output with its window, no T x T attention weights over 4k-token rows in 28 layers).
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
model=$1 out=$2 seconds=$3
keep=${KEEP:-4}
mkdir -p "$out/logs"
if [ ! -f "$out/layer_selection/layer_selection.json" ]; then
  timeout -s INT -k 20 "$(( seconds / 4 ))" "${PYTHON:-python3}" -m linearize select-layers "$model" --keep "$keep" \
    --window 512 --sinks 8 --rows 8 --seq-len 4096 --dtype bfloat16 --out "$out/layer_selection" \
    > "$out/logs/select-layers.log" 2>&1 || echo "layer selection stopped (see $out/logs/select-layers.log)"
fi

common="--set hybrid.window=512 --set hybrid.combine=mix --set hybrid.mix_gate=dynamic --set hybrid.softmax_sinks=8"
common+=" --set hybrid.feature_size=half --set stage2.train_mixing=true --set stage2.mixing_lr=1e-3"
common+=" --set data.seq_len=4096 --set data.sources=[sharegpt,dolly,wikitext2,c4,wiki]"
common+=" --set data.train_tokens=${TRAIN_TOKENS:-500000}"
# Memory: 8 rows of 4k tokens in one micro-batch ran out of the H200's 139 GiB in stage 2 (the softmax sums and the
# MLP activations of 28 layers); the same 8 rows per step as 2 x 4 micro-batches, with each layer recomputed in the
# backward pass (stage 1: its transfer loss; stage 2: the decoder layer), keep a conversion to a fraction of that, so
# the MAX_TRAIN conversions share the GPU.
common+=" --set stage1.batch_size=2 --set stage1.grad_accum=4 --set stage2.batch_size=2 --set stage2.grad_accum=4"
common+=" --set stage1.gradient_checkpointing=true --set stage2.gradient_checkpointing=true"
# SSD draws per layer: dropping the window in all 28 layers at once (one draw per step) trains an la_only model whose
# loss sat at ~10 nats (results/long/qwen2.5-coder-1.5b/logs/delta-all-train_log.jsonl); per-layer draws are gentler,
# and at the recipe's p = 0.9 they would still drop ~25 of 28 windows a step: SSD_SCHEDULE (p 0.3, then 0.15) here.
common+=" --set stage2.ssd.granularity=layer --set stage2.ssd.schedule=${SSD_SCHEDULE:-[[0.0,0.3],[0.5,0.15]]}"
delta="--set hybrid.linear_state=delta --set stage1.objective=hybrid_output"
# stage 2 as self-distillation: no LoRA, the KL divergence from the base's next-token distribution, the feature maps
# (and the delta rule's beta) trained beside the gate at 1e-3
kl="--set stage2.objective=kl --set stage2.lora.enabled=false --set stage2.train_feature_maps=true --set stage2.lr=1e-3"
export RUNS_OVERRIDE="delta-all|ssd|$common --set hybrid.layers=all $delta;\
delta-keep|ssd|$common --set hybrid.layers=measured:$keep $delta;\
sum-all|ssd|$common --set hybrid.layers=all --set stage1.objective=hybrid_output;\
delta-all-memtrain|ssd|$common --set hybrid.layers=all $delta --set hybrid.sparse_memory=2048 --set hybrid.memory_block=512;\
delta-all-conv4|ssd|$common --set hybrid.layers=all $delta --set hybrid.qk_conv=4;\
delta-all-kl|ssd|$common --set hybrid.layers=all $delta --set hybrid.sparse_memory=2048 --set hybrid.memory_block=512 $kl;\
delta-all-kl-g09|ssd|$common --set hybrid.layers=all $delta --set hybrid.sparse_memory=2048 --set hybrid.memory_block=512 $kl --set hybrid.mix_value=0.9;\
delta-all-memtrain-g09|ssd|$common --set hybrid.layers=all $delta --set hybrid.sparse_memory=2048 --set hybrid.memory_block=512 --set hybrid.mix_value=0.9;\
delta-all-kl-s1gate|ssd|$common --set hybrid.layers=all $delta --set hybrid.sparse_memory=2048 --set hybrid.memory_block=512 $kl --set stage1.train_mixing=true;\
delta-all-s1gate-w64-stage1|ssd|$common --set hybrid.layers=all $delta --set hybrid.sparse_memory=2048 --set hybrid.memory_block=512 --set hybrid.window=64 --set stage1.train_mixing=true --set stage2.enabled=false;\
delta-all-kl-g09-r8k|ssd|$common --set hybrid.layers=all $delta --set hybrid.sparse_memory=2048 --set hybrid.memory_block=512 $kl --set hybrid.mix_value=0.9 --set data.seq_len=8192 --set stage1.batch_size=1 --set stage1.grad_accum=8 --set stage2.batch_size=1 --set stage2.grad_accum=8"
# delta-all-memtrain: delta-all trained with 2048 exact keys in the loop (the online 'recall' memory: a teacher-forced
# row has no prompt end to choose them by its queries), so that the gate and the linear state learn beside an exact
# memory what they add to it (on delta-all, trained without one, the readout off reads better: RESULTS.md, session 14).
# Its memory is updated every 512 tokens (memory_block; between updates the keys that left the window stay in the
# softmax branch): at the default 64 the memory's walk over a 4k row is 64 sequential boundaries per layer, and stage
# 1 ran at 485-600 tokens/s on the H200 against 3644 without memory (session 15, results/long/qwen2.5-coder-1.5b/s15/
# logs/convert-delta-all-memtrain*.log; one Qwen-shaped layer's forward + backward on the CPU: 70k aten calls against
# 6.6k without memory, 9.8k with memory_block 512). At 512: 3146 / 2377 tokens/s, 456 s for both stages; long QA at 16k /
# 32k 0.179 / 0.273 against delta-all's 0.243 / 0.345, short tasks 99.0% of the base (session 16, RESULTS.md).
# delta-all-kl: delta-all-memtrain with stage 2 as self-distillation (stage2.objective kl, stage2.lora.enabled false):
# every base weight stays the base's, so the softmax branch (window, sinks, memory) is the training-free memory's
# exactly, the readout off IS the training-free baseline (MEMORY_BASELINES with MEMORY_PREFILL=recall), a prompt within
# window + sinks + memory is read as the base reads it, and the linear state and its gate learn from the base's full
# attention what the memory does not hold (scripts/cpu_distill_pilot.sh: the same question on SmolLM2-135M, CPU).
# -g09: the gate starts at g = 0.9 (hybrid.mix_value; 0.5 elsewhere), so stage 1 trains the linear branch to supply a
# tenth of each output rather than half (on SmolLM2, CPU: held-out loss after stage 1 2.986 nats against 3.560 at 0.5,
# the base 2.925; results/long/smollm2-135m/s18-distill-pilot).
# -s1gate: the gate trained in stage 1 too (at stage 1's rate, 1e-2), from 0.5, beside the feature maps: on SmolLM2
# (CPU) the pilot's best final loss (2.970 nats), and its linear readout lowers the loss past the exact memory on long
# documents, beyond the training length too (results/long/smollm2-135m/s19-distill-pilot/reading). On Qwen (session 20,
# H200, s20/) the gate closed the linear branch within one step of stage 1 (g = 0.9985 on average; validation 2.5397
# against the base's 2.5391): with the gate closed, window + sinks + 2048 recall keys reproduce each layer's output on
# 4k-token rows. Not the memory's share of the row: SmolLM2's gate stays open (0.84) with 640 of 1024 keys exact
# (results/long/smollm2-135m/s20-stage1-gate). -s1gate-w64-stage1: stage 1 alone at the pilot's 64-token window
# (~3 min on the H200): is the window what closes Qwen's gate? (SmolLM2 at a 512-token window, CPU, session 21:
# the gate stays open, mean 0.76; results/long/smollm2-135m/s21-stage1-window. Qwen itself at the pilot's window 64,
# 256 keys and 1024-token rows, CPU, session 22: it closes, mean 0.987; results/long/qwen2.5-coder-1.5b/
# s22-cpu-stage1-gate -- the model closes it, so this run is no longer needed.) -g09-r8k: -g09 on 8k-token rows (8
# rows of 8k per step as 8 x 1), where window + sinks + memory hold 31% of a row's keys (4k rows: 63%), the pilot's
# share: does the linear branch earn its bytes once the exact part of a training row is smaller?
# delta-all-conv4: delta-all with LAWCAT's short causal convolution (4 taps) on the linear branch's q/k (session 15:
# no measurable change, RESULTS.md).
# memory_in_state (-instate): the query memory's keys stay in the linear state too, the state as trained (which
# never had a query memory), with the gate shifted by 1 or as trained (-reread32-instate: mix_shift 0); on SQuAD
# (CPU, 12 items, s15/cpu-memory-in-state) no change: these variants ask the same of the long QA.
# memory_prefill (-prefill): the prompt read with the online recall memory, as delta-all-memtrain was trained, the
# decode memory still chosen by the prompt's queries; -recall: the memory as trained, at inference too. On the CPU
# (12 SQuAD items, s16/cpu-memory-prefill): query memory 0.102 bpb, -prefill 0.089, -recall 0.079 (a prompt within
# window + memory is read exactly; -prefill's answer tokens still read keys that left the window after the choice
# through the linear state). Its cost: with the recall memory walked over every prompt, the session-20 evaluations
# scored 3 prompts per ~41 s each (four processes sharing the H200: 24 of the 199 in ~370 s), so the whole set needs
# ~45 min; budget for it, or shorten LONG_ARGS (fewer items, no 32k lengths) for these variants.
# memory_fill (-fill; the default since session 17, the variants before it ran without): the keys that leave the window
# after the query memory is chosen take its free slots before the linear state, so a prompt and answer within window
# + sinks + memory are read exactly (the training-free memory baselines too, MEMORY_FILL).
# training-free variants at load: 256 memory keys (or 2048, chosen by the prompt's queries; with the readout off:
# mix_shift 30), the gate moved towards the window (mix_shift; on Gemma +1 with 256
# keys read as well as the window+sinks cuts), and both
export VARIANTS_OVERRIDE="${VARIANTS_OVERRIDE-sum-all-mem256|sum-all|--hybrid sparse_memory=256 --long-modes hybrid;\
delta-all-mem256|delta-all|--hybrid sparse_memory=256 --long-modes hybrid;\
sum-all-shift1|sum-all|--hybrid mix_shift=1 --long-modes hybrid;\
delta-all-shift1|delta-all|--hybrid mix_shift=1 --long-modes hybrid;\
sum-all-mem256-shift1|sum-all|--hybrid sparse_memory=256,mix_shift=1 --long-modes hybrid;\
delta-all-mem256-shift1|delta-all|--hybrid sparse_memory=256,mix_shift=1 --long-modes hybrid;\
delta-all-mem2048-query-shift1|delta-all|--hybrid sparse_memory=2048,memory_select=query,memory_fill=false,mix_shift=1,memory_reread=1 --long-modes hybrid;\
delta-all-mem2048-query-la-off|delta-all|--hybrid sparse_memory=2048,memory_select=query,memory_fill=false,mix_shift=30,memory_reread=1 --long-modes hybrid;\
delta-all-mem2048-shift1|delta-all|--hybrid sparse_memory=2048,mix_shift=1 --long-modes hybrid;\
delta-all-mem2048-query-shift1-reread32|delta-all|--hybrid sparse_memory=2048,memory_select=query,memory_fill=false,mix_shift=1,memory_reread=32 --long-modes hybrid;\
delta-all-mem256-query-shift1-reread32|delta-all|--hybrid sparse_memory=256,memory_select=query,memory_fill=false,mix_shift=1,memory_reread=32 --long-modes hybrid;\
delta-all-mem2048-query-la-off-reread32|delta-all|--hybrid sparse_memory=2048,memory_select=query,memory_fill=false,mix_shift=30,memory_reread=32 --long-modes hybrid;\
delta-all-mem2048-query-shift3-reread32|delta-all|--hybrid sparse_memory=2048,memory_select=query,memory_fill=false,mix_shift=3,memory_reread=32 --long-modes hybrid;\
delta-all-memtrain-mem2048-query-shift1-reread32|delta-all-memtrain|--hybrid sparse_memory=2048,memory_select=query,memory_fill=false,mix_shift=1,memory_reread=32 --long-modes hybrid;\
delta-all-memtrain-mem2048-query-la-off-reread32|delta-all-memtrain|--hybrid sparse_memory=2048,memory_select=query,memory_fill=false,mix_shift=30,memory_reread=32 --long-modes hybrid;\
delta-all-memtrain-mem4096-query-shift1-reread32|delta-all-memtrain|--hybrid sparse_memory=4096,memory_select=query,memory_fill=false,mix_shift=1,memory_reread=32 --long-modes hybrid;\
delta-all-conv4-mem2048-query-shift1-reread32|delta-all-conv4|--hybrid sparse_memory=2048,memory_select=query,memory_fill=false,mix_shift=1,memory_reread=32 --long-modes hybrid;\
delta-all-conv4-mem2048-query-la-off-reread32|delta-all-conv4|--hybrid sparse_memory=2048,memory_select=query,memory_fill=false,mix_shift=30,memory_reread=32 --long-modes hybrid;\
delta-all-conv4-mem4096-query-shift1-reread32|delta-all-conv4|--hybrid sparse_memory=4096,memory_select=query,memory_fill=false,mix_shift=1,memory_reread=32 --long-modes hybrid;\
delta-all-conv4-mem2048-query-shift1-reread32-instate|delta-all-conv4|--hybrid sparse_memory=2048,memory_select=query,memory_fill=false,mix_shift=1,memory_reread=32,memory_in_state=true --long-modes hybrid;\
delta-all-conv4-mem2048-query-reread32-instate|delta-all-conv4|--hybrid sparse_memory=2048,memory_select=query,memory_fill=false,memory_reread=32,memory_in_state=true --long-modes hybrid;\
delta-all-memtrain-mem2048-query-shift1-reread32-instate|delta-all-memtrain|--hybrid sparse_memory=2048,memory_select=query,memory_fill=false,mix_shift=1,memory_reread=32,memory_in_state=true --long-modes hybrid;\
delta-all-memtrain-mem2048-query-prefill-shift1-reread32|delta-all-memtrain|--hybrid sparse_memory=2048,memory_select=query,memory_fill=false,mix_shift=1,memory_reread=32,memory_prefill=recall --long-modes hybrid;\
delta-all-memtrain-mem2048-query-prefill-la-off-reread32|delta-all-memtrain|--hybrid sparse_memory=2048,memory_select=query,memory_fill=false,mix_shift=30,memory_reread=32,memory_prefill=recall --long-modes hybrid;\
delta-all-memtrain-mem2048-recall-shift1|delta-all-memtrain|--hybrid sparse_memory=2048,memory_select=recall,mix_shift=1 --long-modes hybrid;\
delta-all-memtrain-mem2048-query-prefill-fill-shift1-reread32|delta-all-memtrain|--hybrid sparse_memory=2048,memory_select=query,mix_shift=1,memory_reread=32,memory_prefill=recall,memory_fill=true --long-modes hybrid;\
delta-all-memtrain-mem2048-query-prefill-fill-la-off-reread32|delta-all-memtrain|--hybrid sparse_memory=2048,memory_select=query,mix_shift=30,memory_reread=32,memory_prefill=recall,memory_fill=true --long-modes hybrid;\
delta-all-kl-mem2048-query-prefill-fill-reread32|delta-all-kl|--hybrid sparse_memory=2048,memory_select=query,memory_reread=32,memory_prefill=recall,memory_fill=true --long-modes hybrid;\
delta-all-kl-g09-mem2048-query-prefill-fill-reread32|delta-all-kl-g09|--hybrid sparse_memory=2048,memory_select=query,memory_reread=32,memory_prefill=recall,memory_fill=true --long-modes hybrid;\
delta-all-memtrain-g09-mem2048-query-prefill-fill-reread32|delta-all-memtrain-g09|--hybrid sparse_memory=2048,memory_select=query,memory_reread=32,memory_prefill=recall,memory_fill=true --long-modes hybrid;\
delta-all-kl-s1gate-mem2048-query-prefill-fill-reread32|delta-all-kl-s1gate|--hybrid sparse_memory=2048,memory_select=query,memory_reread=32,memory_prefill=recall,memory_fill=true --long-modes hybrid}"
# the cut of the bytes of the 2048-key query memory's state (within a quarter of the base's at 32k)
export MORE_BASELINES="${MORE_BASELINES-sparse_memory=2048+memory_select=query}"
# the same memory on the base, no linear state and no training: 2048 keys, and as many as those bytes hold
# (4096 keys: 193 MiB at 32k, within a quarter of the base's 896)
export MEMORY_BASELINES="${MEMORY_BASELINES-2048;4096;auto+sparse_memory=2048+memory_select=query}"
export MEMORY_REREAD="${MEMORY_REREAD-32}"  # they read the question again against the memory, as the reread variants
export BASE_ARGS="${BASE_ARGS:---layers all --window 512}" BASELINE_WINDOWS="${BASELINE_WINDOWS:-auto,512}"
export MAX_TRAIN="${MAX_TRAIN:-3}" PARALLEL_EVALS="${PARALLEL_EVALS:-3}"
export LONG_ARGS="${LONG_ARGS:---limit 50 --cell-limit 3 --long-tasks squad,drop,passkey,niah_single,qa_squad \
--lengths 4096,8192,16384,32768 --qa-lengths 8192,16384,32768 --depths 0,0.5,1 --batch-tokens 65536 --position-docs 0}"
exec bash "$here/gpu_long_context.sh" "$model" "$out" "$(( seconds - SECONDS ))"
