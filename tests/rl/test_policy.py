"""The GRPO update on the policy: sharded equals single-device, reference mixup, RL state."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from atlas_jax.config import MeshConfig, TrainerConfig
from atlas_jax.data.batch import Batch, to_global
from atlas_jax.models import init_model
from atlas_jax.parallel import batch_sharding, make_mesh
from atlas_jax.rl import policy
from atlas_jax.train.optim import make_optimizer
from atlas_jax.train.step import make_train_step
from tests.tiny import TINY

MODEL = TINY
# lr 1e-4: Adam's first step moves each parameter by ~lr * g / |g|, so a wrong update shows as
# ~1e-4 (10x the tolerance) while summation-order noise in near-zero gradients stays ~1e-6.
TRAINER = TrainerConfig(learning_rate=1e-4, warmup_ratio=0.0, lr_scheduler_type="constant", beta=0.04,
                        temperature=0.7, max_completion_length=6, weight_decay=0.0)


def _rollout_batch(B=8, Tp=4, Tc=6, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, MODEL.vocab_size, (B, Tp + Tc)).astype(np.int32)
    lengths = rng.integers(1, Tc + 1, B)
    present = np.ones((B, Tp + Tc), bool)
    present[:, Tp:] = np.arange(Tc)[None] < lengths[:, None]
    present[::2, :2] = False  # left padding on half the rows
    loss = np.zeros_like(present)
    loss[:, Tp:] = present[:, Tp:]
    batch = Batch(tokens=tokens, positions=np.maximum(np.cumsum(present, 1) - 1, 0).astype(np.int32),
                  segment_ids=present.astype(np.int32), loss_mask=loss.astype(np.float32))
    return batch, rng.normal(size=B).astype(np.float32)


def _one_step(devices, accum, trainer=TRAINER):
    mesh = make_mesh(MeshConfig(name="t", fsdp=-1), devices)
    graphdef, params = nnx.split(init_model(MODEL, mesh=mesh, seed=0), nnx.Param)
    optimizer = make_optimizer(trainer, 10)
    state, shardings = policy.create_rl_state(params, optimizer, mesh, seed=0, with_ref=trainer.beta > 0)
    # make the reference differ from the policy so the KL term is exercised
    state = state.replace(ref_params=jax.tree.map(lambda x: x * 0.9, state.ref_params))
    batch_np, adv = _rollout_batch()
    batch = to_global(batch_np, mesh)
    extras = {"advantages": jax.make_array_from_process_local_data(batch_sharding(mesh, 1), adv),
              "ref_logp": policy.make_logprob_fn(graphdef, mesh, shardings.params, trainer.temperature)(
                  state.ref_params, batch)}
    step = make_train_step(policy.make_grpo_loss(graphdef, trainer), optimizer, accum_steps=accum, mesh=mesh,
                           state_shardings=shardings, totals_fn=policy.grpo_totals)
    state, metrics = step(state, batch, extras)
    return jax.device_get(state.params), jax.device_get(metrics)


def test_grpo_step_on_8_devices_equals_one_device():
    single_params, single = _one_step(jax.devices()[:1], accum=1)
    sharded_params, sharded = _one_step(jax.devices()[:8], accum=1)
    accum_params, accum = _one_step(jax.devices()[:1], accum=4)
    assert single["kl"] > 0 and np.isfinite(single["loss"])
    for other, other_metrics in ((sharded_params, sharded), (accum_params, accum)):
        chex.assert_trees_all_close(single_params, other, atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(other_metrics["loss"], single["loss"], atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(other_metrics["kl"], single["kl"], atol=1e-6, rtol=1e-4)


def test_kl_is_zero_when_reference_equals_policy():
    mesh = make_mesh(MeshConfig(name="t", fsdp=-1), jax.devices()[:1])
    graphdef, params = nnx.split(init_model(MODEL, mesh=mesh, seed=0), nnx.Param)
    state, shardings = policy.create_rl_state(params, make_optimizer(TRAINER, 10), mesh, seed=0, with_ref=True)
    batch = to_global(_rollout_batch()[0], mesh)
    logprobs = policy.make_logprob_fn(graphdef, mesh, shardings.params, TRAINER.temperature)
    np.testing.assert_array_equal(np.asarray(logprobs(state.params, batch)),
                                  np.asarray(logprobs(state.ref_params, batch)))


def test_shifted_logprobs_match_unchunked_log_softmax():
    model = init_model(MODEL, seed=0)
    batch = jax.tree.map(jnp.asarray, _rollout_batch()[0])
    logp, entropy, mask = policy.shifted_logprobs(model, batch, 0.7, chunk=4)
    logits = model(batch.tokens, positions_BT=batch.positions, segment_ids_BT=batch.segment_ids) / 0.7
    full = jax.nn.log_softmax(logits, -1)
    expected = jnp.take_along_axis(full[:, :-1], batch.tokens[:, 1:, None], -1)[..., 0]
    np.testing.assert_allclose(logp[:, :-1], expected, atol=1e-5)
    np.testing.assert_array_equal(mask[:, :-1], batch.loss_mask[:, 1:])
    assert np.all(np.asarray(entropy) >= 0)


def test_reference_mixup_moves_reference_toward_policy():
    mesh = make_mesh(MeshConfig(name="t", fsdp=-1), jax.devices()[:1])
    _, params = nnx.split(init_model(MODEL, mesh=mesh, seed=0), nnx.Param)
    shardings = jax.tree.map(lambda x: x.sharding, params)
    ref = jax.tree.map(jnp.zeros_like, params)
    mixed = policy.make_ref_mixup(shardings)(ref, params, 0.9)
    chex.assert_trees_all_close(mixed, jax.tree.map(lambda p: 0.9 * p, params), atol=1e-7)


def test_logprobs_in_micro_batches_equal_one_pass():
    """The reference / old-policy pass runs the update's micro-batches one at a time and puts
    every row back in place, on one device and across 8."""
    for devices in (jax.devices()[:1], jax.devices()[:8]):
        mesh = make_mesh(MeshConfig(name="t", fsdp=-1), devices)
        graphdef, params = nnx.split(init_model(MODEL, mesh=mesh, seed=0), nnx.Param)
        shardings = jax.tree.map(lambda x: x.sharding, params)
        batch = to_global(_rollout_batch(B=16)[0], mesh)
        whole = policy.make_logprob_fn(graphdef, mesh, shardings, 0.7)(params, batch)
        micro = policy.make_logprob_fn(graphdef, mesh, shardings, 0.7, accum_steps=2)(params, batch)
        assert micro.shape == whole.shape == batch.tokens.shape
        np.testing.assert_allclose(np.asarray(micro), np.asarray(whole), atol=1e-6)
