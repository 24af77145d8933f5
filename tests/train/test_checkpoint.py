"""Checkpoints: cross-mesh restore, params-only restore, interrupted writes ignored."""

import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from atlas_jax.train import checkpoint as ckpt_lib, optim, state as state_lib

from . import helpers


def _state(mesh, seed):
    _, params = nnx.split(helpers.load_model(mesh, seed=seed), nnx.Param)
    tx = optim.make_optimizer(helpers.TRAINER, 6)
    return state_lib.create_train_state(params, tx, mesh, seed=seed)[0]


def _assert_same(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_cross_mesh_restore_and_interrupted_write(tmp_path):
    mesh8, mesh1 = helpers.mesh_of(8), helpers.mesh_of(1)
    saved8 = _state(mesh8, seed=0)
    assert any(s.spec != jax.sharding.PartitionSpec() and "fsdp" in str(s.spec)
               for s in jax.tree.leaves(state_lib.shardings_of(saved8.params)))
    ckpt = ckpt_lib.Checkpointer(str(tmp_path / "a"), save_steps=3, max_to_keep=2)
    ckpt.save(3, saved8, data_state={"next_index": 24}, extra={"note": "x"})
    ckpt.close()

    # A write killed part-way leaves only Orbax's temporary directory: never a step.
    partial = tmp_path / "a" / "6.orbax-checkpoint-tmp-1700000000"
    shutil.copytree(tmp_path / "a" / "3", partial)
    shutil.rmtree(partial / "state")

    # fsdp 8 -> 1 device, onto a differently initialised target.
    target1 = _state(mesh1, seed=1)
    reader = ckpt_lib.Checkpointer(str(tmp_path / "a"), save_steps=3, max_to_keep=2)
    assert reader.latest_step() == 3 and reader.all_steps() == [3]
    restored = reader.restore(state_lib.abstract_of(target1), extra=True)
    assert restored["step"] == 3 and restored["data_state"] == {"next_index": 24}
    assert restored["extra"] == {"note": "x"}
    _assert_same(restored["state"], saved8)
    assert all(s.mesh == mesh1 for s in jax.tree.leaves(state_lib.shardings_of(restored["state"])))

    # ... and back: 1 device -> fsdp 8, with the original shardings.
    ckpt1 = ckpt_lib.Checkpointer(str(tmp_path / "b"), save_steps=1, max_to_keep=1)
    ckpt1.save(4, restored["state"])
    ckpt1.close()
    back = ckpt_lib.Checkpointer(str(tmp_path / "b"), save_steps=1, max_to_keep=1).restore(
        state_lib.abstract_of(saved8))
    _assert_same(back["state"], saved8)
    assert state_lib.shardings_of(back["state"]) == state_lib.shardings_of(saved8)

    # Params only, for evaluation/export: from the run dir or a step dir.
    params, step = ckpt_lib.restore_params(str(tmp_path / "a" / "3"), None, state_lib.abstract_of(target1.params))
    assert step == 3
    _assert_same(params, saved8.params)
    with pytest.raises(ckpt_lib.CheckpointError, match="no committed checkpoint"):
        reader.restore(state_lib.abstract_of(target1), step=6)
    with pytest.raises(ckpt_lib.CheckpointError, match="does not exist"):
        ckpt_lib.restore_params(str(tmp_path / "missing"), None, state_lib.abstract_of(target1.params))
