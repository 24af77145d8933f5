"""Test session set-up: CPU only, 8 simulated devices so sharding is exercised."""

import os

from tests.cli import COMPILE_FLAGS

# Must happen before jax is imported anywhere in the session.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    _flags += " --xla_force_host_platform_device_count=8"
if "xla_cpu_use_fusion_emitters" not in _flags:
    _flags += f" {COMPILE_FLAGS}"  # the suite compiles faster (tests/cli.py)
os.environ["XLA_FLAGS"] = _flags.strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# One compilation cache per test session (never reused across sessions, so never stale):
# tests, the xdist workers and the CLI subprocesses they start share compiled programs of
# equal shape. Every program is kept: a tiny model's programs compile in 0.1-0.3 s each, and
# a recipe run compiles about fifty of them.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    _cache = tempfile.mkdtemp(prefix="atlas_jax_xla_cache_")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


def pytest_xdist_auto_num_workers(config):
    """`-n auto` (pyproject.toml): one worker per core, at most 8. Each worker holds 8
    simulated devices and starts CLI subprocesses of its own, so more would only contend."""
    del config
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, 8))


# The modules that take longest (1.5-3 minutes each on 2 cores, most of it one module-scoped
# run), started first: `--dist loadfile` hands each worker whole modules in this order
# (pyproject.toml turns off xdist's reordering by test count, which put these last, where one
# of them ran alone while the other worker sat idle). The rest keep their collection order.
SLOWEST_FIRST = ("tests/test_multihost.py", "tests/test_readme.py", "tests/data/test_teaching_world.py",
                 "tests/test_docs_configuration.py", "tests/recipes/test_resume.py", "tests/models/test_lora.py",
                 "tests/models/test_lora_dropout.py")


def pytest_collection_modifyitems(session, config, items):
    del session, config
    rank = {path: i for i, path in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))  # stable: the rest in order
