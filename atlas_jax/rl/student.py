"""The frozen student of RCL: no gradients, no optimizer state, never updated."""

from __future__ import annotations

import jax
from flax import nnx

from atlas_jax.config import TrainConfig, model_preset
from atlas_jax.models import load_model, load_tokenizer, lora


def load_student(cfg: TrainConfig, mesh, graphdef, params, tokenizer, frozen=None):
    """(student model, its tokenizer).

    `trainer.student_model` names a model preset or an HF path; when it is null the student
    is the teacher as it was before training (the reference teacher): with LoRA the frozen
    base itself with adapters off (no copy), else a copy of the initial parameters.
    """
    if cfg.trainer.student_model is None and frozen is not None:
        return nnx.merge(graphdef, lora.combine(lora.disabled(params), frozen)), tokenizer
    if cfg.trainer.student_model is None:
        return nnx.merge(graphdef, jax.tree.map(lambda x: x.copy(), params)), tokenizer
    student_cfg = model_preset(cfg.trainer.student_model, numerics=cfg.model)
    return load_model(student_cfg, mesh=mesh, seed=cfg.seed + 1), load_tokenizer(student_cfg)
