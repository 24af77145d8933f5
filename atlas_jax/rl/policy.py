"""GRPO on the policy model: the loss in the train step's convention, log-prob passes for
the reference and old policies, and the reference model's mixup.

Tokens are scored by the pass SFT's loss uses too (`train.logprobs.next_token_scores`):
position t predicts token t + 1 and carries loss_mask[t + 1], so prompt and padding
positions carry no loss.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from atlas_jax import parallel
from atlas_jax.config import TrainerConfig
from atlas_jax.rl.grpo import grpo_loss, token_logprobs
from atlas_jax.train.logprobs import CHUNK_T, next_token_scores, next_token_targets
from atlas_jax.train.state import TrainState, create_train_state
from atlas_jax.train.step import split_micro_batches


def shifted_logprobs(model, batch, temperature: float, chunk: int = CHUNK_T, dropout_keys_B=None):
    """(logp_BT, entropy_BT, mask_BT) of next tokens at the sampling temperature, chunked;
    per-row keys turn on LoRA dropout (the update only, never the old/ref passes)."""
    score = functools.partial(token_logprobs, temperature=temperature)
    (logp_BT, entropy_BT), mask_BT = next_token_scores(model, batch, score, chunk=chunk,
                                                        dropout_keys_B=dropout_keys_B)
    return logp_BT, entropy_BT, mask_BT


def grpo_totals(batch, extras) -> dict:
    """Global-batch normalisers: completions and loss tokens of the whole optimizer batch
    (packed rows, `rl.packing`, say how many completions each holds)."""
    _, mask_BT = next_token_targets(batch)
    sequences = jnp.sum(extras["sequences"]) if "sequences" in extras else jnp.float32(batch.tokens.shape[0])
    return {"num_sequences": sequences, "num_tokens": jnp.sum(mask_BT)}


def make_grpo_loss(graphdef: nnx.GraphDef, trainer: TrainerConfig) -> Callable:
    """loss_fn(params, micro_batch, extras, totals) for `train.step.make_train_step`.

    extras: {"advantages": [B]} plus, when present, "old_logp" [B, T] (num_iterations > 1)
    and "ref_logp" [B, T] (beta > 0), both aligned to next-token positions; packed rows
    (`rl.packing`) carry advantages [B, T], "sequence_tokens" [B, T] and "sequences" [B]. `keys_B`
    (make_train_step's row_keys=True) turns on LoRA dropout in this pass alone; the old and
    reference log-probs come from the deterministic forward.
    """
    def loss_fn(params, batch, extras, totals, keys_B=None):
        logp_BT, entropy_BT, mask_BT = shifted_logprobs(nnx.merge(graphdef, params), batch, trainer.temperature,
                                                        dropout_keys_B=keys_B)
        # One update per rollout: the old policy IS the current one, so rho = 1 with the gradient
        # of logp (REINFORCE with the group advantage).
        old_BT = extras.get("old_logp", jax.lax.stop_gradient(logp_BT))
        return grpo_loss(
            logp_BT, old_BT, extras.get("ref_logp"), extras["advantages"], mask_BT,
            beta=trainer.beta if "ref_logp" in extras else 0.0, epsilon=trainer.epsilon,
            epsilon_high=trainer.epsilon_high, loss_type=trainer.loss_type,
            max_completion_length=trainer.max_completion_length,
            num_sequences=totals["num_sequences"], num_tokens=totals["num_tokens"], entropy_BT=entropy_BT,
            sequence_tokens_BT=extras.get("sequence_tokens"))
    return loss_fn


def make_logprob_fn(graphdef: nnx.GraphDef, mesh: Mesh, shardings, temperature: float,
                    accum_steps: int = 1) -> Callable:
    """Jitted (params, batch) -> logp_BT, for the reference and old-policy passes.

    The batch is split into the update's micro-batches (`accum_steps`, same rows per
    micro-batch as `train.step`) and run one at a time: a forward over the whole global
    batch would hold B x N x T x T attention scores at once (27 GB for 128 rows of 2k).
    """
    def logprobs(params, batch):
        model = nnx.merge(graphdef, params)
        micro = split_micro_batches(batch, accum_steps, mesh)  # [A, B / A, ...], row b in micro b % A
        logp_ABT = jax.lax.map(lambda mb: shifted_logprobs(model, mb, temperature)[0], micro)
        A, b, T = logp_ABT.shape
        return logp_ABT.swapaxes(0, 1).reshape(A * b, T)

    data = NamedSharding(mesh, P(parallel.DATA_AXES))
    return jax.jit(logprobs, in_shardings=(shardings, data), out_shardings=data,
                   compiler_options=parallel.COMPILER_OPTIONS)


def make_ref_mixup(params_shardings) -> Callable:
    """Jitted (ref, policy, alpha) -> alpha * policy + (1 - alpha) * ref, written over ref."""
    def mix(ref, policy, alpha):
        return jax.tree.map(lambda r, p: (alpha * p + (1.0 - alpha) * r).astype(r.dtype), ref, policy)

    return jax.jit(mix, in_shardings=(params_shardings, params_shardings, None),
                   out_shardings=params_shardings, donate_argnums=0)


@flax.struct.dataclass
class RLState(TrainState):
    """TrainState plus the reference policy, so checkpoints and resumes carry it too."""

    ref_params: Optional[Any] = None


def create_rl_state(params, optimizer, mesh: Mesh, *, seed: int, with_ref: bool) -> tuple[RLState, RLState]:
    """(state, shardings); the reference starts as a copy of the initial policy."""
    p_shardings = jax.tree.map(lambda x: x.sharding, params)
    ref = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=p_shardings)(params) if with_ref else None
    state, shardings = create_train_state(params, optimizer, mesh, seed=seed)
    fields = lambda s: {f: getattr(s, f) for f in ("params", "opt_state", "step", "rng")}  # noqa: E731
    return (RLState(**fields(state), ref_params=ref),
            RLState(**fields(shardings), ref_params=p_shardings if with_ref else None))
