"""Padding-free GRPO updates (rl/packing.py): packed rows give the unpacked update."""

from __future__ import annotations

import dataclasses

import chex
import jax
import numpy as np
import pytest
from flax import nnx

from atlas_jax.config import MeshConfig, TrainerConfig
from atlas_jax.data.batch import Batch
from atlas_jax.models import init_model
from atlas_jax.parallel import make_mesh, shard_rows
from atlas_jax.rl import packing, policy
from atlas_jax.train.optim import make_optimizer
from atlas_jax.train.step import make_train_step
from tests.tiny import TINY

# lr 1e-4 as in test_policy: a wrong update moves parameters by ~1e-4, 10x the tolerance;
# epsilon 0.01 so the old policy (x 1.05) puts tokens outside the clip range
TRAINER = TrainerConfig(learning_rate=1e-4, warmup_ratio=0.0, lr_scheduler_type="constant", beta=0.04,
                        temperature=0.7, max_completion_length=12, weight_decay=0.0, epsilon=0.01)


def _rollout_rows(B=32, Tp=16, Tc=12, seed=0):
    """Rows as rollout.training_batch makes them: left-padded prompts, completions of varied
    length (one at the whole budget, one of a single token), some truncated (no loss)."""
    rng = np.random.default_rng(seed)
    prompt_len = rng.integers(2, 9, B)  # prompts bucketed wider than they are, as rollouts do
    lengths = rng.integers(1, Tc + 1, B)
    lengths[0], lengths[1] = Tc, 1
    present = np.zeros((B, Tp + Tc), bool)
    present[:, :Tp] = np.arange(Tp)[None] >= (Tp - prompt_len)[:, None]
    present[:, Tp:] = np.arange(Tc)[None] < lengths[:, None]
    loss = np.zeros_like(present)
    loss[:, Tp:] = present[:, Tp:]
    loss[2] = False  # a truncated completion under mask_truncated_completions
    tokens = np.where(present, rng.integers(1, TINY.vocab_size, present.shape), 0).astype(np.int32)
    batch = Batch(tokens=tokens, positions=np.maximum(np.cumsum(present, 1) - 1, 0).astype(np.int32),
                  segment_ids=present.astype(np.int32), loss_mask=loss.astype(np.float32))
    return batch, rng.normal(size=B).astype(np.float32)


def test_packing_keeps_every_sequence_once_and_buckets_the_rows():
    batch, adv = _rollout_rows(B=16)
    packed, extras = packing.pack_rollout(batch, adv, row_multiple=2)
    R, W = packed.tokens.shape
    assert W == 2 * batch.tokens.shape[1] and R <= 8 and R % 2 == 0  # packed_layout: (B / 2, 2T)
    assert R == packing.bucketed_rows(len(packing.pack_groups(batch.segment_ids.sum(1), W)), 8, 2)
    assert extras["sequences"].sum() == 16
    seen = []
    for r in range(R):
        for s in range(1, int(packed.segment_ids[r].max()) + 1):
            at = packed.segment_ids[r] == s
            np.testing.assert_array_equal(packed.positions[r][at], np.arange(at.sum()))
            assert len(set(extras["advantages"][r][at])) == 1
            seen.append((tuple(packed.tokens[r][at]), tuple(packed.loss_mask[r][at]), extras["advantages"][r][at][0],
                         extras["sequence_tokens"][r][at][0]))
    expected = [(tuple(batch.tokens[b][batch.segment_ids[b] > 0]), tuple(batch.loss_mask[b][batch.segment_ids[b] > 0]),
                 adv[b], max(batch.loss_mask[b].sum(), 1.0)) for b in range(16)]
    assert sorted(seen) == sorted(expected)
    assert packed.loss_mask[packed.segment_ids == 0].sum() == 0


def test_row_counts_are_a_few_buckets():
    counts = {packing.bucketed_rows(n, 64, 4) for n in range(1, 65)}
    assert counts == {4, 8, 12, 16, 20, 24, 28, 32, 40, 48, 56, 64}
    assert packing.bucketed_rows(33, 200, 1) == 40 and packing.bucketed_rows(99, 64, 4) == 64
    with pytest.raises(ValueError, match="groups of 3"):
        packing.pack_rollout(*_rollout_rows(B=16), row_multiple=3)


