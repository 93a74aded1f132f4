#!/usr/bin/env bash
# One device call for the kernel checks that follow a GPU profile run on the same machine, each step under its
# own time limit so that a hang costs one step, not the call. Every step writes into a work folder (logs,
# lightning.json, train_step.json, gpu test logs), packed after each step into $OUT/kernel_session.tgz beside
# $OUT/session.log: a call brings back at most 8 files, and on 2026-11-29 the steps wrote 14 (train_step.json
# was left behind).
#   bash bench/kernel_session.sh [seconds for the whole call, default 540]
#   ONLY='lightning|train_step' LIGHTNING_LIMIT=200 bash bench/kernel_session.sh 420   # only these steps
# Steps (skipped when less than their limit is left), most wanted first:
#   1. bench/lightning.py: the default forward vs fla at bf16 128K and 1M, fp32 128K, fwd+bwd and varlen, with
#      its passes timed apart and the card's copy bandwidth; the output pass's launch candidates at bf16 128K
#   2. bench/train_step.py on the profile's trained student: union rest pass, selection loss, 4K and 32K
#   3. if time is left: bench/model.py on the release shape, decode eager vs CUDA graphs
#   4. if time is left: the InfLLM-V2 selection tests cut by the time limit on 2026-11-29 (streamed to $OUT)
#   5. if time is left: bench/infllmv2.py forward at 128K and 256K, forward+backward at 128K, against cuDNN
#   6. if time is left: bench/infllmv2.py --profile (each kernel's time in the forward and stage 2's backward)
cd "$(dirname "$0")/.." || exit 2
TOTAL=${1:-540}
START=$(date +%s)
BACK=${OUT:-/tmp/kernel_session_out}  # what the call brings back: session.log, kernel_session.tgz
export OUT=/tmp/kernel_session        # where the steps and the bench scripts write
mkdir -p "$OUT" "$BACK"
source bench/gpu_site.sh  # carried wheels (fla-core, einops) -> /tmp/site; src/ on PYTHONPATH
export PYTHONPATH=$PWD/bench:$PYTHONPATH SALA_TEST_STREAM=$OUT/gpu_tests_stream.log
export SALA_CACHE=${SALA_CACHE:-/root/sala_cache} HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false  # as convert_gpu.sh
STUDENT=${STUDENT:-/root/sala_runs/gpu/student/final}

left() { echo $((TOTAL - ($(date +%s) - START))); }
step() {  # step NAME LIMIT COMMAND...: run under `timeout LIMIT` if that much time is left
  local name=$1 limit=$2
  shift 2
  if ! [[ $name =~ ^(${ONLY:-.*})$ ]]; then
    echo "== $name: not asked for (ONLY=$ONLY)" | tee -a "$OUT/session.log"
    return 3
  fi
  if [ "$(left)" -lt "$limit" ]; then
    echo "== $name: skipped ($(left) s left, needs $limit)" | tee -a "$OUT/session.log"
    return 1
  fi
  echo "== $name (limit $limit s)" | tee -a "$OUT/session.log"
  local t0=$(date +%s)
  timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "== $name: rc $rc in $(($(date +%s) - t0)) s" | tee -a "$OUT/session.log"
  tail -25 "$OUT/$name.log"
  tar -czf "$BACK/kernel_session.tgz" -C "$OUT" . && cp "$OUT/session.log" "$BACK/"
  return $rc
}

nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader | tee -a "$OUT/session.log"
LIMIT=${LIGHTNING_LIMIT:-200}
# the default forward against fla, its passes timed apart, and this card's copy rate; beside it the same passes
# on block pointers instead of the TMA tiles, the former segment lengths, pass 1 launch candidates
# (LIGHTNING_VARIANTS / _CASES: regexes)
step lightning "$LIMIT" python bench/lightning.py --no-sweep --variants "${LIGHTNING_VARIANTS:-blockptr|seg|delta}" \
  --budget-s $((LIMIT - 70)) \
  --cases "${LIGHTNING_CASES:-^(fwd_bf16_131072|fwd_bf16_1048576|fwdbwd_bf16_131072|varlen_bf16_.*|fwd_fp32_131072)\$}"
if [ -d "$STUDENT" ]; then
  # TRAIN_PROFILE=1: a torch.profiler pass per variant too (kernel families of the step)
  step train_step 200 python bench/train_step.py --cases lm4k long32k --student "$STUDENT" \
    $([ "${TRAIN_PROFILE:-0}" = 1 ] || echo --no-profile) --steps 4 --union 16 --selection 1.0
else
  echo "== train_step: skipped (no trained student at $STUDENT)" | tee -a "$OUT/session.log"
fi
step model_decode_graphs 200 python bench/model.py --lengths 8K 64K --decode 16 --decode-graphs --check --out "$OUT"
step infllmv2_selection_tests 150 env TEST_TIMEOUT=60 bash bench/gpu_tests.sh \
  -k "stage1_scores or across_tiles or exact_ties or accepts_only_rare"
# the forward at 128K / 256K and forward+backward at 128K against cuDNN, with the variants of the defaults (the
# forced window block by block, other key-range counts; dq from its own passes, dk/dv in block order)
step infllmv2 "${INFLLMV2_LIMIT:-260}" python bench/infllmv2.py --no-tune --budget-s $((${INFLLMV2_LIMIT:-260} - 50)) \
  --dense-backends cudnn --cases "${INFLLMV2_CASES:-fwd_T(131072|262144)\$|fwdbwd_T131072\$}" --out "$OUT"
step infllmv2_profile 150 python bench/infllmv2.py --profile --out "$OUT"
echo "== done in $(($(date +%s) - START)) s" | tee -a "$OUT/session.log"
cp "$OUT/session.log" "$BACK/"
