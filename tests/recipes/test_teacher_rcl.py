"""The RCL pipeline end to end on CPU with a tiny teacher and student."""

from __future__ import annotations

import json

import jax
import numpy as np
from flax import nnx

from atlas_jax import parallel
from atlas_jax.config import compose
from atlas_jax.recipes import teacher_rcl

# The command, plus the CPU-sized lengths and batch a test can afford.
OVERRIDES = ["+run=teacher_rcl", "model=tiny", "trainer.student_model=tiny", "data=synthetic_math_rl",
             "trainer.max_steps=2", "batch=quickstart", "trainer.num_generations=4",
             "trainer.max_prompt_length=192", "trainer.max_completion_length=16", "reward.max_probe_tokens=8",
             "data.max_eval_samples=4", "batch.eval_batch_size=4", "trainer.eval_steps=2",
             "trainer.ref_model_sync_steps=1", "trainer.save_completions_probability=1.0"]
METRICS = ("student_accuracy", "baseline_accuracy", "accuracy_delta", "improvement_rate", "degradation_rate",
           "non_degradation_rate", "teaching_length_mean", "teaching_length_std", "student_approach_length",
           "token_efficiency", "reward", "reward_std", "kl", "rollout_time_s", "update_time_s", "loss",
           "grad_norm", "learning_rate", "entropy", "clip_ratio/region", "frac_reward_zero_std")


def test_teacher_rcl_end_to_end_writes_metrics_and_keeps_student_frozen(tmp_path, monkeypatch):
    cfg = compose([*OVERRIDES, f"output_dir={tmp_path}"])
    mesh = parallel.make_mesh(cfg.mesh, jax.devices()[:1])
    seen = {}
    load_student = teacher_rcl.load_student

    def spy(*args, **kwargs):
        student, tok = load_student(*args, **kwargs)
        seen["student"] = student
        seen["before"] = jax.device_get(nnx.state(student, nnx.Param))
        return student, tok

    monkeypatch.setattr(teacher_rcl, "load_student", spy)
    result = teacher_rcl.run(cfg, mesh)

    assert result["steps"] == 2
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2]
    for name in METRICS:
        assert all(np.isfinite(r[name]) for r in train_rows), name
    assert any("eval/student_accuracy" in r for r in rows)
    samples = [json.loads(line) for line in (tmp_path / "completions.jsonl").read_text().splitlines()]
    assert len(samples) == 2 * cfg.batch.global_batch_size
    assert {"prompt", "approach", "guidance", "solution_with_guidance", "solution_baseline",
            "ground_truth", "reward"} <= set(samples[0])
    assert (tmp_path / "checkpoints" / "2").is_dir()
    after = jax.device_get(nnx.state(seen["student"], nnx.Param))
    for a, b in zip(jax.tree.leaves(seen["before"]), jax.tree.leaves(after)):
        np.testing.assert_array_equal(a, b)  # bit-identical
