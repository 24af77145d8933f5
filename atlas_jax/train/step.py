"""The generic update step: gradient accumulation over micro-batches inside one jit.

Loss convention (SFT and GRPO alike):

    loss_fn(params, micro_batch, micro_extras, totals) -> (loss, metric_sums)

`totals = totals_fn(batch, extras)` is computed once on the WHOLE global batch before the
micro-batch scan (e.g. {"loss_tokens": sum of the loss mask}); `loss_fn` divides by it, so
its value is that micro-batch's share of the global-batch loss and summing the shares gives
exactly the full-batch loss, whatever the micro-batch size, accumulation or device count.
`metric_sums` are summed over micro-batches the same way (normalise them with `totals`
when a mean is wanted). `extras` is any pytree whose leaves have the batch's leading dim
(GRPO: old/ref log-probs, advantages); it is split exactly like the batch.

Randomness (LoRA dropout). With `row_keys=True` the step also passes `keys_B=`: one PRNG
key per row, key[b] = fold_in(fold_in(state.rng, state.step), b) for row b of the global
batch, split with the rows. Whatever the loss draws from a row's key (the model folds in
the layer and projection) depends on (seed, step, row) alone, so it is the same under any
micro-batch size, accumulation or device count, and a resumed run (rng and step are in the
checkpoint) draws exactly the masks the uninterrupted one would have.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from atlas_jax import parallel
from atlas_jax.train import offload
from atlas_jax.train.state import TrainState

LossFn = Callable[[Any, Any, Any, Any], tuple[jax.Array, dict]]
TotalsFn = Callable[[Any, Any], Any]


def loss_mask_totals(batch, extras) -> dict:
    """Normalisers for masked token losses: loss tokens of the global batch (at least 1)."""
    del extras
    return {"loss_tokens": jnp.maximum(jnp.sum(batch.loss_mask.astype(jnp.float32)), 1.0)}


def split_micro_batches(tree, accum_steps: int, mesh: Mesh):
    """[B, ...] -> [accum, B / accum, ...], each micro-batch still spread over all data shards.

    Row b goes to micro-batch b % accum: every device keeps exactly its own rows (a local
    reshape, no communication), and each micro-batch is sharded like the global batch.
    """
    def split(x):
        x = x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:])
        x = jnp.swapaxes(x, 0, 1)
        spec = P(None, parallel.DATA_AXES, *([None] * (x.ndim - 2)))
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
    return jax.tree.map(split, tree)


def row_keys_of(state: TrainState, batch_size: int) -> jax.Array:
    """One PRNG key per global-batch row: fold_in(fold_in(rng, step), row)."""
    step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    return jax.vmap(lambda row: jax.random.fold_in(step_key, row))(jnp.arange(batch_size))


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, *, accum_steps: int,
                    mesh: Mesh, state_shardings: TrainState,
                    totals_fn: TotalsFn = loss_mask_totals,
                    schedule: Optional[optax.Schedule] = None, frozen: Any = None,
                    combine: Optional[Callable[[Any, Any], Any]] = None, row_keys: bool = False) -> Callable:
    """Returns `step(state, batch, extras=None) -> (state, metrics)`, jitted once.

    The global batch (and extras) arrive sharded over the data axes; the state is donated.
    metrics: every `metric_sums` key, plus loss, grad_norm, learning_rate (when `schedule`
    is given), tokens (B x T processed) and the totals.

    frozen: parameters that are used but never trained (a LoRA base). Every call passes
    them to the jitted step as an argument (not a baked-in constant, not donated, no
    gradient, no optimizer state); loss_fn then sees `combine(state.params, frozen)`.
    Optimizer-state shardings in pinned_host memory (train/offload.py) are fetched to the
    device for the update; the out_shardings put the new state back on the host. Frozen
    parameters in pinned_host memory stay there: the model fetches each layer as it runs.

    row_keys: call `loss_fn(..., keys_B=...)` with the micro-batch's per-row keys (see the
    module docstring); off, loss_fn is called with the four arguments alone.
    """
    param_shardings = state_shardings.params
    frozen_shardings = None if frozen is None else jax.tree.map(lambda x: x.sharding, frozen)

    def step(state: TrainState, batch, extras, frozen):
        totals = totals_fn(batch, extras)
        keys_B = row_keys_of(state, batch.tokens.shape[0]) if row_keys else None
        micro = split_micro_batches((batch, extras, keys_B), accum_steps, mesh)

        def micro_loss(params, mb, mx, keys, totals):
            params = params if frozen is None else combine(params, frozen)
            return loss_fn(params, mb, mx, totals, **({} if keys is None else {"keys_B": keys}))

        grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

        def accumulate(carry, micro_batch_extras_keys):
            grads_sum, metrics_sum = carry
            (loss, metrics), grads = grad_fn(state.params, *micro_batch_extras_keys, totals)
            grads_sum = jax.tree.map(jnp.add, grads_sum, grads)
            metrics = {**metrics, "loss": loss}
            return (grads_sum, jax.tree.map(jnp.add, metrics_sum, metrics)), None

        first = jax.tree.map(lambda x: x[0], micro)
        metric_shapes = jax.eval_shape(lambda: {**grad_fn(state.params, *first, totals)[0][1], "loss": 0.0})
        zeros_metrics = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), metric_shapes)
        zeros_grads = jax.tree.map(jnp.zeros_like, state.params)
        (grads, metrics), _ = jax.lax.scan(accumulate, (zeros_grads, zeros_metrics), micro)
        grads = jax.lax.with_sharding_constraint(grads, param_shardings)

        opt_state = offload.fetch(state.opt_state, state_shardings.opt_state)
        updates, opt_state = optimizer.update(grads, opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {**metrics, **totals, "grad_norm": optax.global_norm(grads),
                   "tokens": jnp.float32(batch.tokens.size)}
        if schedule is not None:
            metrics["learning_rate"] = jnp.asarray(schedule(state.step), jnp.float32)
        new_state = state.replace(params=params, opt_state=opt_state, step=state.step + 1)
        return new_state, metrics

    data = NamedSharding(mesh, P(parallel.DATA_AXES))
    jitted = jax.jit(step, in_shardings=(state_shardings, data, data, frozen_shardings),
                     out_shardings=(state_shardings, parallel.replicated(mesh)), donate_argnums=0,
                     compiler_options=parallel.COMPILER_OPTIONS)

    def train_step(state: TrainState, batch, extras=None):
        return jitted(state, batch, extras, frozen)

    train_step.jitted = jitted
    return train_step
