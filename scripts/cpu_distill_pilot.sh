#!/usr/bin/env bash
# A CPU pilot of stage 2 as self-distillation, before the GPU run on Qwen2.5-Coder-1.5B (scripts/gpu_long_qwen.sh,
# delta-all-kl): SmolLM2-135M-Instruct (llama: 30 layers, every one full attention), every layer converted as
# delta-all-memtrain converts Qwen, scaled to what a 2-core CPU trains in minutes -- a window of 64 (+ 8 sinks) and a
# 256-key recall memory beside 1024-token rows (Qwen: 512 + 8 + 2048 beside 4096), 15 optimizer steps of 4 rows per
# stage (Qwen: 15 of 8). The first four share stage 1 and differ only in stage 2 (objective x what trains):
#   lm-lora  as delta-all-memtrain: LoRA on q/k/v/o, the next-token loss of the data, the gate trained too;
#   kl-maps  as delta-all-kl: no LoRA (every base weight, and so the softmax branch, stays the base's), the KL
#            divergence from the base model's next-token distribution, the feature maps (with beta) and the gate;
#   lm-maps  no LoRA, the next-token loss (the objective alone changed from kl-maps);
#   kl-lora  LoRA as lm-lora, the KL objective (the objective alone changed from lm-lora);
#   kl-maps-g09     kl-maps with the gate starting at g = 0.9 (mix_value; 0.5 elsewhere): stage 1 trains the linear
#                   branch to supply a tenth of each output, not half, and the untrained hybrid starts near the memory;
#   kl-maps-s1gate  kl-maps with the gate trained in stage 1 too (at stage 1's rate, 1e-2), beside the feature maps;
#   lm-lora-g09     lm-lora with the gate starting at g = 0.9 (the gate start alone changed from lm-lora);
#   lm-lora-s1gate  lm-lora with the gate trained in stage 1 too (what trains in stage 1 alone changed from lm-lora).
# Each run's summary.json holds the held-out loss per component mode: hybrid, swa_only (the window + sinks alone:
# this mode leaves the memory out too) and la_only; the base's own loss is in the log. scripts/reading_eval.py
# adds the readout switched off (window + sinks + memory; for the runs without LoRA exactly the untrained base with
# that memory) on held-out long documents. The question: does the linear branch earn its bytes over the memory alone (hybrid
# below the readout off), and which stage 2 reads closer to the base?
#   usage: scripts/cpu_distill_pilot.sh OUT     (calling it again resumes the runs that stopped; RUNS: a subset;
#   MODEL: another base, e.g. the Qwen2.5-Coder-1.5B .gguf, for the s1gate-stage1-short run below)
set -uo pipefail
out=$1
mkdir -p "$out"
common=(--model "${MODEL:-smollm2-135m}" --recipe ssd
  --set hybrid.layers=all --set hybrid.window=64 --set hybrid.softmax_sinks=8 --set hybrid.combine=mix
  --set hybrid.mix_gate=dynamic --set hybrid.feature_size=half --set hybrid.linear_state=delta
  --set hybrid.sparse_memory=256 --set hybrid.memory_block=64
  --set data.seq_len=1024 "--set" "data.sources=[sharegpt,dolly,wikitext2,c4,wiki]" --set data.train_tokens=61440
  --set data.val_tokens=8192
  --set stage1.objective=hybrid_output --set stage1.epochs=1 --set stage1.batch_size=2 --set stage1.grad_accum=2
  --set stage1.checkpoint_every=5
  --set stage2.epochs=1 --set stage2.batch_size=2 --set stage2.grad_accum=2 --set stage2.checkpoint_every=5
  --set stage2.train_mixing=true --set stage2.mixing_lr=1e-3 --set stage2.loss_chunk=1024
  --set stage2.ssd.granularity=layer "--set" "stage2.ssd.schedule=[[0.0,0.3],[0.5,0.15]]"
  --set stage2.early_stopping.eval_every=0
  --set eval.batch_size=2 --set runtime.cpu=true --set runtime.show_progress=false)
