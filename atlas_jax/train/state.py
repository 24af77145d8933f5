"""TrainState: the one pytree a training step consumes and returns (and a checkpoint holds)."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from atlas_jax import parallel


@flax.struct.dataclass
class TrainState:
    """params: the trained variables (e.g. `nnx.split(model, nnx.Param)[1]`);
    opt_state: the optimizer's state, sharded like params; step: int32 scalar, updates
    applied so far; rng: uint32[2] base key (derive per-step keys with fold_in(rng, step))."""

    params: Any
    opt_state: Any
    step: jax.Array
    rng: jax.Array


def shardings_of(tree):
    """The sharding of every array leaf (concrete arrays or ShapeDtypeStructs)."""
    return jax.tree.map(lambda x: x.sharding, tree)


def abstract_of(tree):
    """ShapeDtypeStructs carrying each leaf's sharding: a restore target for Orbax."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def state_shardings(params_shardings, optimizer: optax.GradientTransformation, abstract_params,
                    mesh: Mesh) -> TrainState:
    """Shardings of a TrainState: optimizer moments follow their parameter, counters are replicated."""
    abstract_opt = jax.eval_shape(optimizer.init, abstract_params)
    opt = optax.tree_map_params(
        optimizer,
        lambda _, sharding: sharding,
        abstract_opt,
        params_shardings,
        transform_non_params=lambda _: parallel.replicated(mesh),
    )
    rep = parallel.replicated(mesh)
    return TrainState(params=params_shardings, opt_state=opt, step=rep, rng=rep)


def create_train_state(params, optimizer: optax.GradientTransformation, mesh: Mesh, *,
                       seed: int) -> tuple[TrainState, TrainState]:
    """TrainState around already-sharded params; the optimizer state is created directly on
    its shardings (eval_shape -> shardings -> jit(out_shardings)), never on one device.

    Returns (state, shardings); `params` are donated into the state.
    """
    p_shardings = shardings_of(params)
    shardings = state_shardings(p_shardings, optimizer, abstract_of(params), mesh)

    def init(p):
        return TrainState(params=p, opt_state=optimizer.init(p), step=jnp.zeros((), jnp.int32),
                          rng=jax.random.key_data(jax.random.key(seed)))

    state = jax.jit(init, in_shardings=(p_shardings,), out_shardings=shardings, donate_argnums=0)(params)
    return state, shardings
