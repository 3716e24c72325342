#!/usr/bin/env bash
# The parity tests once more at the OLDEST versions pyproject.toml allows (each lower bound of transformers, peft,
# accelerate and lm-eval). Run it in a disposable environment: it downgrades those packages where it runs.
set -uo pipefail
cd "$(dirname "$0")/.."
pins=$(python - <<'PY'
import re, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
for dep in deps:
    m = re.match(r"^(transformers|peft|accelerate|lm-eval)>=([^,;\s]+)", dep)
    if m:
        print(f"{m[1]}=={m[2]}")
PY
)
echo "[oldest] installing $(echo $pins) ..."
python -m pip install --progress-bar off $pins 2>&1 | grep -E '^(Successfully|ERROR)' || true
python -c 'import transformers, peft, accelerate, lm_eval; print(f"[oldest] transformers {transformers.__version__}, peft {peft.__version__}, accelerate {accelerate.__version__}, lm-eval {lm_eval.__version__}")'
python -m pytest -q -p no:cacheprovider -m "not slow" tests/models tests/attention/test_graph_decode.py \
  tests/evaluate/test_eval_cli.py tests/evaluate/test_lm_eval_model.py \
  tests/train/test_finetune.py "$@"
rc=$?
if [ "$rc" -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi
exit "$rc"
