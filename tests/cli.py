"""The environment of the suite's command-line children (`python main.py`, the launchers,
the benches): CPU, offline, the simulated devices they ask for, and the session's XLA
compile flags and compilation cache (tests/conftest.py)."""

from __future__ import annotations

import os

# XLA:CPU's fusion emitters off, for the suite only (users' runs keep XLA's default). The
# suite is compile-bound: its programs compile about 35% faster this way (the tiny model's
# SFT step and AdamW: 2.05 -> 1.26 s) and run 6-10% slower (175 -> 186 ms a step).
COMPILE_FLAGS = "--xla_cpu_use_fusion_emitters=false"


def xla_flags(devices: int) -> str:
    return f"--xla_force_host_platform_device_count={devices} {COMPILE_FLAGS}"


def env(devices: int = 1, *, compilation_cache: bool = True) -> dict:
    """The session's environment for a child on `devices` simulated CPU devices. The session's
    own XLA_/JAX_ settings go, except its compilation cache, which the child shares unless
    `compilation_cache` is False (JAX_PERSISTENT_CACHE_* stay either way)."""
    keep = ("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE") if compilation_cache else ("JAX_PERSISTENT_CACHE",)
    child = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_")) or k.startswith(keep)}
    child.update(XLA_FLAGS=xla_flags(devices), JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1",
                 TOKENIZERS_PARALLELISM="false")
    return child
