"""atlas_jax entry point: compose the Hydra config, validate, build the mesh, run.

    python main.py +run=quickstart
    python main.py +run=teacher_rcl mesh=8gpu
    python main.py +run=teacher_rcl --cfg job        # print the composed config only
    python main.py +run=teacher_rcl dry_run=true     # print the plan only (compiled where the mesh is present)
"""

from __future__ import annotations

import importlib
import logging
import os
import sys

import hydra
from omegaconf import DictConfig

from atlas_jax import config as config_lib, hostmem
from atlas_jax.errors import one_line

log = logging.getLogger("atlas_jax")


@hydra.main(config_path="configs", config_name="train", version_base="1.3")
def _main(raw: DictConfig) -> None:
    # Hydra sets the root logger to INFO; JAX backend probing and Orbax progress are noise there.
    for noisy in ("jax", "orbax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Orbax logs through absl at WARNING for routine facts (a read-only manager, a metadata
    # file it falls back from); real failures reach the user as exceptions.
    logging.getLogger("absl").setLevel(logging.ERROR)
    try:
        from hydra.core.hydra_config import HydraConfig

        _run(config_lib.to_config(raw, HydraConfig.get().overrides.task))
    except Exception as error:  # noqa: BLE001
        message = one_line(error)
        if message is None:
            raise
        # Exiting here, not in main(): Hydra would log the failed job over several lines.
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2) from None


def _run(cfg: config_lib.TrainConfig) -> None:
    if cfg.huge_pages:  # before jax: re-executes this process once with glibc's tunable set
        hostmem.use_huge_pages(__file__)
    # jax is imported only now: `--cfg job` and config errors stay instant.
    from atlas_jax import memory, parallel, plan, recipes

    _use_compilation_cache(cfg)
    parallel.initialize_distributed(cfg.distributed)
    mesh = parallel.make_mesh(cfg.mesh)
    run_plan = plan.make_plan(cfg, mesh)  # also checks the batch arithmetic against the mesh
    compiled = cfg.run in memory.COMPILED_RUNS and (memory.mesh_is_present(cfg, mesh) or not cfg.dry_run)
    if not compiled:  # the formula alone; training recipes print it beside their compiled step
        print(run_plan.render(), flush=True)
    if cfg.dry_run:
        if compiled:  # the recipe's own programs, compiled on shapes: nothing is loaded
            recipe = importlib.import_module(recipes.RECIPES[cfg.run])
            _, _, programs = recipe.prepare(cfg, mesh, total_steps=max(cfg.trainer.max_steps, 1))
            memory.report(cfg, mesh, programs, dry_run=True)
        return
    try:
        recipes.run(cfg, mesh)
    except Exception as error:  # noqa: BLE001 - only XLA's out-of-memory is translated
        if "RESOURCE_EXHAUSTED" not in str(error) and "Out of memory" not in str(error):
            raise
        first = next((l.strip() for l in str(error).splitlines() if "memory" in l.lower()), str(error)[:200])
        raise config_lib.UsageError(f"out of device memory ({first}); {memory.memory_advice(cfg, mesh)}") from None


def _use_compilation_cache(cfg: config_lib.TrainConfig) -> None:
    """cfg.compilation_cache_dir as JAX's persistent cache, unless the environment names one."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR") or not cfg.compilation_cache_dir:
        return
    import jax

    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(cfg.compilation_cache_dir))


def main() -> int:
    # Hydra re-raises instead of printing its multi-line report; we print one line.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        _main()
    except SystemExit as exit_:
        return int(exit_.code or 0)
    except Exception as error:  # noqa: BLE001 - config/usage errors become one line
        message = one_line(error)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
