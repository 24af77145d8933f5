"""Teacher SFT: masked next-token cross-entropy on teaching traces.

  1. Tokenizer and train batches: a Grain iterator of process-local rows, made global per step.
  2. The run as shapes on the mesh (nothing allocated) and its accumulated update step,
     compiled for them: the memory plan, checked against the devices' before anything loads.
  3. Model (random init or a Hugging Face checkpoint, straight onto the mesh), optimizer
     state, checkpointer and writers; resume from output_dir/checkpoints or `resume_from`.
  4. The loop: logging, eval (loss, perplexity), checkpoints (best one included), SIGTERM,
     NaN guard.
  5. Export a Hugging Face directory to output_dir/hf (the best checkpoint with
     trainer.load_best_model_at_end).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from atlas_jax import memory, parallel
from atlas_jax.config import TrainConfig, accumulation_steps
from atlas_jax.data import Batch, sft_batches, sft_num_examples, to_global
from atlas_jax.data.sft import row_length
from atlas_jax.models import load_tokenizer, lora, param_count
from atlas_jax.train import loop, metrics as metrics_lib, setup, sft
from atlas_jax.train.state import shardings_of
from atlas_jax.train.step import make_train_step


def run(cfg: TrainConfig, mesh) -> dict:
    t, b = cfg.trainer, cfg.batch

    # 1. Tokenizer and train batches (repeating; the step count decides when to stop).
    tokenizer = load_tokenizer(cfg.model)
    batches = sft_batches(cfg.data, tokenizer, split="train", batch_size=b.global_batch_size, seed=cfg.seed)
    total = loop.total_steps(t, sft_num_examples(cfg.data, tokenizer, split="train"), b.global_batch_size)

    # 2. Shapes, update step, memory plan (refused here when it cannot fit).
    shapes, update, programs = prepare(cfg, mesh, total_steps=total)
    memory.report(cfg, mesh, programs)

    # 3. Model, optimizer state, checkpointer, writers; resume (with LoRA only the adapters train).
    job = setup.start(cfg, mesh, shapes, total_steps=total, batches=batches)
    train_step = job.bind(update)
    eval_step = sft.make_eval_step(job.graphdef, mesh, shardings_of(job.full(job.state.params)))
    has_eval = cfg.data.eval_split is not None or cfg.data.eval_split_ratio > 0
    evaluate = functools.partial(eval_loss, job, tokenizer, eval_step, mesh)

    # 4. The loop.
    state = job.state
    with job, loop.Loop(state, total_steps=total, writers=job.writers, logging_steps=t.logging_steps,
                        eval_fn=evaluate if has_eval else None, eval_steps=t.eval_steps,
                        checkpointer=job.checkpointer,
                        flops_per_token=metrics_lib.flops_per_token(cfg.model, row_length(cfg.data),
                                                                    param_count(cfg.model)),
                        peak_flops=metrics_lib.peak_flops_per_device(jax.devices()[0],
                                                                     t.peak_flops_per_device)) as steps:
        for _ in steps:
            state, metrics = train_step(state, to_global(next(batches), mesh))
            steps.end_step(state, metrics, data_state=batches.get_state())

    # 5. Export.
    return setup.finish(job, steps.result, tokenizer, "config.yaml, metrics.jsonl, checkpoints/")


def prepare(cfg: TrainConfig, mesh, *, total_steps: int) -> tuple[setup.AbstractRun, Any, dict]:
    """(the run's shapes, its update step, the programs memory.report compiles): nothing is
    allocated, so a dry run calls this alone."""
    b = cfg.batch
    shapes = setup.abstract_run(cfg, mesh, total_steps=total_steps)
    accum = accumulation_steps(b.global_batch_size, b.micro_batch_size, parallel.data_parallel_size(mesh))
    update = make_train_step(sft.make_sft_loss(shapes.graphdef), shapes.optimizer, accum_steps=accum, mesh=mesh,
                             state_shardings=shapes.shardings, schedule=shapes.schedule, frozen=shapes.frozen,
                             combine=lora.combine, row_keys=cfg.model.lora.dropout > 0)
    rows = parallel.batch_sharding(mesh)
    batch = Batch(*(jax.ShapeDtypeStruct((b.global_batch_size, row_length(cfg.data)), dtype, sharding=rows)
                    for dtype in (jnp.int32, jnp.int32, jnp.int32, jnp.float32)))
    return shapes, update, {"update step": (update.jitted, (shapes.state, batch, None, shapes.frozen))}


def eval_loss(job: setup.Job, tokenizer, eval_step, mesh, state) -> dict:
    """Loss and perplexity over the whole eval split."""
    cfg = job.cfg
    rows = sft_batches(cfg.data, tokenizer, split="eval", batch_size=cfg.batch.eval_batch_size, seed=cfg.seed,
                       num_epochs=1)
    return sft.evaluate(eval_step, job.full(state.params), (to_global(r, mesh) for r in rows))
