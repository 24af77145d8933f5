"""Rollout -> the updates it serves, and the queue that holds them across a checkpoint.

One rollout of generation_aggregation_steps x (global batch) completions serves
generation_aggregation_steps x num_iterations updates: its rows are cut into
generation_aggregation_steps chunks of one global batch each, and each chunk is trained on
num_iterations times in a row (chunks c0, c1 and 2 iterations: c0, c0, c1, c1). The
reference and old-policy log-probs are computed once, at rollout time, from the policy that
sampled (old) and the reference as it was then, so later passes see rho != 1 and a mixup of
the reference mid-rollout does not move the KL anchor of updates already made.

`UpdateQueue` is what is left of the current rollout. It is saved with every checkpoint
(`checkpoint_items`: its arrays as the checkpoint's rows, its counters and the rollout's
statistics as JSON), so a run stopped at any aggregation x iteration step resumes with
exactly the updates the uninterrupted run would have made.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Optional

import jax
import numpy as np

from atlas_jax import parallel
from atlas_jax.config import TrainerConfig
from atlas_jax.data.batch import Batch
from atlas_jax.models import lora
from atlas_jax.rl import packing, rollout
from atlas_jax.rl.grpo import group_advantages

_KEY = "pending_updates"  # the queue's entry in the checkpoint's JSON


@dataclasses.dataclass
class UpdateQueue:
    """The updates the current rollout still serves, in order.

    chunks: (batch, extras) per aggregation step, row-sharded global arrays; passes: updates
    per chunk (num_iterations); stats: the rollout's metrics, logged with each of its
    updates; served: updates already popped.
    """

    chunks: list = dataclasses.field(default_factory=list)
    passes: int = 1
    stats: dict = dataclasses.field(default_factory=dict)
    served: int = 0

    def __len__(self) -> int:
        return len(self.chunks) * self.passes - self.served

    def pop(self) -> tuple[Batch, dict, dict]:
        """(batch, extras, stats) of the next update."""
        if not len(self):
            raise IndexError("the rollout's updates are all served: roll out again")
        batch, extras = self.chunks[self.served // self.passes]
        self.served += 1
        return batch, extras, self.stats

    def checkpoint_items(self) -> tuple[Optional[dict], Optional[dict]]:
        """(JSON, row arrays) for Checkpointer.save: the chunks not yet fully served; (None, None)
        when the queue is empty (a checkpoint on a rollout boundary carries nothing)."""
        if not len(self):
            return None, None
        first = self.served // self.passes
        rows = {str(i): {"batch": _fields(batch), "extras": dict(extras)}
                for i, (batch, extras) in enumerate(self.chunks[first:])}
        meta = {"chunks": len(self.chunks) - first, "passes": self.passes,
                "served": self.served - first * self.passes, "stats": self.stats}
        return {_KEY: meta}, rows

    @classmethod
    def restored(cls, carried: dict) -> "UpdateQueue":
        """The queue a checkpoint saved (`setup.Job.carried`); empty when it saved none."""
        meta = (carried.get("extra") or {}).get(_KEY)
        if not meta:
            return cls()
        rows = carried["rows"]
        chunks = [(Batch(**rows[str(i)]["batch"]), dict(rows[str(i)]["extras"])) for i in range(meta["chunks"])]
        return cls(chunks, meta["passes"], meta["stats"], meta["served"])


def _fields(batch: Batch) -> dict:
    return {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}


def reference_params(state, frozen):
    """The KL anchor: the reference copy, or with LoRA the frozen base with the adapters off."""
    return state.ref_params if frozen is None else lora.full_params(lora.disabled(state.params), frozen)


def rollout_updates(episode, state, *, frozen, logprobs: Callable, trainer: TrainerConfig, mesh,
                    started: float, accum_steps: int = 1) -> UpdateQueue:
    """The updates one scored rollout serves (see the module docstring).

    episode: a TeachingEpisode or AnswerEpisode (rows prompt-major, G per prompt); state:
    the policy that sampled it; logprobs: `rl.policy.make_logprob_fn(...)`; started: the
    rollout's time.perf_counter() start, for rollout_time_s; accum_steps: the update's
    micro-batches, which packed rows (`trainer.padding_free`) are a whole number of per shard.
    """
    advantages, group_std = group_advantages(episode.rewards, trainer.num_generations, trainer.scale_rewards)
    batch_np, _ = rollout.training_batch(episode.policy, mask_truncated=trainer.mask_truncated_completions)
    stats = {**episode.metrics(), "frac_reward_zero_std": float(np.mean(np.asarray(group_std) < 1e-6))}
    chunks = []
    row_multiple = accum_steps * parallel.data_parallel_size(mesh)
    for rows in np.array_split(np.arange(len(episode.rewards)), trainer.generation_aggregation_steps):
        chunk = jax.tree.map(lambda x: x[rows], batch_np)
        extras = {"advantages": np.asarray(advantages)[rows]}
        if trainer.padding_free:
            chunk, extras = packing.pack_rollout(chunk, extras["advantages"], row_multiple=row_multiple)
        batch = jax.tree.map(lambda x: parallel.shard_rows(x, mesh), chunk)
        extras = {k: parallel.shard_rows(v, mesh) for k, v in extras.items()}
        if trainer.beta > 0:
            extras["ref_logp"] = logprobs(reference_params(state, frozen), batch)
        if trainer.num_iterations > 1:
            extras["old_logp"] = logprobs(lora.full_params(state.params, frozen), batch)
        chunks.append((batch, extras))
    stats["rollout_time_s"] = time.perf_counter() - started
    return UpdateQueue(chunks, trainer.num_iterations, stats)

