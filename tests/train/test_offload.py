"""trainer.offload: a clear message and a no-op on CPU; shardings move to pinned_host; the
offloaded step trains exactly like the on-device one."""

import jax
import numpy as np
import pytest
from flax import nnx

from atlas_jax.config import ConfigError, accumulation_steps
from atlas_jax.train import offload, optim, sft, state as state_lib, step as step_lib

from . import helpers


def test_offload_is_a_noop_with_a_message_on_cpu(capsys):
    mesh = helpers.mesh_of(1)
    assert offload.resolve("optimizer", mesh) == "none"
    assert "ignored on CPU" in capsys.readouterr().out
    state, shardings, frozen = offload.apply("state", "shardings", None, "none")
    assert (state, shardings, frozen) == ("state", "shardings", None)
    with pytest.raises(ConfigError, match="trainer.offload='disk'"):
        offload.resolve("disk", mesh)


def test_host_shardings_use_pinned_host_and_fetch_leaves_device_arrays_alone():
    mesh = helpers.mesh_of(2)
    _, state, shardings, _ = helpers.setup(mesh, micro_batch=4)
    moved = offload.state_shardings(shardings, "optimizer")
    kinds = {s.memory_kind for s in jax.tree.leaves(moved.opt_state)}
    assert kinds == {"pinned_host"}
    assert {s.memory_kind for s in jax.tree.leaves(moved.params)} != {"pinned_host"}
    same = offload.fetch(state.params, shardings.params)  # device-resident: untouched
    assert all(a is b for a, b in zip(jax.tree.leaves(same), jax.tree.leaves(state.params)))


def test_offloaded_optimizer_state_trains_identically_and_stays_on_the_host():
    """The offload path itself, run on CPU (whose devices also have pinned_host memory; the
    recipes skip it there since it saves nothing): Adam moments live on the host between
    steps, are fetched for the update, and the result equals the on-device run bit for bit."""
    mesh = helpers.mesh_of(2)
    batches = [helpers.to_mesh(helpers.synthetic_batch(s), mesh) for s in range(3)]
    train_step, state, shardings, _ = helpers.setup(mesh, micro_batch=2)
    for b in batches:
        state, _ = train_step(state, b)

    tx = optim.make_optimizer(helpers.TRAINER, 6)
    graphdef, params = nnx.split(helpers.load_model(mesh), nnx.Param)
    host_state, host_shardings = state_lib.create_train_state(params, tx, mesh, seed=0)
    host_state, host_shardings, _ = offload.apply(host_state, host_shardings, None, "optimizer")
    host_step = step_lib.make_train_step(sft.make_sft_loss(graphdef), tx,
                                         accum_steps=accumulation_steps(8, 2, 2), mesh=mesh,
                                         state_shardings=host_shardings,
                                         schedule=optim.make_schedule(helpers.TRAINER, 6))
    for b in batches:
        host_state, _ = host_step(host_state, b)
    assert {x.sharding.memory_kind for x in jax.tree.leaves(host_state.opt_state)} == {"pinned_host"}
    assert {x.sharding.memory_kind for x in jax.tree.leaves(host_state.params)} == {"device"}
    for a, b in zip(jax.tree.leaves(jax.device_get(state)), jax.tree.leaves(jax.device_get(host_state)),
                    strict=True):
        np.testing.assert_array_equal(a, b)

