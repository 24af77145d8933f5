"""One tiny RCL run shared by the recipe tests (training it once keeps the suite fast)."""

from __future__ import annotations

import jax
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
                 "trainer.ref_model_sync_steps=1", "trainer.save_completions_probability=1.0"]


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
