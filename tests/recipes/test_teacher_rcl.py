"""The RCL pipeline end to end on CPU with a tiny teacher and student."""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
import numpy as np
from flax import nnx

from atlas_jax import parallel
from atlas_jax.config import compose
from atlas_jax.recipes import evaluate, teacher_rcl

METRICS = ("student_accuracy", "baseline_accuracy", "accuracy_delta", "improvement_rate", "degradation_rate",
           "non_degradation_rate", "teaching_length_mean", "teaching_length_std", "student_approach_length",
           "token_efficiency", "reward", "reward_std", "kl", "rollout_time_s", "update_time_s", "loss",
           "grad_norm", "learning_rate", "entropy", "clip_ratio/region", "frac_reward_zero_std")


def test_teacher_rcl_end_to_end_writes_every_metric(rcl_run):
    cfg, result, _, _ = rcl_run
    out = pathlib.Path(cfg.output_dir)
    assert result["steps"] == 2
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2]
    for name in METRICS:
        assert all(np.isfinite(r[name]) for r in train_rows), name
    assert any("eval/student_accuracy" in r for r in rows)
    assert (out / "checkpoints" / "2").is_dir()
    # the eval logs the teaching report's figures, so they can pick the best checkpoint
    evals = [r for r in rows if "eval/accuracy_with_guidance" in r]
    assert [r["step"] for r in evals] == [2]
    best = json.loads((out / "checkpoints" / "best.json").read_text())
    assert best == {"step": 2, "metric": "eval/accuracy_with_guidance", "greater_is_better": True,
                    "value": evals[0]["eval/accuracy_with_guidance"]}


def test_teacher_rcl_writes_samples_with_their_context(rcl_run):
    cfg, _, _, _ = rcl_run
    lines = (pathlib.Path(cfg.output_dir) / "completions.jsonl").read_text().splitlines()
    samples = [json.loads(line) for line in lines]
    assert len(samples) == 2 * cfg.batch.global_batch_size  # probability 1.0 keeps every sample
    assert {"prompt", "approach", "guidance", "solution_with_guidance", "solution_baseline",
            "ground_truth", "reward"} <= set(samples[0])


def test_teacher_rcl_leaves_the_student_bit_identical(rcl_run):
    _, _, before, after = rcl_run
    leaves_before, leaves_after = jax.tree.leaves(before), jax.tree.leaves(after)
    assert len(leaves_before) == len(leaves_after) > 0
    for a, b in zip(leaves_before, leaves_after):
        np.testing.assert_array_equal(a, b)


def _train_rows(out: pathlib.Path) -> list:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]


def test_teacher_rcl_resumes_exactly(rcl_run, rcl_overrides, tmp_path):
    """1 step, stop, resume to step 2 == 2 steps straight: the rollout (prompt iterator,
    seed), the reference model and the optimizer all come back from the checkpoint."""
    cfg, _, _, _ = rcl_run
    mesh = parallel.make_mesh(cfg.mesh, jax.devices()[:1])
    out = tmp_path / "resumed"
    first = teacher_rcl.run(compose(["+run=teacher_rcl", *rcl_overrides, "trainer.max_steps=1",
                                     f"output_dir={out}"]), mesh)
    assert first["steps"] == 1
    resumed = teacher_rcl.run(compose(["+run=teacher_rcl", *rcl_overrides, f"output_dir={out}"]), mesh)
    assert resumed["steps"] == 2

    straight, again = _train_rows(pathlib.Path(cfg.output_dir)), _train_rows(out)
    assert [r["step"] for r in again] == [1, 2]  # the second run did step 2 only
    for name in ("loss", "grad_norm", "kl", "reward", "reward_std", "teaching_length_mean", "student_accuracy"):
        assert again[1][name] == straight[1][name], name
    params = [jax.device_get(nnx.state(evaluate.restore_teacher(
        dataclasses.replace(cfg, checkpoint=str(run / "checkpoints"), checkpoint_step=2), mesh)[0], nnx.Param))
        for run in (pathlib.Path(cfg.output_dir), out)]
    for a, b in zip(*(jax.tree.leaves(p) for p in params), strict=True):
        np.testing.assert_array_equal(a, b)

