"""Teacher RCL (and plain GRPO): on-policy rollouts, group advantages, GRPO updates.

  1. Prompts, and the step count.
  2. The teacher (the policy, trained) with its optimizer, state and reference, set up and
     resumed as SFT's; the frozen student (no gradients, no optimizer state).
  3. The GRPO update, the old/reference log-prob pass, the reference's mixup.
  4. For each rollout: sample from the teacher's CURRENT parameters and score (RCL: the
     student's baseline and diagnostic, G guidance samples, the student's solutions with
     each; plain GRPO: G answers checked against the ground truth); the rollout becomes
     generation_aggregation_steps x num_iterations updates (rl/updates.py). For each update:
     step, then log, save (with the updates left of the rollout) and evaluate.
"""

from __future__ import annotations

import functools
import time

import jax

from atlas_jax import parallel
from atlas_jax.config import TrainConfig, accumulation_steps
from atlas_jax.data import rl_batches, rl_num_examples
from atlas_jax.models import load_tokenizer, lora
from atlas_jax.rl import episodes, policy, rollout, updates
from atlas_jax.rl.samples import SampleWriter, sample_records
from atlas_jax.rl.student import load_student
from atlas_jax.train import loop, setup
from atlas_jax.train.state import shardings_of
from atlas_jax.train.step import make_train_step


def run(cfg: TrainConfig, mesh) -> dict:
    t, G = cfg.trainer, cfg.trainer.num_generations

    # 1. Prompts: every process drives the same global rollout, so every process reads the same ones.
    per_rollout = cfg.batch.global_batch_size // G * t.generation_aggregation_steps
    prompts = rl_batches(cfg.data, split="train", batch_size=per_rollout, seed=cfg.seed, process_index=0,
                         process_count=1)
    total = loop.total_steps(t, rl_num_examples(cfg.data, split="train") * G, cfg.batch.global_batch_size)

    # 2. Teacher, optimizer, state (+ a reference copy; with LoRA the frozen base is the reference),
    #    checkpointer, writers, resume; then the student. A student that is the teacher's base
    #    shares the (possibly offloaded) frozen arrays; it is built from the state's params.
    tokenizer = load_tokenizer(cfg.model)
    job = setup.start(cfg, mesh, total_steps=total, batches=prompts, create_state=functools.partial(
        policy.create_rl_state, with_ref=t.beta > 0 and cfg.model.lora.rank == 0))
    student, student_tok = (load_student(cfg, mesh, job.graphdef, job.state.params, tokenizer, job.frozen)
                            if cfg.run != "grpo" else (None, None))
    players = episodes.Players(job.graphdef, job.frozen, tokenizer, student, student_tok,
                               rollout.teacher_system(cfg.data))

    # 3. The update, log-probs of the old and reference policies, the reference's mixup.
    accum = accumulation_steps(cfg.batch.global_batch_size, cfg.batch.micro_batch_size,
                               parallel.data_parallel_size(mesh))
    update = make_train_step(policy.make_grpo_loss(job.graphdef, t), job.optimizer, accum_steps=accum, mesh=mesh,
                             state_shardings=job.shardings, totals_fn=policy.grpo_totals, schedule=job.schedule,
                             frozen=job.frozen, combine=lora.combine, row_keys=cfg.model.lora.dropout > 0)
    logprobs = policy.make_logprob_fn(job.graphdef, mesh, shardings_of(job.full(job.state.params)), t.temperature,
                                      accum)
    mixup = (policy.make_ref_mixup(job.shardings.params)
             if t.sync_ref_model and job.state.ref_params is not None else None)
    samples = SampleWriter(job.out / "completions.jsonl", t.save_completions_probability, cfg.seed)
    eval_records = evaluation_records(cfg)
    evaluate = functools.partial(episodes.evaluate, players, eval_records, trainer=t, reward=cfg.reward,
                                 seed=cfg.seed, mesh=mesh)

    # 4. The algorithm. A checkpoint that fell mid-rollout brings back the updates left of it.
    state, queue = job.state, updates.UpdateQueue.restored(job.carried)
    with job, loop.Loop(state, total_steps=total, writers=job.writers, logging_steps=t.logging_steps,
                        eval_fn=evaluate if eval_records else None, eval_steps=t.eval_steps,
                        checkpointer=job.checkpointer) as steps:
        for step in steps:
            if not queue:  # roll out from the current policy: sample, score, cut into updates
                started = time.perf_counter()
                records = next(prompts)
                episode = episodes.run_episode(players, state.params, records, trainer=t, reward=cfg.reward,
                                               num_generations=G, temperature=t.temperature,
                                               seed=cfg.seed * 1_000_003 + step - 1, mesh=mesh)
                samples.write(sample_records(episode, records, G))
                queue = updates.rollout_updates(episode, state, frozen=job.frozen, logprobs=logprobs, trainer=t,
                                                mesh=mesh, started=started)
            batch, extras, stats = queue.pop()
            started = time.perf_counter()
            state, metrics = update(state, batch, extras)
            jax.block_until_ready(state.step)  # the next rollout needs these params anyway
            if mixup is not None and step % t.ref_model_sync_steps == 0:
                state = state.replace(ref_params=mixup(state.ref_params, state.params, t.ref_model_mixup_alpha))
            steps.end_step(state, {**metrics, **stats, "update_time_s": time.perf_counter() - started},
                           data_state=prompts.get_state(), pending=queue)

    return setup.finish(job, steps.result, tokenizer, "config.yaml, metrics.jsonl, checkpoints/, completions.jsonl")


def evaluation_records(cfg: TrainConfig) -> list:
    """The eval split's prompts, capped by data.max_eval_samples; [] when there is none."""
    if cfg.data.eval_split_ratio <= 0 and cfg.data.eval_split is None:
        return []
    size = cfg.data.max_eval_samples or cfg.batch.eval_batch_size
    batches = rl_batches(cfg.data, split="eval", batch_size=size, seed=cfg.seed, num_epochs=1,
                         process_index=0, process_count=1)
    return list(next(batches))
