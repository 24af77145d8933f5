"""Shared test fixtures for tests/train: a tiny model, synthetic SFT batches, a mesh."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from flax import nnx

from atlas_jax import parallel
from atlas_jax.config import MeshConfig, ModelConfig, TrainerConfig
from atlas_jax.train import optim, sft, state as state_lib, step as step_lib

from atlas_jax.data import Batch
from tests.tiny import TINY

TRAINER = TrainerConfig(learning_rate=1e-2, lr_scheduler_type="cosine", warmup_steps=1, weight_decay=0.1,
                        adam_beta2=0.95, max_grad_norm=1.0, max_steps=6)


def load_model(mesh, cfg: ModelConfig = TINY, seed: int = 0):
    from atlas_jax.models import load_model as load
    return load(cfg, mesh=mesh, seed=seed)


def mesh_of(n: int, **axes):
    return parallel.make_mesh(dataclasses.replace(MeshConfig(), **axes), jax.devices()[:n])


def synthetic_batch(seed: int, batch: int = 8, length: int = 16, vocab: int = 64) -> Batch:
    """Right-padded rows of different lengths; the loss covers the second half of each row."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, vocab, (batch, length)).astype(np.int32)
    lengths = rng.integers(length // 2, length + 1, batch)
    real = np.arange(length)[None] < lengths[:, None]
    loss = real & (np.arange(length)[None] >= lengths[:, None] // 2)
    return Batch(tokens=np.where(real, tokens, 0).astype(np.int32),
                 positions=np.where(real, np.arange(length)[None], 0).astype(np.int32),
                 segment_ids=real.astype(np.int32), loss_mask=loss.astype(np.float32))


def to_mesh(batch, mesh):
    return jax.device_put(batch, parallel.batch_sharding(mesh))


def setup(mesh, *, micro_batch: int, global_batch: int = 8, trainer: TrainerConfig = TRAINER,
          total_steps: int = 6):
    """(train_step, state, shardings, graphdef) for the tiny model on `mesh`."""
    model = load_model(mesh)
    graphdef, params = nnx.split(model, nnx.Param)
    tx = optim.make_optimizer(trainer, total_steps)
    state, shardings = state_lib.create_train_state(params, tx, mesh, seed=0)
    from atlas_jax.config import accumulation_steps
    accum = accumulation_steps(global_batch, micro_batch, parallel.data_parallel_size(mesh))
    train_step = step_lib.make_train_step(sft.make_sft_loss(graphdef), tx, accum_steps=accum, mesh=mesh,
                                          state_shardings=shardings,
                                          schedule=optim.make_schedule(trainer, total_steps))
    return train_step, state, shardings, graphdef
