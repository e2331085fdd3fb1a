#!/usr/bin/env bash
# The whole test suite, as `make test` and CI run it. Fails when no test ran (pytest exit code 5).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
# Build the embedded default target first (once, ~30 s) so test timings are about the tests.
.venv/bin/lk-vllm models || exit 1
$PY -m pytest -v --durations=30 "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
    echo "run_tests: pytest collected no tests; failing on purpose" >&2
    exit 1
fi
exit "$rc"
