"""Every way RCL gets its frozen student (rl/student.py): the reference teacher (null
student) with and without LoRA, a preset, a Hugging Face directory; with the frozen base
offloaded to host memory and without. Each is built in the order teacher_rcl builds it:
after the train state took (donated) the teacher's parameters, after offload."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from atlas_jax import parallel
from atlas_jax.config import TrainConfig, TrainerConfig, compose
from atlas_jax.models import lora, save_pretrained
from atlas_jax.recipes import teacher_rcl
from atlas_jax.rl import policy
from atlas_jax.rl.student import load_student
from atlas_jax.train import offload
from atlas_jax.train.optim import make_optimizer
from tests.recipes.conftest import RCL_OVERRIDES
from tests.train import helpers

IDS = np.arange(1, 13, dtype=np.int32).reshape(2, 6) % 60


def _setup(student_model, *, rank: int = 0, offloaded: bool = False):
    """(cfg, student, logits the teacher had before training), built as teacher_rcl builds them."""
    model_cfg = dataclasses.replace(helpers.TINY, lora=dataclasses.replace(helpers.TINY.lora, rank=rank))
    cfg = TrainConfig(run="teacher_rcl", model=model_cfg, trainer=TrainerConfig(student_model=student_model))
    mesh = helpers.mesh_of(1)
    teacher = helpers.load_model(mesh, model_cfg)
    before = np.asarray(teacher(IDS))
    graphdef, params, frozen = lora.split_trainable(teacher)
    del teacher
    state, shardings = policy.create_rl_state(params, make_optimizer(cfg.trainer, 10), mesh, seed=0,
                                              with_ref=frozen is None)
    if offloaded:  # on CPU offload.resolve says "none"; apply() itself works on pinned_host
        state, shardings, frozen = offload.apply(state, shardings, frozen, "optimizer_and_frozen")
    student, tokenizer = load_student(cfg, mesh, graphdef, state.params, object(), frozen)
    return cfg, student, before, frozen


@pytest.mark.parametrize("rank, offloaded", [(0, False), (0, True), (4, False), (4, True)])
def test_null_student_is_the_teacher_before_training(rank, offloaded):
    _, student, before, frozen = _setup(None, rank=rank, offloaded=offloaded)
    np.testing.assert_allclose(np.asarray(student(IDS)), before, atol=1e-6)
    assert not lora.has_adapters(student) or rank > 0
    if rank and offloaded:  # the student shares the host-resident base: no device copy
        base = jax.tree.leaves(frozen)
        assert base and all(parallel.in_host_memory(x) for x in base)


def test_preset_student_is_built_from_its_yaml():
    _, student, _, _ = _setup("tiny")
    assert student.config.name == "tiny" and student.config.hidden_size == 128
    assert student.config.lora.rank == 0 and not student.config.load_in_4bit


def test_hugging_face_directory_student(tmp_path):
    source = helpers.load_model(helpers.mesh_of(1), dataclasses.replace(helpers.TINY, vocab_size=1024), seed=3)
    save_pretrained(source, str(tmp_path))
    cfg = dataclasses.replace(TrainConfig(run="teacher_rcl", model=helpers.TINY),
                              trainer=TrainerConfig(student_model=str(tmp_path)))
    student, tokenizer = load_student(cfg, helpers.mesh_of(1), None, None, None)
    np.testing.assert_allclose(np.asarray(student(IDS)), np.asarray(source(IDS)), atol=1e-6)
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id


def test_null_student_rcl_runs(tmp_path):
    """The quickstart's former crash: a null student without LoRA was copied from the
    parameters the train state had been given (donated)."""
    overrides = [o for o in RCL_OVERRIDES if not o.startswith(("trainer.student_model", "trainer.max_steps"))]
    cfg = compose(["+run=teacher_rcl", *overrides, "trainer.student_model=null", "trainer.max_steps=1",
                   f"output_dir={tmp_path}"])
    result = teacher_rcl.run(cfg, parallel.make_mesh(cfg.mesh, jax.devices()[:1]))
    assert result["steps"] == 1
