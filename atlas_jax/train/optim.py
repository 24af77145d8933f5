"""The optimizer from config: AdamW with masked decay, global-norm clipping, lr schedules."""

from __future__ import annotations

import math

import jax
import optax

from atlas_jax.config import ConfigError, TrainerConfig


def warmup_steps(cfg: TrainerConfig, total_steps: int) -> int:
    """`warmup_steps` wins when > 0; otherwise ceil(warmup_ratio * total_steps) (as HF)."""
    if cfg.warmup_steps > 0:
        return min(cfg.warmup_steps, total_steps)
    return int(math.ceil(cfg.warmup_ratio * total_steps - 1e-9))  # 0.1 * 110 is 11.000000000000002


def make_schedule(cfg: TrainerConfig, total_steps: int) -> optax.Schedule:
    """lr(step) for step = 0, 1, ...: linear warmup from 0, then constant / cosine / linear to 0."""
    if total_steps <= 0:
        raise ConfigError(f"total_steps={total_steps} must be > 0 to build a schedule")
    peak, warm = cfg.learning_rate, warmup_steps(cfg, total_steps)
    decay = max(total_steps - warm, 1)
    after = {
        "constant": optax.constant_schedule(peak),
        "cosine": optax.cosine_decay_schedule(peak, decay_steps=decay, alpha=0.0),
        "linear": optax.linear_schedule(peak, 0.0, transition_steps=decay),
    }
    if cfg.lr_scheduler_type not in after:
        raise ConfigError(f"trainer.lr_scheduler_type={cfg.lr_scheduler_type!r} is not one of {', '.join(after)}")
    if warm == 0:
        return after[cfg.lr_scheduler_type]
    ramp = optax.linear_schedule(0.0, peak, transition_steps=warm)
    return optax.join_schedules([ramp, after[cfg.lr_scheduler_type]], boundaries=[warm])


def _decays(path, leaf) -> bool:
    # Layers are stacked on a leading axis (scan), so a norm is [L, D]: ndim alone cannot tell
    # it from a matrix. Names decide (as HF's no_decay list); ndim < 2 catches the rest.
    name = "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path).lower()
    return leaf.ndim >= 2 and "norm" not in name and "bias" not in name


def decay_mask(params):
    """Weight decay on weight matrices only: norms and biases are left alone."""
    return jax.tree_util.tree_map_with_path(_decays, params)


def make_optimizer(cfg: TrainerConfig, total_steps: int) -> optax.GradientTransformation:
    """clip_by_global_norm(max_grad_norm) -> AdamW(schedule, betas, eps, masked decay)."""
    adamw = optax.adamw(
        make_schedule(cfg, total_steps),
        b1=cfg.adam_beta1,
        b2=cfg.adam_beta2,
        eps=cfg.adam_epsilon,
        weight_decay=cfg.weight_decay,
        mask=decay_mask,
    )
    if cfg.max_grad_norm and cfg.max_grad_norm > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), adamw)
    return adamw
