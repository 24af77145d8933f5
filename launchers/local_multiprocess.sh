#!/usr/bin/env bash
# Try multi-host JAX on one machine: N processes on 127.0.0.1, each with its own
# simulated CPU devices, joined by jax.distributed into one global mesh.
#
#   launchers/local_multiprocess.sh 2 4 +run=teacher_sft model=tiny data=synthetic_math_sft \
#       mesh=cpu batch=quickstart trainer.max_steps=3 output_dir=results/mp
#
# args: NUM_PROCESSES DEVICES_PER_PROCESS [main.py overrides...]
# env:  PORT (coordinator port, default 12355), PYTHON (default python)
set -euo pipefail
num_processes=${1:?usage: $0 NUM_PROCESSES DEVICES_PER_PROCESS [overrides...]}
devices=${2:?usage: $0 NUM_PROCESSES DEVICES_PER_PROCESS [overrides...]}
shift 2
port=${PORT:-12355}
here=$(cd "$(dirname "$0")/.." && pwd)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' INT TERM
for ((i = 0; i < num_processes; i++)); do
  XLA_FLAGS="--xla_force_host_platform_device_count=${devices}" JAX_PLATFORMS=cpu \
    "${PYTHON:-python}" "$here/main.py" "$@" \
    distributed.coordinator_address=127.0.0.1:${port} \
    distributed.num_processes=${num_processes} distributed.process_id=${i} &
  pids+=($!)
done
# The first process to fail stops the others: they would otherwise wait in a collective
# for it until jax.distributed's timeout.
status=0
for ((n = 0; n < num_processes; n++)); do
  rc=0
  wait -n || rc=$?
  if ((rc != 0 && status == 0)); then
    status=$rc
    kill "${pids[@]}" 2>/dev/null || true
  fi
done
exit $status
