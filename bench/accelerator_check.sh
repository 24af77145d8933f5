#!/usr/bin/env bash
# The one command for a lent GPU/TPU machine, after `bash bench/fetch_wheels.sh` here:
#
#     device tool: run  command="bash bench/accelerator_check.sh"  carry=[".whl"]  timeout_s=600
#
# Installs the wheels the image lacks and this checkout, then runs the check (<= 8 min);
# the summary lands in $OUT/accelerator (results/accelerator where OUT is unset).
# python3 is the image's interpreter. There is no network there, hence --no-index, and no
# build isolation (setuptools comes from the image).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-results}/accelerator"
shopt -s nullglob
wheels=(.whl/*.whl)
if [ ${#wheels[@]} -eq 0 ]; then
  echo "no wheels in .whl/: run 'bash bench/fetch_wheels.sh' first and carry .whl" >&2
  exit 2
fi
python3 -m pip install -q --no-deps --no-index --no-cache-dir "${wheels[@]}"
# an editable install where the image's setuptools allows it; the checkout on the path if not
python3 -m pip install -q --no-deps --no-index --no-build-isolation -e . \
  || { echo "editable install failed: running from the checkout (PYTHONPATH)"; export PYTHONPATH="$PWD"; }
python3 bench/accelerator_check.py --out "$OUT_DIR"
