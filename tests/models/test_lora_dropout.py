"""LoRA dropout: on the adapters' input in training updates only, seeded by (rng, step, row)."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from atlas_jax import parallel
from atlas_jax.config import ConfigError, LoraConfig, TrainConfig, TrainerConfig, accumulation_steps, validate
from atlas_jax.models import load_model, lora
from atlas_jax.rl import policy
from atlas_jax.train import optim, sft, state as state_lib, step as step_lib
from tests.tiny import tiny_config
from tests.train import helpers

TARGETS = ("q_proj", "v_proj", "o_proj", "down_proj")
LORA = tiny_config(lora=LoraConfig(rank=4, alpha=8.0, target_modules=TARGETS))
DROPOUT = tiny_config(lora=LoraConfig(rank=4, alpha=8.0, dropout=0.5, target_modules=TARGETS))
TRAINER = TrainerConfig(learning_rate=3e-2, lr_scheduler_type="constant", max_grad_norm=1.0, max_steps=8)


def _trainer(cfg, mesh, *, micro_batch=1, row_keys=True):
    """(train_step, new_state(seed), graphdef, frozen) for LoRA SFT of the tiny model on `mesh`."""
    graphdef, params, frozen = lora.split_trainable(load_model(cfg, mesh=mesh))
    tx = optim.make_optimizer(TRAINER, 8)
    init = jax.device_get(params)

    def new_state(seed=0):
        fresh = jax.device_put(init, jax.tree.map(lambda x: x.sharding, params))
        return state_lib.create_train_state(fresh, tx, mesh, seed=seed)[0]

    shardings = state_lib.create_train_state(params, tx, mesh, seed=0)[1]
    accum = accumulation_steps(8, micro_batch, parallel.data_parallel_size(mesh))
    train_step = step_lib.make_train_step(sft.make_sft_loss(graphdef), tx, accum_steps=accum, mesh=mesh,
                                          state_shardings=shardings, frozen=frozen, combine=lora.combine,
                                          row_keys=row_keys)
    return train_step, new_state, graphdef, frozen


def _run(train_step, state, mesh, steps):
    batch = helpers.to_mesh(helpers.synthetic_batch(0), mesh)
    losses = []
    for _ in range(steps):
        state, metrics = train_step(state, batch)
        losses.append(float(metrics["loss"]))
    return losses, state


def _moved(cfg):
    """The tiny model with nonzero adapters (fresh ones add exactly zero, dropped or not)."""
    graphdef, adapters, frozen = lora.split(load_model(cfg))
    moved = jax.tree.map(lambda a: a + 0.05, adapters)
    return graphdef, lora.combine(moved, frozen)


def _keys(batch_size, seed=0):
    return jax.random.split(jax.random.key(seed), batch_size)


def test_dropout_zero_is_bit_identical_to_no_dropout():
    mesh = helpers.mesh_of(8)
    plain_step, plain_state = _trainer(LORA, mesh, row_keys=False)[:2]
    plain_losses, plain = _run(plain_step, plain_state(), mesh, 2)
    zero = dataclasses.replace(LORA, lora=dataclasses.replace(LORA.lora, dropout=0.0))
    zero_step, zero_state = _trainer(zero, mesh, row_keys=True)[:2]
    zero_losses, zeroed = _run(zero_step, zero_state(), mesh, 2)
    assert zero_losses == plain_losses
    for a, b in zip(jax.tree.leaves(jax.device_get(plain.params)), jax.tree.leaves(jax.device_get(zeroed.params)),
                    strict=True):
        np.testing.assert_array_equal(a, b)


def test_dropout_changes_the_training_loss_only():
    batch = helpers.synthetic_batch(1)
    totals = step_lib.loss_mask_totals(batch, None)
    graphdef, params = _moved(DROPOUT)
    plain_graphdef, _ = _moved(LORA)
    keys = _keys(batch.tokens.shape[0])
    loss_fn = jax.jit(sft.make_sft_loss(graphdef))
    dropped, _ = loss_fn(params, batch, None, totals, keys_B=keys)
    undropped, _ = loss_fn(params, batch, None, totals)
    plain, _ = jax.jit(sft.make_sft_loss(plain_graphdef))(params, batch, None, totals, keys_B=keys)
    assert float(dropped) != float(undropped)
    assert float(undropped) == float(plain)  # no keys: the dropout-0 forward exactly
    # outside the update (logits, GRPO's old/ref log-probs) there are no keys, so no dropout
    logits = lambda gd: nnx.merge(gd, params)(batch.tokens, positions_BT=batch.positions,  # noqa: E731
                                              segment_ids_BT=batch.segment_ids)
    np.testing.assert_array_equal(logits(graphdef), logits(plain_graphdef))
    mesh = helpers.mesh_of(1)
    shardings = jax.tree.map(lambda x: x.sharding, params)
    logp = lambda gd: policy.make_logprob_fn(gd, mesh, shardings, 1.0)(params, batch)  # noqa: E731
    np.testing.assert_array_equal(logp(graphdef), logp(plain_graphdef))
    # the GRPO update's own pass does drop
    grpo_loss = jax.jit(policy.make_grpo_loss(graphdef, TRAINER))
    extras = {"advantages": np.linspace(-1.0, 1.0, batch.tokens.shape[0], dtype=np.float32)}
    grpo_totals = policy.grpo_totals(batch, extras)
    assert float(grpo_loss(params, batch, extras, grpo_totals, keys_B=keys)[1]["entropy"]) != float(
        grpo_loss(params, batch, extras, grpo_totals)[1]["entropy"])


def test_dropout_reaches_only_the_adapter_input():
    """Fresh adapters (B = 0): dropped or not, the layer is exactly the base x W."""
    batch = helpers.synthetic_batch(2)
    totals = step_lib.loss_mask_totals(batch, None)
    graphdef, adapters, frozen = lora.split(load_model(DROPOUT))
    loss_fn = jax.jit(sft.make_sft_loss(graphdef))
    params = lora.combine(adapters, frozen)
    dropped, _ = loss_fn(params, batch, None, totals, keys_B=_keys(batch.tokens.shape[0]))
    assert float(dropped) == float(loss_fn(params, batch, None, totals)[0])


def test_masks_follow_seed_step_and_row_so_runs_repeat_resume_and_ignore_micro_batching():
    mesh = helpers.mesh_of(8)
    train_step, new_state, _, _ = _trainer(DROPOUT, mesh)
    state = new_state()
    shardings = jax.tree.map(lambda x: x.sharding, state)
    first, state = _run(train_step, state, mesh, 2)
    saved = jax.device_get(state)  # what a checkpoint holds: params, opt state, step, rng
    rest, _ = _run(train_step, state, mesh, 2)
    resumed, _ = _run(train_step, jax.device_put(saved, shardings), mesh, 2)
    assert resumed == rest
    again, _ = _run(train_step, new_state(), mesh, 4)
    assert again == first + rest
    other_seed, _ = _run(train_step, new_state(seed=1), mesh, 4)
    assert other_seed[1:] != again[1:]  # step 0's fresh adapters add zero, masks or not
    # one device, four micro-batches: every row keeps its masks, so only summation order differs
    single = helpers.mesh_of(1)
    single_step, single_state = _trainer(DROPOUT, single, micro_batch=2)[:2]
    accumulated, _ = _run(single_step, single_state(), single, 4)
    np.testing.assert_allclose(accumulated, again, rtol=1e-5)


def test_lora_sft_with_dropout_lowers_the_loss_and_keeps_the_base():
    mesh = helpers.mesh_of(8)
    cfg = dataclasses.replace(DROPOUT, lora=dataclasses.replace(DROPOUT.lora, dropout=0.1))
    train_step, new_state, graphdef, frozen = _trainer(cfg, mesh)
    state = new_state()
    frozen_before = jax.device_get(frozen)
    batch = helpers.synthetic_batch(0)
    nll = lambda p: float(sft.batch_nll(nnx.merge(graphdef, lora.combine(p, frozen)), batch)[0])  # noqa: E731
    before = nll(state.params)
    losses, state = _run(train_step, state, mesh, 8)
    assert losses[-1] < losses[0] - 0.2, losses
    assert nll(state.params) < before - 0.2  # the undropped (evaluation) loss falls too
    for a, b in zip(jax.tree.leaves(frozen_before), jax.tree.leaves(jax.device_get(frozen)), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("lora_cfg, pattern", [
    (LoraConfig(rank=8, dropout=1.0), r"model.lora.dropout=1.0 must be in \[0, 1\)"),
    (LoraConfig(rank=8, dropout=-0.1), r"model.lora.dropout=-0.1 must be in \[0, 1\)"),
    (LoraConfig(rank=0, dropout=0.1), r"model.lora.dropout=0.1 .*model.lora.rank > 0"),
])
def test_dropout_config_errors_name_the_key(lora_cfg, pattern):
    cfg = TrainConfig(run="teacher_sft", model=tiny_config(lora=lora_cfg))
    with pytest.raises(ConfigError, match=pattern) as err:
        validate(cfg)
    assert "\n" not in str(err.value)


def test_dropout_in_range_with_adapters_is_valid():
    validate(TrainConfig(run="teacher_sft", model=DROPOUT))
