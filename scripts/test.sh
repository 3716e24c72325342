#!/usr/bin/env bash
# The test suite: set-up, then pytest (exit code 5, "no tests collected", counts as a failure to notice).
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
# one worker per core (TEST_WORKERS=0: in this process); a test file's tests stay on one worker (module fixtures built once)
python -m pytest -q --durations=15 -n "${TEST_WORKERS:-auto}" --dist loadfile "$@"
rc=$?
if [ "$rc" -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi
exit "$rc"
