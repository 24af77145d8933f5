#!/usr/bin/env bash
# Run the same command on every worker of a TPU VM pod slice, joined by jax.distributed.
# The coordinator (worker 0's internal IP) and the process count come from `gcloud describe`;
# each worker reads its own process id from the GCE metadata server. They are passed as the
# distributed.* config keys because a plain GCE TPU VM sets no TPU_WORKER_HOSTNAMES for
# parallel.initialize_distributed to detect.
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
ips=$(gcloud compute tpus tpu-vm describe "$tpu" --zone "$zone" --format='value(networkEndpoints[].ipAddress)')
IFS=';' read -r -a workers <<< "$ips"
worker_id='$(curl -s -H Metadata-Flavor:Google http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number)'
distributed=" distributed.coordinator_address=${workers[0]}:${PORT:-8476} distributed.num_processes=${#workers[@]}"
distributed+=" distributed.process_id=$worker_id"
gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all \
  --command "cd $repo && python main.py$args$distributed"
