"""rl/updates.py: a rollout's updates (order, advantages, old/reference log-probs) and the
queue that carries the rest of a rollout through a checkpoint."""

from __future__ import annotations

import time

import jax
import numpy as np
import pytest
from flax import nnx

from atlas_jax.config import MeshConfig, TrainerConfig
from atlas_jax.models import init_model
from atlas_jax.parallel import make_mesh
from atlas_jax.rl import packing, policy, updates
from atlas_jax.rl.grpo import group_advantages
from atlas_jax.rl.rollout import AnswerEpisode, Completions, training_batch
from atlas_jax.train.checkpoint import Checkpointer
from atlas_jax.train.optim import make_optimizer
from atlas_jax.train.state import abstract_of
from tests.tiny import TINY

MODEL = TINY
G = 4


def _episode(rows: int, seed: int = 0) -> AnswerEpisode:
    rng = np.random.default_rng(seed)
    Tp, Tc = 4, 6
    lengths = rng.integers(1, Tc + 1, rows).astype(np.int32)
    completions = Completions(prompt_ids=rng.integers(1, 64, (rows, Tp)).astype(np.int32),
                              prompt_mask=np.ones((rows, Tp), np.int32),
                              tokens=rng.integers(1, 64, (rows, Tc)).astype(np.int32),
                              logprobs=rng.normal(size=(rows, Tc)).astype(np.float32), lengths=lengths,
                              texts=[""] * rows, truncated=np.zeros(rows, bool))
    rewards = rng.integers(0, 2, rows).astype(np.float32)
    return AnswerEpisode(completions, rewards.astype(bool), rewards)


def _setup(mesh, trainer):
    graphdef, params = nnx.split(init_model(MODEL, mesh=mesh, seed=0), nnx.Param)
    state, shardings = policy.create_rl_state(params, make_optimizer(trainer, 10), mesh, seed=0,
                                              with_ref=trainer.beta > 0)
    state = state.replace(ref_params=jax.tree.map(lambda x: x * 0.9, state.ref_params))  # reference != policy
    return graphdef, state, policy.make_logprob_fn(graphdef, mesh, shardings.params, trainer.temperature)


def test_a_rollout_serves_aggregation_x_iterations_updates_in_order():
    mesh = make_mesh(MeshConfig(name="one", fsdp=-1), jax.devices()[:1])
    trainer = TrainerConfig(num_generations=G, generation_aggregation_steps=2, num_iterations=3, beta=0.04,
                            padding_free=False)  # one row per completion, so rows can be compared
    _, state, logprobs = _setup(mesh, trainer)
    episode = _episode(2 * 8)
    queue = updates.rollout_updates(episode, state, frozen=None, logprobs=logprobs, trainer=trainer, mesh=mesh,
                                    started=time.perf_counter())
    assert len(queue) == 6
    served = [queue.pop() for _ in range(6)]
    assert not queue
    with pytest.raises(IndexError):
        queue.pop()
    # chunk 0 three times in a row, then chunk 1: the same arrays, not copies
    assert [s[0] is served[0][0] for s in served] == [True] * 3 + [False] * 3
    assert all(s[0] is served[3][0] for s in served[3:])
    advantages, _ = group_advantages(episode.rewards, G, trainer.scale_rewards)
    np.testing.assert_array_equal(np.concatenate([np.asarray(served[0][1]["advantages"]),
                                                  np.asarray(served[3][1]["advantages"])]), np.asarray(advantages))
    batch, extras, stats = served[0]
    assert batch.tokens.shape == (8, 10) and stats["reward"] == pytest.approx(float(episode.rewards.mean()))
    # old = the sampling policy, ref = the reference (which differs here): both computed now
    np.testing.assert_array_equal(np.asarray(extras["old_logp"]), np.asarray(logprobs(state.params, batch)))
    np.testing.assert_array_equal(np.asarray(extras["ref_logp"]), np.asarray(logprobs(state.ref_params, batch)))
    assert not np.array_equal(np.asarray(extras["old_logp"]), np.asarray(extras["ref_logp"]))


@pytest.mark.parametrize("padding_free", [False, True])
def test_one_iteration_without_kl_carries_only_advantages(padding_free):
    mesh = make_mesh(MeshConfig(name="one", fsdp=-1), jax.devices()[:1])
    trainer = TrainerConfig(num_generations=G, beta=0.0, padding_free=padding_free)
    _, state, logprobs = _setup(mesh, trainer)
    rows = 32 if padding_free else 8  # 32 completions pack into 14 rows of twice the width
    queue = updates.rollout_updates(_episode(rows), state, frozen=None, logprobs=logprobs, trainer=trainer, mesh=mesh,
                                    started=time.perf_counter(), accum_steps=2)
    batch, extras, _ = queue.pop()
    assert len(queue) == 0
    assert set(extras) == ({"advantages", "sequence_tokens", "sequences"} if padding_free else {"advantages"})
    if padding_free:  # packed as rl/packing.py packs, a whole number of rows per micro-batch
        packed = packing.pack_rollout(training_batch(_episode(rows).policy, mask_truncated=False)[0],
                                      np.zeros(rows), row_multiple=2)[0]
        assert packed.tokens.shape == (14, 20)
        np.testing.assert_array_equal(np.asarray(batch.tokens), packed.tokens)
        assert float(np.sum(extras["sequences"])) == rows
    assert queue.checkpoint_items() == (None, None)  # a rollout boundary carries nothing
    assert not updates.UpdateQueue.restored({}) and not updates.UpdateQueue.restored({"extra": None, "rows": None})


def test_the_queue_survives_a_checkpoint_onto_another_mesh(tmp_path):
    """Saved on 8 devices after one of four updates, restored on 2: the three left come back
    in order, equal, sharded over the restoring mesh's data axes."""
    mesh8 = make_mesh(MeshConfig(name="eight", fsdp=-1), jax.devices()[:8])
    trainer = TrainerConfig(num_generations=G, generation_aggregation_steps=2, num_iterations=2, beta=0.04)
    _, state, logprobs = _setup(mesh8, trainer)
    queue = updates.rollout_updates(_episode(16), state, frozen=None, logprobs=logprobs, trainer=trainer,
                                    mesh=mesh8, started=time.perf_counter())
    queue.pop()
    extra, rows = queue.checkpoint_items()
    saver = Checkpointer(str(tmp_path), save_steps=1, max_to_keep=None)
    saver.save(1, state, extra=extra, rows=rows)
    saver.close()

    mesh2 = make_mesh(MeshConfig(name="two", fsdp=-1), jax.devices()[:2])
    _, target, _ = _setup(mesh2, trainer)
    reader = Checkpointer(str(tmp_path), save_steps=1, max_to_keep=None, read_only=True)
    restored = reader.restore(abstract_of(target), extra=True, rows_mesh=mesh2)
    reader.close()
    again = updates.UpdateQueue.restored(restored)
    assert len(again) == len(queue) == 3 and again.stats == queue.stats
    for _ in range(3):
        (b1, x1, _), (b2, x2, _) = queue.pop(), again.pop()
        for a, b in zip(jax.tree.leaves((b1, x1)), jax.tree.leaves((b2, x2)), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
            assert b.sharding.mesh == mesh2 and b.sharding.spec[0] == ("data", "fsdp")
