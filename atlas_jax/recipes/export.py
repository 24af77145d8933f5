"""Export a trained teacher: Orbax checkpoint (latest, checkpoint_step=N or =best) -> Hugging
Face directory.

The directory (config.json, safetensors, tokenizer files) loads with
`transformers.AutoModelForCausalLM.from_pretrained` and serves with vLLM.
"""

from __future__ import annotations

import pathlib

from atlas_jax.config import TrainConfig
from atlas_jax.models import load_tokenizer, save_pretrained
from atlas_jax.recipes.evaluate import restore_teacher


def run(cfg: TrainConfig, mesh) -> dict:
    teacher, step = restore_teacher(cfg, mesh)
    path = pathlib.Path(cfg.export_dir)
    save_pretrained(teacher, str(path), tokenizer=load_tokenizer(cfg.model))  # adapters merged: one weight set
    print(f"export: step {step} of {cfg.checkpoint} -> {path} (Hugging Face format)", flush=True)
    return {"export_dir": str(path), "step": step}