def test_rows_twice_as_wide_where_that_saves_tokens_and_splits_evenly():
    assert packing.packed_layout(16, 28, 4) == (8, 56)
    assert packing.packed_layout(16, 28, 16) == (16, 28)  # 8 rows over 16 shards
    # sequences of 18 of 28 tokens: one a row at width T, three a row at 2T
    present = np.arange(28)[None] < np.full((12, 1), 18)
    rows = Batch(tokens=present.astype(np.int32), positions=np.maximum(np.cumsum(present, 1) - 1, 0),
                 segment_ids=present.astype(np.int32), loss_mask=present.astype(np.float32))
    adv = np.zeros(12, np.float32)
    assert packing.pack_rollout(rows, adv, row_multiple=2)[0].tokens.shape == (4, 56)
    # where packing saves nothing (6 rows over 12 shards; every sequence the whole width) the rows stay
    assert set(packing.pack_rollout(rows, adv, row_multiple=12)[1]) == {"advantages"}
    ones = np.ones((8, 28), np.int32)
    full = Batch(tokens=ones, positions=np.cumsum(ones, 1) - 1, segment_ids=ones, loss_mask=ones.astype(np.float32))
    adv = adv[:8]
    kept, extras = packing.pack_rollout(full, adv, row_multiple=4)
    assert kept is full and extras["advantages"] is adv


def _one_step(devices, packed: bool, trainer: TrainerConfig, accum: int = 1):
    mesh = make_mesh(MeshConfig(name="t", fsdp=-1), devices)
    graphdef, params = nnx.split(init_model(TINY, mesh=mesh, seed=0), nnx.Param)
    optimizer = make_optimizer(trainer, 10)
    state, shardings = policy.create_rl_state(params, optimizer, mesh, seed=0, with_ref=True)
    # a reference and an old policy unlike the current one: the KL and the ratio are exercised
    state = state.replace(ref_params=jax.tree.map(lambda x: x * 0.9, state.ref_params))
    old_params = jax.tree.map(lambda x: x * 1.05, state.params)
    batch_np, adv = _rollout_rows()
    extras_np = {"advantages": adv}
    if packed:
        batch_np, extras_np = packing.pack_rollout(batch_np, adv, row_multiple=accum * len(devices))
    batch = jax.tree.map(lambda x: shard_rows(x, mesh), batch_np)
    extras = {k: shard_rows(v, mesh) for k, v in extras_np.items()}
    logprobs = policy.make_logprob_fn(graphdef, mesh, shardings.params, trainer.temperature, accum)
    extras["ref_logp"] = logprobs(state.ref_params, batch)
    extras["old_logp"] = logprobs(old_params, batch)
    step = make_train_step(policy.make_grpo_loss(graphdef, trainer), optimizer, accum_steps=accum, mesh=mesh,
                           state_shardings=shardings, totals_fn=policy.grpo_totals)
    state, metrics = step(state, batch, extras)
    return jax.device_get(state.params), jax.device_get(metrics), batch_np.tokens.size


# "grpo" is the per-completion mean packed rows must take apart; "dapo" a token sum (dr_grpo
# and bnpo differ from it only by a constant divisor)
@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_packed_update_equals_unpacked(loss_type):
    trainer = dataclasses.replace(TRAINER, loss_type=loss_type)
    params, metrics, tokens = _one_step(jax.devices()[:1], False, trainer)
    assert metrics["kl"] > 0 and metrics["clip_ratio/region"] > 0 and tokens == 32 * 28
    cases = [(jax.devices()[:1], 1)]
    if loss_type == "grpo":  # 8 data shards; 2 shards x 2 micro-batches
        cases += [(jax.devices()[:8], 1), (jax.devices()[:2], 2)]
    for devices, accum in cases:
        packed_params, packed, packed_tokens = _one_step(devices, True, trainer, accum)
        assert packed_tokens < tokens
        chex.assert_trees_all_close(packed_params, params, atol=1e-5, rtol=1e-5)
        for key in ("loss", "grad_norm", "kl", "entropy", "clip_ratio/region", "num_sequences", "num_tokens"):
            np.testing.assert_allclose(packed[key], metrics[key], atol=1e-5, rtol=1e-5, err_msg=key)
