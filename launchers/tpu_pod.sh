#!/usr/bin/env bash
# Run the same command on every worker of a TPU VM pod slice. JAX detects the pod
# (jax.distributed.initialize without arguments) on each worker.
#
#   launchers/tpu_pod.sh my-v5p-64 us-east5-a +run=teacher_rcl mesh=tpu_v5p_64 \
#       output_dir=gs://my-bucket/rcl
#
# args: TPU_NAME ZONE [main.py overrides...]; the repo must be at the same path on
# every worker (e.g. cloned there by a previous --worker=all command).
set -euo pipefail
tpu=${1:?usage: $0 TPU_NAME ZONE [overrides...]}
zone=${2:?usage: $0 TPU_NAME ZONE [overrides...]}
shift 2
repo=${REPO_DIR:-\$HOME/atlas_jax}
args=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all \
  --command "cd $repo && python main.py$args"
