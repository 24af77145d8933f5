"""Evaluation and export from the checkpoint of a tiny RCL run."""

from __future__ import annotations

import dataclasses
import json

import jax
import pytest

from atlas_jax import parallel
from atlas_jax.config import MeshConfig
from atlas_jax.recipes import evaluate
from atlas_jax.train.checkpoint import CheckpointError

FIELDS = ("baseline_accuracy", "accuracy_with_guidance", "average_accuracy_improvement", "non_degradation_rate",
          "improvement_rate", "degradation_rate", "task_completion_rate_with_guidance",
          "task_completion_rate_baseline", "mean_guidance_tokens", "student_tokens_with_guidance",
          "student_tokens_baseline", "student_token_reduction", "outcomes", "checkpoint_step")


def _eval_cfg(rcl_cfg, out, **changes):
    return dataclasses.replace(rcl_cfg, run="evaluate", output_dir=str(out),
                               checkpoint=str(rcl_cfg.output_dir) + "/checkpoints", **changes)


def test_evaluate_writes_report_and_matches_across_meshes(rcl_run, tmp_path):
    rcl_cfg, _, _, _ = rcl_run
    one = evaluate.run(_eval_cfg(rcl_cfg, tmp_path / "one"),
                       parallel.make_mesh(MeshConfig(), jax.devices()[:1]))
    eight = evaluate.run(_eval_cfg(rcl_cfg, tmp_path / "eight"),
                         parallel.make_mesh(MeshConfig(name="8", fsdp=4, tensor=2), jax.devices()[:8]))
    report = json.loads((tmp_path / "one" / "eval" / "report.json").read_text())
    assert set(FIELDS) <= set(report) and report["checkpoint_step"] == 2
    assert report["num_scored"] == 4 and sum(report["outcomes"].values()) == 4
    assert (tmp_path / "one" / "eval" / "outcomes.png").read_bytes()[:4] == b"\x89PNG"
    assert "accuracy with guidance" in (tmp_path / "one" / "eval" / "report.md").read_text()
    assert one["report"] == eight["report"]


def test_export_loads_in_transformers_with_equal_logits(rcl_run, tmp_path, export_and_compare):
    rcl_cfg, _, _, _ = rcl_run
    assert export_and_compare(_eval_cfg(rcl_cfg, tmp_path), tmp_path / "hf") == 2
    assert (tmp_path / "hf" / "tokenizer.json").is_file()


@pytest.mark.parametrize("case", ["missing", "empty", "other_model"])
def test_unusable_checkpoint_fails_with_one_line(rcl_run, tmp_path, case):
    rcl_cfg, _, _, _ = rcl_run
    cfg = _eval_cfg(rcl_cfg, tmp_path)
    if case == "missing":
        cfg = dataclasses.replace(cfg, checkpoint=str(tmp_path / "nope"))
    elif case == "empty":
        (tmp_path / "empty").mkdir()
        cfg = dataclasses.replace(cfg, checkpoint=str(tmp_path / "empty"))
    else:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, hidden_size=64, head_dim=16))
    with pytest.raises(CheckpointError) as error:
        evaluate.restore_teacher(cfg, parallel.make_mesh(MeshConfig(), jax.devices()[:1]))
    assert len(str(error.value).splitlines()) == 1


def test_checkpoint_step_best_restores_the_step_best_json_names(rcl_run, tmp_path):
    rcl_cfg, _, _, _ = rcl_run  # ranked by eval/accuracy_with_guidance (tests/recipes/conftest.py)
    cfg = _eval_cfg(rcl_cfg, tmp_path, checkpoint_step="best")
    assert evaluate.restore_teacher(cfg, parallel.make_mesh(MeshConfig(), jax.devices()[:1]))[1] == 2
