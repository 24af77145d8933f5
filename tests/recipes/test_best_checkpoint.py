"""The best checkpoint (HF Trainer's metric_for_best_model, greater_is_better,
load_best_model_at_end): kept through rotation, restored by checkpoint_step=best, exported."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from atlas_jax import parallel
from atlas_jax.config import ConfigError, compose
from atlas_jax.models import from_pretrained
from atlas_jax.recipes import evaluate, sft as sft_recipe

SFT = ["+run=teacher_sft", "model=tiny", "data=synthetic_math_sft", "data.num_synthetic_examples=64",
       "data.max_length=192", "data.eval_split_ratio=0.1", "batch.global_batch_size=4", "batch.micro_batch_size=-1",
       "trainer.learning_rate=1e-2", "trainer.warmup_ratio=0", "trainer.report_to=[]"]
PEAKED = {1: 0.2, 2: 0.9, 3: 0.5, 4: 0.4}  # the eval metric of each step: best at step 2


def _scripted_eval(job, tokenizer, eval_step, mesh, state) -> dict:
    return {"accuracy": PEAKED[int(state.step)]}


def test_best_step_survives_rotation_is_restored_by_best_and_exported(tmp_path, monkeypatch, export_and_compare):
    monkeypatch.setattr(sft_recipe, "eval_loss", _scripted_eval)
    cfg = compose([*SFT, "trainer.max_steps=4", "trainer.eval_steps=1", "trainer.save_steps=1",
                   "trainer.save_total_limit=1", "trainer.metric_for_best_model=accuracy",
                   "trainer.load_best_model_at_end=true", "trainer.save_final_model=true", f"output_dir={tmp_path}"])
    mesh = parallel.make_mesh(cfg.mesh, jax.devices()[:1])
    result = sft_recipe.run(cfg, mesh)
    checkpoints = tmp_path / "checkpoints"
    assert sorted(os.listdir(checkpoints)) == ["2", "4", "best.json"]  # newest 1, plus the best
    assert json.loads((checkpoints / "best.json").read_text()) == {
        "step": 2, "metric": "eval/accuracy", "value": 0.9, "greater_is_better": True}  # inferred: not a loss

    # evaluate's restore with checkpoint_step=best (as typed on the command line) is step 2
    eval_cfg = compose(["+run=evaluate", f"checkpoint={checkpoints}", "checkpoint_step=best",
                        f"output_dir={tmp_path / 'eval'}"])
    assert eval_cfg.checkpoint_step == "best"
    best, step = evaluate.restore_teacher(eval_cfg, mesh)
    last, _ = evaluate.restore_teacher(compose(["+run=evaluate", f"checkpoint={checkpoints}"]), mesh)
    assert step == 2
    tokens = np.random.default_rng(0).integers(0, cfg.model.vocab_size, (2, 12))
    assert not np.allclose(np.asarray(best(tokens)), np.asarray(last(tokens)), atol=1e-3)

    # load_best_model_at_end: the run's final export is step 2, as is +run=export checkpoint_step=best
    exported = from_pretrained(result["hf_dir"])
    np.testing.assert_allclose(np.asarray(exported(tokens)), np.asarray(best(tokens)), atol=1e-5, rtol=0)
    assert export_and_compare(eval_cfg, tmp_path / "exported") == 2


@pytest.mark.parametrize("overrides,message", [
    (["trainer.load_best_model_at_end=true"], "needs trainer.metric_for_best_model"),
    (["trainer.metric_for_best_model=eval/loss", "trainer.save_steps=3", "trainer.eval_steps=2"],
     "must be a multiple of trainer.eval_steps=2"),
    (["trainer.metric_for_best_model=eval/loss", "data.eval_split_ratio=0"], "needs eval data"),
    (["checkpoint_step=latest"], "must be a step number or 'best'"),
])
def test_best_checkpoint_options_are_checked_at_start(overrides, message):
    with pytest.raises(ConfigError, match=message):
        compose([*SFT, *overrides])


def test_checkpoint_step_takes_a_number_or_best():
    assert compose([*SFT, "checkpoint_step=300"]).checkpoint_step == 300
    assert compose([*SFT, "checkpoint_step=best"]).checkpoint_step == "best"
