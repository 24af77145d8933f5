"""The environment of the suite's command-line children (`python main.py`, the launchers,
the benches): CPU, offline, the simulated devices they ask for, and the session's XLA
compile flags and compilation cache (tests/conftest.py)."""

from __future__ import annotations

import os

# For the suite only (users' runs keep XLA's defaults): XLA:CPU's fusion emitters off and its
# LLVM backend at optimisation level 0. The suite is compile-bound, its programs tiny: the
# emitters flag compiles about 35% faster (the tiny model's SFT step and AdamW: 2.05 -> 1.26 s)
# and runs 6-10% slower (175 -> 186 ms a step); level 0 on top took tests/models/test_decoder.py
# from 80 to 29 s and tests/recipes/test_teacher_rcl.py + tests/rl/test_policy.py from 127 to
# 75 s (`-n 0`, Intel Xeon, 2026-12-03), every tolerance still met. A run of hundreds of steps
# is the exception: the quickstart student's 300 took 170 s with XLA's defaults and 480 s at
# level 0, so such a run goes to a child with `env(long_run=True)`.
COMPILE_FLAGS = "--xla_cpu_use_fusion_emitters=false --xla_backend_optimization_level=0"


def xla_flags(devices: int, *, long_run: bool = False) -> str:
    return f"--xla_force_host_platform_device_count={devices}" + ("" if long_run else f" {COMPILE_FLAGS}")


def env(devices: int = 1, *, compilation_cache: bool = True, long_run: bool = False) -> dict:
    """The session's environment for a child on `devices` simulated CPU devices. The session's
    own XLA_/JAX_ settings go, except its compilation cache, which the child shares unless
    `compilation_cache` is False (JAX_PERSISTENT_CACHE_* stay either way). A `long_run` child
    (hundreds of steps) compiles with XLA's defaults, whose programs run faster."""
    keep = ("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE") if compilation_cache else ("JAX_PERSISTENT_CACHE",)
    child = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_")) or k.startswith(keep)}
    child.update(XLA_FLAGS=xla_flags(devices, long_run=long_run), JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1",
                 TOKENIZERS_PARALLELISM="false")
    return child