declare -A extra=(
  [lm-lora]=""
  [kl-maps]="--set stage2.objective=kl --set stage2.lora.enabled=false --set stage2.train_feature_maps=true --set stage2.lr=1e-3"
  [lm-maps]="--set stage2.lora.enabled=false --set stage2.train_feature_maps=true --set stage2.lr=1e-3"
  [kl-lora]="--set stage2.objective=kl"
  [kl-maps-g09]="--set hybrid.mix_value=0.9 --set stage2.objective=kl --set stage2.lora.enabled=false --set stage2.train_feature_maps=true --set stage2.lr=1e-3"
  [lm-lora-g09]="--set hybrid.mix_value=0.9"
  [kl-maps-s1gate]="--set stage1.train_mixing=true --set stage2.objective=kl --set stage2.lora.enabled=false --set stage2.train_feature_maps=true --set stage2.lr=1e-3"
  [lm-lora-s1gate]="--set stage1.train_mixing=true"
  # stage 1 alone, the gate trained: does it close the linear branch when the exact memory covers more of each row?
  # m256: window + sinks + memory = 328 of 1024 keys (the runs above); m568: 640 of 1024, as Qwen's 2568 of 4096
  [s1gate-stage1-m256]="--set stage1.train_mixing=true --set stage2.enabled=false"
  [s1gate-stage1-m568]="--set stage1.train_mixing=true --set stage2.enabled=false --set hybrid.sparse_memory=568"
  # stage 1 alone, the gate trained, 2048-token rows (6 steps of 4): Qwen's softmax span scaled down -- a 512-token
  # window and memory updates every 512 tokens (w512-b512: 512 + 8 + 256 of 2048 keys exact) -- against the pilot's
  # 64-token window with as many keys exact through the memory (w64-m704: 64 + 8 + 704): is it the window that
  # closed Qwen's gate (session 20)?
  [s1gate-stage1-w512-b512]="--set stage1.train_mixing=true --set stage2.enabled=false --set hybrid.window=512 --set hybrid.memory_block=512 --set data.seq_len=2048 --set data.train_tokens=49152"
  [s1gate-stage1-w64-m704]="--set stage1.train_mixing=true --set stage2.enabled=false --set hybrid.sparse_memory=704 --set data.seq_len=2048 --set data.train_tokens=49152"
  # stage 1 alone, the gate trained, 6 steps of 4 rows, 4 validation rows: s1gate-stage1-m256 cut to what a 2-core
  # CPU trains on a 1.5B model in about half an hour; with MODEL=Qwen2.5-Coder-1.5B: does Qwen's gate close at the
  # pilot's settings too (64-token window, 256 keys, 1024-token rows; SmolLM2's stayed open, 0.84)? Then the model,
  # not the window or the rows, closes it.
  [s1gate-stage1-short]="--set stage1.train_mixing=true --set stage2.enabled=false --set data.train_tokens=24576 --set data.val_tokens=4096"
  # kl-maps-g09 cut the same way (6 steps of 4 rows per stage, stage 2 recomputing each decoder layer): with
  # MODEL=Qwen2.5-Coder-1.5B, the CPU-sized delta-all-kl-g09 -- does the linear branch, held open through stage 1 and
  # taught by the base's next-token distribution in stage 2, read better than the readout off (reading_eval.py)?
  [kl-maps-g09-short]="--set hybrid.mix_value=0.9 --set stage2.objective=kl --set stage2.lora.enabled=false --set stage2.train_feature_maps=true --set stage2.lr=1e-3 --set data.train_tokens=24576 --set data.val_tokens=4096 --set stage2.gradient_checkpointing=true"
  # the same with the gate held at 0.8 through stage 1 (the linear branch supplies a fifth of each output): with
  # Qwen, does a larger linear share earn more over the readout off (g09: -0.007 / -0.015 nats at 2048), or cost?
  # kl-maps-g09-short with twice the steps (12 of 4 rows per stage): does the linear readout's gain over the readout
  # off (-0.007 / -0.015 nats at 6 steps) grow with training? (Its validation rows are not the short run's -- the
  # packed split follows train_tokens -- so compare the two by reading_eval.py on the same documents.)
  [kl-maps-g09-12steps]="--set hybrid.mix_value=0.9 --set stage2.objective=kl --set stage2.lora.enabled=false --set stage2.train_feature_maps=true --set stage2.lr=1e-3 --set data.train_tokens=49152 --set data.val_tokens=4096 --set stage2.gradient_checkpointing=true"
  [kl-maps-g08-short]="--set hybrid.mix_value=0.8 --set stage2.objective=kl --set stage2.lora.enabled=false --set stage2.train_feature_maps=true --set stage2.lr=1e-3 --set data.train_tokens=24576 --set data.val_tokens=4096 --set stage2.gradient_checkpointing=true"
)
for name in ${RUNS:-lm-lora kl-maps lm-maps kl-lora}; do
  [ -f "$out/$name/summary.json" ] && continue
  resume=(); [ -d "$out/$name" ] && resume=(--resume)
  # shellcheck disable=SC2086
  "${PYTHON:-python3}" -m linearize convert "${common[@]}" ${extra[$name]} --out "$out/$name" "${resume[@]}" \
    > "$out/$name.log" 2>&1 || { echo "$name failed (see $out/$name.log)"; exit 1; }
  echo "$name done"
done
