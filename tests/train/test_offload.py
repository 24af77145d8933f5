"""trainer.offload: a clear message and a no-op on CPU; shardings move to pinned_host."""

import jax
import pytest

from atlas_jax.config import ConfigError
from atlas_jax.train import offload

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
