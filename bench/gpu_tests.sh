#!/usr/bin/env bash
# On the GPU machine: the tests that run the Triton kernels compiled at release shapes when CUDA is present
# (InfLLM-V2, Lightning, the fixtures on CUDA), with a per-test timeout (pytest-timeout) so that one hung or
# slow test fails alone instead of ending the run. The log also goes to $OUT/gpu_tests.log when $OUT is set.
# Exit status: pytest's.
#   bash bench/gpu_tests.sh                 # all three files
#   bash bench/gpu_tests.sh -k union        # extra pytest arguments are passed on
cd "$(dirname "$0")/.." || exit 2
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
LOG=/dev/null
[ -n "${OUT:-}" ] && LOG=$OUT/gpu_tests.log
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader 2>&1 | tee "$LOG"
python -m pytest -q -rfE --tb=short --durations=15 -p no:cacheprovider --timeout 120 \
  tests/ops/test_infllmv2_triton.py tests/ops/test_lightning_triton.py tests/test_fixtures.py "$@" 2>&1 | tee -a "$LOG"
exit "${PIPESTATUS[0]}"
