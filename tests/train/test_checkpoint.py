"""Checkpoints: cross-mesh restore, params-only restore, interrupted writes ignored, the best
checkpoint (rotation, best.json)."""

import dataclasses
import os
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from atlas_jax.config import UsageError
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


def test_best_step_is_kept_out_of_rotation_and_recorded_once_committed(tmp_path):
    mesh = helpers.mesh_of(1)
    state = _state(mesh, seed=0)
    ckpt = ckpt_lib.Checkpointer(str(tmp_path), save_steps=1, max_to_keep=1, best_metric="eval/loss",
                                 greater_is_better=False)
    losses = {1: 3.0, 2: 1.0, 3: float("nan"), 4: 2.0, 5: 1.0}  # 5 ties 2: not strictly better
    for step, loss in losses.items():
        ckpt.save(step, state, metrics={"eval/loss": loss, "eval/perplexity": 9.0})
        if step == 2:  # a new best is recorded once its write has committed, never before
            assert ckpt_lib.read_best(str(tmp_path))["step"] == 1
    ckpt.save(6, state)  # a save without eval (SIGTERM): not ranked
    ckpt.close()
    assert sorted(os.listdir(tmp_path)) == ["2", "6", "best.json"]
    assert ckpt_lib.read_best(str(tmp_path)) == {"step": 2, "metric": "eval/loss", "value": 1.0,
                                                  "greater_is_better": False}
    params, step = ckpt_lib.restore_params(str(tmp_path), "best", state_lib.abstract_of(state.params))
    assert step == 2

    # a resumed run ranks against the best so far; a better step replaces it and the old one rotates out
    again = ckpt_lib.Checkpointer(str(tmp_path), save_steps=1, max_to_keep=1, best_metric="eval/loss",
                                  greater_is_better=False)
    assert again.best["step"] == 2
    again.save(7, state, metrics={"eval/loss": 1.5})
    again.save(8, state, metrics={"eval/loss": 0.5})
    again.close()
    assert sorted(os.listdir(tmp_path)) == ["8", "best.json"] and ckpt_lib.read_best(str(tmp_path))["step"] == 8

    with pytest.raises(UsageError, match="eval/accuracy .* eval/loss"):
        ckpt_lib.Checkpointer(str(tmp_path / "c"), save_steps=1, max_to_keep=1,
                              best_metric="eval/accuracy").save(1, state, metrics={"eval/loss": 1.0})
    with pytest.raises(ckpt_lib.CheckpointError, match="no best checkpoint recorded"):
        ckpt_lib.restore_params(str(tmp_path / "c"), "best", state_lib.abstract_of(state.params))


@pytest.mark.parametrize("metric,greater,expected", [
    (None, None, (None, True)), ("eval/loss", None, ("eval/loss", False)), ("loss", None, ("eval/loss", False)),
    ("accuracy_with_guidance", None, ("eval/accuracy_with_guidance", True)), ("eval/loss", True, ("eval/loss", True)),
    ("eval/reward", False, ("eval/reward", False))])
def test_best_rule_reads_hf_trainer_options(metric, greater, expected):
    trainer = dataclasses.replace(helpers.TRAINER, metric_for_best_model=metric, greater_is_better=greater)
    assert ckpt_lib.best_rule(trainer) == expected
