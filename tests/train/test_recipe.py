"""The SFT recipe end to end on real data: SIGTERM + exact resume, NaN guard, outputs."""

import dataclasses
import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from atlas_jax.config import BatchConfig, DataConfig, TrainConfig, TrainerConfig
from atlas_jax.recipes import sft as sft_recipe
from atlas_jax.train import checkpoint as ckpt_lib, loop as loop_lib, setup

from . import helpers

MODEL = dataclasses.replace(helpers.TINY, vocab_size=1024, max_position_embeddings=512)  # built-in tokenizer


def _cfg(out, **trainer) -> TrainConfig:
    t = dict(max_steps=6, learning_rate=3e-3, warmup_steps=2, weight_decay=0.01, logging_steps=1, save_steps=100,
             save_total_limit=3, eval_steps=100, save_final_model=False, report_to=("tensorboard",))
    t.update(trainer)
    return TrainConfig(run="teacher_sft", output_dir=str(out), seed=0, model=MODEL,
                       data=DataConfig(num_synthetic_examples=64, max_length=192, eval_split_ratio=0.0),
                       trainer=TrainerConfig(**t), batch=BatchConfig(global_batch_size=4, micro_batch_size=2))


def _losses(out) -> dict:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _wrap_steps(monkeypatch, hook):
    """Runs hook(step_number, batch) -> batch before every update the recipe makes (the
    update the recipe calls is its compiled step bound to the run: setup.Job.bind)."""
    real = setup.Job.bind

    def bind(job, update):
        step_fn = real(job, update)

        def wrapped(state, batch, extras=None):
            return step_fn(state, hook(int(jax.device_get(state.step)) + 1, batch), extras)
        return wrapped
    monkeypatch.setattr(setup.Job, "bind", bind)


def _params_at(out, step, mesh):
    from flax import nnx
    from atlas_jax.train.state import abstract_of
    _, params = nnx.split(helpers.load_model(mesh, MODEL, seed=1), nnx.Param)
    return ckpt_lib.restore_params(os.path.join(out, "checkpoints"), step, abstract_of(params))[0]


def test_sigterm_saves_and_resume_is_exact(tmp_path, monkeypatch):
    mesh = helpers.mesh_of(1)
    straight = sft_recipe.run(_cfg(tmp_path / "straight"), mesh)
    assert straight["steps"] == 6 and straight["stopped_by"] == "max_steps"

    def sigterm_after_3(step, batch):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # handled between steps: save step 3, stop
        return batch
    with monkeypatch.context() as m:
        _wrap_steps(m, sigterm_after_3)
        killed = sft_recipe.run(_cfg(tmp_path / "resumed"), mesh)
    assert killed["stopped_by"] == "sigterm" and killed["steps"] == 3
    assert sorted(os.listdir(tmp_path / "resumed" / "checkpoints")) == ["3"]
    resumed = sft_recipe.run(_cfg(tmp_path / "resumed"), mesh)
    assert resumed["steps"] == 6 and resumed["stopped_by"] == "max_steps"

    assert _losses(tmp_path / "resumed") == _losses(tmp_path / "straight")  # identical, step by step
    assert len(_losses(tmp_path / "straight")) == 6
    for a, b in zip(jax.tree.leaves(_params_at(tmp_path / "resumed", 6, mesh)),
                    jax.tree.leaves(_params_at(tmp_path / "straight", 6, mesh)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert os.path.exists(tmp_path / "straight" / "config.yaml")
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "straight"))


def test_non_finite_loss_stops_without_saving_that_state(tmp_path, monkeypatch):
    def nan_at_3(step, batch):
        return batch.replace(loss_mask=batch.loss_mask * jnp.nan) if step == 3 else batch
    _wrap_steps(monkeypatch, nan_at_3)
    with pytest.raises(loop_lib.NonFiniteLossError, match="at step 3"):
        sft_recipe.run(_cfg(tmp_path, save_steps=2), helpers.mesh_of(1))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]  # step 4 would have been saved


def test_tiny_model_halves_its_loss_on_synthetic_traces(tmp_path):
    """Within the quickstart budget (150 steps x 16 rows): here 50 steps of a smaller model."""
    cfg = _cfg(tmp_path, max_steps=50, learning_rate=1e-2, warmup_steps=0, warmup_ratio=0.05, eval_steps=50,
               save_steps=50, save_final_model=True)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(MODEL, hidden_size=64, intermediate_size=192),
                              batch=BatchConfig(global_batch_size=16, micro_batch_size=-1, eval_batch_size=16),
                              data=dataclasses.replace(cfg.data, num_synthetic_examples=400, eval_split_ratio=0.05,
                                                       max_length=256))
    result = sft_recipe.run(cfg, helpers.mesh_of(1))
    losses = _losses(tmp_path)
    assert losses[50] <= 0.5 * losses[1], losses
    with open(tmp_path / "metrics.jsonl") as f:
        evals = [json.loads(line) for line in f if "eval/loss" in line]
    assert evals and evals[-1]["eval/perplexity"] == pytest.approx(np.exp(evals[-1]["eval/loss"]), rel=1e-5)
    assert evals[-1]["eval/loss"] <= 0.5 * losses[1]
    assert os.path.exists(os.path.join(result["hf_dir"], "config.json"))
