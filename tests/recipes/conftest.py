"""One tiny RCL run shared by the recipe tests (training it once keeps the suite fast)."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from atlas_jax import parallel
from atlas_jax.config import compose
from atlas_jax.recipes import teacher_rcl

# The command, plus the CPU-sized lengths and batch a test can afford.
RCL_OVERRIDES = ["model=tiny", "trainer.student_model=tiny", "data=synthetic_math_rl",
                 "trainer.max_steps=2", "batch=quickstart", "trainer.num_generations=4",
                 "trainer.max_prompt_length=192", "trainer.max_completion_length=16", "reward.max_probe_tokens=8",
                 "data.max_eval_samples=4", "batch.eval_batch_size=4", "trainer.eval_steps=2",
                 "trainer.ref_model_sync_steps=1", "trainer.save_completions_probability=1.0",
                 "trainer.metric_for_best_model=accuracy_with_guidance"]


@pytest.fixture(scope="session")
def rcl_run(tmp_path_factory):
    """(cfg, result, student params before, student params after) of a 2-step tiny RCL run."""
    out = tmp_path_factory.mktemp("rcl")
    cfg = compose(["+run=teacher_rcl", *RCL_OVERRIDES, f"output_dir={out}"])
    mesh = parallel.make_mesh(cfg.mesh, jax.devices()[:1])
    seen = {}
    load_student = teacher_rcl.load_student

    def spy(*args, **kwargs):
        student, tok = load_student(*args, **kwargs)
        seen["student"] = student
        seen["before"] = jax.device_get(nnx.state(student, nnx.Param))
        return student, tok

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(teacher_rcl, "load_student", spy)
        result = teacher_rcl.run(cfg, mesh)
    after = jax.device_get(nnx.state(seen["student"], nnx.Param))
    return cfg, result, seen["before"], after


@pytest.fixture
def rcl_overrides():
    """RCL_OVERRIDES, for tests that start more runs like rcl_run's."""
    return list(RCL_OVERRIDES)


@pytest.fixture
def export_and_compare():
    """The function below: export a run's checkpoint and check transformers agrees with it."""
    return _export_and_compare


def _export_and_compare(cfg, export_dir) -> int:
    """+run=export of cfg.checkpoint, then transformers' logits of the export against ours
    (restored from the same checkpoint) on random tokens, to 1e-4. Returns the step."""
    import torch
    from transformers import AutoModelForCausalLM

    from atlas_jax.recipes import evaluate, export

    cfg = dataclasses.replace(cfg, run="export", export_dir=str(export_dir))
    mesh = parallel.make_mesh(cfg.mesh, jax.devices()[:1])
    export.run(cfg, mesh)
    ours, step = evaluate.restore_teacher(cfg, mesh)
    tokens = np.random.default_rng(0).integers(0, cfg.model.vocab_size, (2, 12))
    theirs = AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = theirs(torch.as_tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours(tokens)), expected, atol=1e-4, rtol=0)
    return step
