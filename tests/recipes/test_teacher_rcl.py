"""The RCL pipeline end to end on CPU with a tiny teacher and student."""

from __future__ import annotations

import json
import pathlib

import jax
import numpy as np

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
