"""Recipes: one readable module per run kind, each exposing `run(cfg, mesh)`."""

from __future__ import annotations

import importlib

from jax.sharding import Mesh

from atlas_jax.config import TrainConfig

# run name (the `run` key set by configs/run/NAME.yaml) -> module with run(cfg, mesh)
RECIPES = {
    "teacher_sft": "atlas_jax.recipes.sft",
    "teacher_rcl": "atlas_jax.recipes.teacher_rcl",
    "grpo": "atlas_jax.recipes.teacher_rcl",
    "evaluate": "atlas_jax.recipes.evaluate",
    "export": "atlas_jax.recipes.export",
    "quickstart": "atlas_jax.recipes.quickstart",
}


def run(cfg: TrainConfig, mesh: Mesh):
    """Runs the recipe named by cfg.run; imported lazily so one recipe's deps never slow another."""
    return importlib.import_module(RECIPES[cfg.run]).run(cfg, mesh)
