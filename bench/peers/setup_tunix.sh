#!/usr/bin/env bash
# Google's Tunix for bench/grpo_step.py's "Tunix GRPO" rows, in its own virtual environment
# (its pins conflict with ours): bench/peers/tunix-venv (ignored by git), CPU jax. Idempotent:
# a second run with the pinned versions already in place installs nothing. Run from anywhere:
#
#     bash bench/peers/setup_tunix.sh            # PYTHON=python3.12 bash ... for another interpreter
#
# The pins are the set bench/peers/tunix_grpo.py was checked with (jax 0.10 needs the Auto mesh
# axes that script sets); pip's full log lands in tunix-venv/pip.log.
set -euo pipefail
cd "$(dirname "$0")"
VENV=tunix-venv
PYTHON=${PYTHON:-python3.11}
PINS=("google-tunix==0.1.7" "jax[cpu]==0.10.2" "jaxlib==0.10.2" "flax==0.12.8" "optax==0.2.8")

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
check() {
  "$VENV/bin/python" - <<'EOF' 2>/dev/null
import importlib.metadata as m, sys
want = {"google-tunix": "0.1.7", "jax": "0.10.2", "jaxlib": "0.10.2", "flax": "0.12.8", "optax": "0.2.8"}
sys.exit(any(m.version(k) != v for k, v in want.items()))
EOF
}
if check && "$VENV/bin/python" -c "import tunix.rl.grpo.grpo_learner, tunix.models.qwen3.model" 2>/dev/null; then
  state="already set up"
else
  if ! "$VENV/bin/python" -m pip install -q --upgrade pip "${PINS[@]}" >"$VENV/pip.log" 2>&1; then
    tail -20 "$VENV/pip.log" >&2
    echo "Tunix setup failed (log: bench/peers/$VENV/pip.log)" >&2
    exit 1
  fi
  JAX_PLATFORMS=cpu "$VENV/bin/python" -c "import tunix.rl.grpo.grpo_learner, tunix.models.qwen3.model"
  state="installed"
fi
echo "Tunix $state: bench/peers/$VENV ($("$VENV/bin/python" -c 'import importlib.metadata as m; print(" ".join(f"{k} {m.version(k)}" for k in ("google-tunix", "jax", "flax")))'))"
