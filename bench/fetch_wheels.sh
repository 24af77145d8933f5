#!/usr/bin/env bash
# Wheels for the device machine (bench/accelerator_check.sh installs them there): its image
# has Python 3.12 on x86-64 with jax, flax, optax, orbax-checkpoint, chex, transformers,
# torch, tqdm and matplotlib, and no network. These are pyproject.toml's runtime
# dependencies that it lacks (specifiers as in pyproject.toml), plus their own needs that
# it lacks too. Run here, in the repository root or anywhere: it writes ./.whl/ (ignored by
# git; name it in the device tool's `carry`).
#
#     bash bench/fetch_wheels.sh            # PYTHON_VERSION=3.13 bash ... for another image
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.whl
PYTHON_VERSION=${PYTHON_VERSION:-3.12}
PACKAGES=(
  "hydra-core>=1.3.2,<1.4" "omegaconf>=2.3,<2.4" "grain>=0.2.18,<0.3" "datasets>=5.2,<6"
  "qwix>=0.1.8" "tensorboardX>=2.6"
  # their needs the image lacks, at the versions tested with the above
  "array-record==0.8.6" "portpicker>=1.6" "dill==0.4.1" "multiprocess==0.70.19"
)
mkdir -p "$DEST"
# binary wheels for the image's interpreter; pip matches each manylinux tag exactly
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYTHON_VERSION" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" "${PACKAGES[@]}"
# omegaconf's parser runtime is published as a source archive only: build its pure-python wheel
python3 -m pip wheel -q --no-deps -w "$DEST" "antlr4-python3-runtime==4.9.3"
ls -l "$DEST"
du -sh "$DEST"
