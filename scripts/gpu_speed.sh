#!/usr/bin/env bash
# Every GPU part of issue 21 on one GPU, in about 10 minutes (each step has its own limit, 14 minutes in all) (one H200), results in OUT:
#   1. the GPU tests of the issue (generate's captured path == eager, custom-op opcheck and compiled layer, the
#      captured static-cache base step, the captured step with norms and MLPs compiled == eager) -> logs/gpu_tests.log
#   2. layer: eager and torch.compile'd (CUDA graphs, Triton kernels as custom ops) hybrid layer vs SDPA, 2k and
#      32k, fwd and fwd+bwd -> speed_layer.json / .md
#   3. decode: the converted model's captured step vs the base with a StaticCache and a captured step, Gemma-3-270M
#      and Llama-3-8B shapes (8 of 32 layers), 1k..128k, batch 1 and the largest the base fits, memory floors; both
#      again with their norms and MLPs compiled into the captured step (the *_compiled rows; the converted one with
#      its deferred fold too, converted_graph_fold16_compiled), and the compiled converted steps once more at the
#      largest batch their state fits (up to 4096: the same GPU filled by each model);
#      the old eager-HF base as an extra at 32k -> speed_decode.json / .md
#   4. generate(): batch-1 tokens/s of the converted Gemma shape, captured (default) vs eager -> generate_speed.json
#   5. conversion throughput: each stage next to the base model's own LoRA step -> speed_conversion.json / .md
#   6. benchmarks/speed_summary.py: the goals table and every table -> speed.json / speed.md
#   usage: PYTHONPATH=$PWD/src scripts/gpu_speed.sh OUT [MODEL]
# MODEL (a Gemma 3 270M .gguf, say) is used for the conversion rows; without it they use random weights of the
# Gemma-3-270M shape (speed does not depend on the weights). Dequantizing a GGUF takes about 80 s, so with MODEL
# the conversion step gets 120 s (CONVERSION_SECONDS) and the run ~6.5 minutes. Settings
# (environment): SKIP_TESTS (set: no step 1), LAYER_SECONDS (110), DECODE_SECONDS (360: the compiled rows compile first; 148 s on an H100 at fe63995, before the deferred-fold compiled rows and the converted rows at the largest batch they fit) and GENERATE_SECONDS
# (150: at 55 and 25 s both steps were cut on an H200 at 44d6733, by compile and capture time; with the compiled
# path, 60 s cut it on an H100 at fe63995), CONVERSION_SECONDS (100 with random weights: 40 s cut it there), LAYER_CONFIGS (gemma3-270m), CONTEXTS (16,32768,131072: the 16-token base rows time the step outside attention, the ceiling of any
# attention speed-up), RECIPES (lolcats; lolcats,ssd adds the SSD stage 2 and the weights objective, ~20 s more), PYTHON, ONLY (a comma-separated
# subset of the steps gpu_tests,layer,decode,generate,conversion: the others are skipped, for a short GPU window;
# DECODE_SHAPES, default gemma3-270m,llama3-8b, then narrows the decode step).
# A step that fails is logged and the next one runs; each step has its own time limit.
set -uo pipefail
out=$1 model=${2:-shape:gemma3-270m}
conversion_seconds=${CONVERSION_SECONDS:-$([ -n "${2:-}" ] && echo 120 || echo 100)}
py=${PYTHON:-python3}
mkdir -p "$out/logs"
say() { printf '[gpu-speed %4ss] %s\n' "$SECONDS" "$*"; }
commit=${LINEARIZE_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
step() {  # name, seconds, command...
  local name=$1 limit=$2; shift 2
  if [ -n "${ONLY:-}" ] && [[ ",$ONLY," != *",$name,"* ]]; then say "$name: skipped (ONLY=$ONLY)"; return; fi
  say "$name"
  timeout "$limit" "$@" > "$out/logs/$name.log" 2>&1 || say "$name: exit $? (see $out/logs/$name.log)"
}

[ -n "${SKIP_TESTS:-}" ] || step gpu_tests 120 "$py" -m pytest -q -p no:cacheprovider -m gpu tests/models/test_fast_generate.py \
  tests/attention/test_triton_ops.py tests/test_bench_decode.py \
  tests/attention/test_graph_decode.py::test_fused_graph_replay_equals_eager_stepping
step layer "${LAYER_SECONDS:-110}" "$py" -m linearize bench --name speed_layer --out-dir "$out" --commit "$commit" --skip-decode --skip-peak \
  --configs "${LAYER_CONFIGS:-gemma3-270m}" --impls sdpa,triton,sdpa_compiled,triton_compiled --lengths 2048,32768 \
  --budget 0.15
step decode "${DECODE_SECONDS:-360}" "$py" -m linearize bench --name speed_decode --out-dir "$out" --commit "$commit" --skip-layer \
  --skip-peak --contexts "${CONTEXTS:-16,32768,131072}" --decode-steps 32 --decode-shapes "${DECODE_SHAPES:-gemma3-270m,llama3-8b}"
step generate "${GENERATE_SECONDS:-150}" "$py" benchmarks/generate_speed.py "$out/generate_speed.json" --commit "$commit"
step conversion "$conversion_seconds" "$py" -m linearize bench --conversion --model "$model" --recipes "${RECIPES:-lolcats}" \
  --name speed_conversion --out-dir "$out" --commit "$commit" --steps 4 --warmup 1 --no-progress
"$py" benchmarks/speed_summary.py "$out" > "$out/logs/summary.log" 2>&1 || say "summary failed (see $out/logs/summary.log)"
say "done: $out/speed.md"
[ ! -f "$out/logs/gpu_tests.log" ] || tail -n 2 "$out/logs/gpu_tests.log"
