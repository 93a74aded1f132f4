# Sourced on the GPU machine: installs every wheel carried in .carry/ (or stored in $STASH by an earlier
# call) into /tmp/site without dependencies or network, and puts it and src/ on PYTHONPATH.
#   source bench/gpu_site.sh && python bench/lightning.py --headline
STASH=${STASH:-/root/sala_stash}
for whl in .carry/*.whl "$STASH"/*.whl; do
  [ -e "$whl" ] || continue
  name=$(basename "$whl" | cut -d- -f1)
  [ -e "/tmp/site/.$name.done" ] && continue
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$whl" \
    && touch "/tmp/site/.$name.done"
done
export PYTHONPATH=/tmp/site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}
