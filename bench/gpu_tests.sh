#!/usr/bin/env bash
# On the GPU machine: the tests that run the Triton kernels compiled at release shapes when CUDA is present
# (InfLLM-V2, Lightning, the fixtures on CUDA), with a per-test timeout (pytest-timeout) so that one hung or
# slow test fails alone instead of ending the run. The log also goes to $OUT/gpu_tests.log when $OUT is set,
# and each test's outcome, time and failure report to $OUT/gpu_tests_stream.log as it ends (bench/pytest_stream.py),
# so a run cut by the machine's time limit still says what failed and why.
# Exit status: pytest's.
#   bash bench/gpu_tests.sh                 # all three files
#   bash bench/gpu_tests.sh -k union        # extra pytest arguments are passed on
cd "$(dirname "$0")/.." || exit 2
export PYTHONPATH=$PWD/bench:$PWD/src${PYTHONPATH:+:$PYTHONPATH}
LOG=/dev/null
[ -n "${OUT:-}" ] && LOG=$OUT/gpu_tests.log && export SALA_TEST_STREAM=$OUT/gpu_tests_stream.log
TIMEOUT=()  # pytest-timeout, where installed (the GPU image has it)
python -c "import pytest_timeout" 2>/dev/null && TIMEOUT=(--timeout "${TEST_TIMEOUT:-120}")
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader 2>&1 | tee "$LOG"
python -m pytest -q -rfE --tb=short --durations=15 -p no:cacheprovider -p pytest_stream "${TIMEOUT[@]}" \
  tests/ops/test_infllmv2_triton.py tests/ops/test_lightning_triton.py tests/test_fixtures.py "$@" 2>&1 | tee -a "$LOG"
exit "${PIPESTATUS[0]}"
