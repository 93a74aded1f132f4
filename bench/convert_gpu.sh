#!/usr/bin/env bash
# The GPU profile of the conversion pipeline on a machine without internet, in time-limited commands.
#
# Inputs travel in the git-ignored .carry/ folder (bench/make_carry.sh, on a machine with internet):
#   gguf.xz.part0, .part1, ...    the default teacher's GGUF (xz, split so each fits one transfer beside the tree)
#   heldout.tar.xz, train.tar.xz  the corpora caches (sala.data.corpora) of shakespeare, brown, austen
#   gguf-*.whl                    the gguf package (transformers reads GGUF files with it)
#   reuse_run.tgz (optional)      an earlier run's run.tgz: its teacher evaluation and equal-budget comparison
#                                 are reused where their settings, the card and HALO's layers are the same
#                                 (sala pipeline --reuse); a run that changes only the student saves ~5 minutes
# Each command stores what it received outside the checkout (STASH) and continues the pipeline:
#   bash bench/convert_gpu.sh <seconds> [until-phase]
# The pipeline resumes from its own checkpoints in RUN on the next command; after each command the run's
# small files (logs, results, report when made) come back in $OUT/run.tgz.
set -euo pipefail
START=$(date +%s)
LIMIT=${1:-540}
# a training phase stops at the first step ending past its deadline, then saves a checkpoint (~2 GB with the
# optimizer, 10-20 s): that much of LIMIT is kept back, and the set-up below (decompressing the GGUF and the
# corpora on a fresh machine, 20-40 s) counts too (2026-11-29e: `570` with neither ran past a 600 s call)
SAVE_MARGIN=${SAVE_MARGIN:-25}
UNTIL=${2:-}
STASH=${STASH:-/root/sala_stash}
RUN=${RUN:-/root/sala_runs/gpu}
export SALA_CACHE=${SALA_CACHE:-/root/sala_cache}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$STASH" "$SALA_CACHE/gguf" "$(dirname "$RUN")"
for f in .carry/*; do [ -f "$f" ] && [ ! -e "$STASH/$(basename "$f")" ] && cp "$f" "$STASH/"; done
source bench/gpu_site.sh  # the carried wheels (gguf) -> /tmp/site, on PYTHONPATH with src/
GGUF="$SALA_CACHE/gguf/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ ! -f "$GGUF" ] && ls "$STASH"/gguf.xz.part* >/dev/null 2>&1; then
  # the parts in name order; xz -d fails (and nothing is kept) while one is missing
  cat $(ls "$STASH"/gguf.xz.part* | sort) | xz -d > "$GGUF.tmp" && mv "$GGUF.tmp" "$GGUF" || rm -f "$GGUF.tmp"
fi
if [ ! -f "$GGUF" ]; then  # a fresh machine (the last one was released): the parts must come again
  echo "convert_gpu.sh: the teacher GGUF is not on this machine and $STASH lacks some of gguf.xz.part*;" \
       "carry all parts again (one per call), then rerun" >&2
  exit 3
fi
for t in heldout train; do
  if [ -f "$STASH/$t.tar.xz" ] && [ ! -f "$STASH/$t.done" ]; then
    tar -xJf "$STASH/$t.tar.xz" -C "$SALA_CACHE" && touch "$STASH/$t.done"
  fi
done
REUSE=()
if [ -f "$STASH/reuse_run.tgz" ]; then
  [ -f "$STASH/reuse/pipeline.json" ] || { mkdir -p "$STASH/reuse" && tar -xzf "$STASH/reuse_run.tgz" -C "$STASH/reuse"; }
  REUSE=(--reuse "$STASH/reuse")
fi
ls -la "$SALA_CACHE/gguf" "$SALA_CACHE/corpora"/* 2>/dev/null | head -20
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader || true
set +e
LEFT=$((LIMIT - ($(date +%s) - START) - SAVE_MARGIN))
echo "convert_gpu.sh: $LEFT s for the pipeline (limit $LIMIT, set-up $(($(date +%s) - START)) s, checkpoint margin $SAVE_MARGIN s)"
python3 -m sala.cli pipeline --profile "${PROFILE:-gpu}" --out "$RUN" --time-limit "$LEFT" --reserve 150 ${UNTIL:+--until $UNTIL} "${REUSE[@]}" 2>&1 \
  | grep -v -E "Loading weights|Writing model shards" | tee -a "$RUN.log"
rc=${PIPESTATUS[0]}
set -e
if [ -n "${OUT:-}" ]; then
  cp "$RUN.log" "$OUT/pipeline.log" 2>/dev/null || true
  cp "$RUN/pipeline.json" "$OUT/" 2>/dev/null || true
  # every small file of the run (no weights, no checkpoints), after every command: the report (and a lost
  # report phase) can be made from it on any machine: tar -xzf run.tgz -C DIR, then
  # sala pipeline --profile gpu --out DIR --until report
  tar -czf "$OUT/run.tgz" -C "$RUN" --exclude='*.safetensors' --exclude='checkpoints' --exclude='*.pt' . || true
fi
exit $rc
