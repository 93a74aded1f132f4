#!/usr/bin/env bash
# Fills the git-ignored .carry/ folder with what the GPU machine (no internet) needs, from this machine's
# cache (~/.cache/sala, fetched first if missing):
#   gguf.xz.part0..2   the default teacher's GGUF (xz, split in 32 MB parts: one call carries at most 64 MiB,
#                      the checkout itself ~22 MB of it)
#   heldout.tar.xz, train.tar.xz  the corpora caches of shakespeare, brown, austen
#   *.whl                         gguf (the teacher), fla-core 0.6.0 + einops (bench/lightning.py's baseline)
# Calls carry parts of it (see bench/convert_gpu.sh); bench/gpu_site.sh installs the wheels there.
#   bash bench/make_carry.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
CACHE=${SALA_CACHE:-$HOME/.cache/sala}
"$PY" - <<'PY'
from sala.convert.teacher import _fetch_gguf, cache_dir
from sala.data import corpora

_fetch_gguf(cache_dir())
for name in ("shakespeare", "brown", "austen"):
    corpora.prepare(name)
PY
mkdir -p .carry
(cd "$CACHE" && tar -cJf - corpora/*/heldout.txt corpora/*/manifest.json) > .carry/heldout.tar.xz
(cd "$CACHE" && tar -cJf - corpora/*/train.txt) > .carry/train.tar.xz
xz -T0 -9 -c "$CACHE/gguf/SmolLM2-135M-Instruct.Q4_1.gguf" > .carry/gguf.xz
split -b 32000000 -d -a 1 .carry/gguf.xz .carry/gguf.xz.part && rm .carry/gguf.xz
"$PY" -m pip download -q --no-deps gguf "fla-core==0.6.0" einops -d .carry
ls -la .carry
