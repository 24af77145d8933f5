"""Teacher RCL (and plain GRPO): on-policy rollouts, group advantages, one GRPO update.

  1. Load the teacher (trained) and the student (frozen: no gradients, no optimizer state).
  2. Each step, roll out from the teacher's CURRENT parameters: the student's baseline and
     diagnostic, G guidance samples, the student's solutions with each (plain GRPO: G
     answers checked against the ground truth).
  3. Rewards -> group advantages; reference log-probs when beta > 0.
  4. One accumulated GRPO update; every ref_model_sync_steps the reference moves toward
     the policy. Metrics, samples, checkpoints and evaluation as in SFT's loop.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time

import jax
import numpy as np
from flax import nnx

from atlas_jax import parallel
from atlas_jax.config import TrainConfig, accumulation_steps, to_yaml
from atlas_jax.data import rl_batches, rl_num_examples
from atlas_jax.models import load_model, load_tokenizer, lora
from atlas_jax.rl import policy, rollout
from atlas_jax.rl.grpo import group_advantages
from atlas_jax.rl.samples import SampleWriter, sample_records
from atlas_jax.rl.student import load_student
from atlas_jax.train import checkpoint, loop, metrics as metrics_lib, offload
from atlas_jax.train.checkpoint import Checkpointer
from atlas_jax.train.optim import make_optimizer, make_schedule
from atlas_jax.train.step import make_train_step


def run(cfg: TrainConfig, mesh) -> dict:
    t, out = cfg.trainer, pathlib.Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(to_yaml(cfg))
    teaching = cfg.run != "grpo"
    G = t.num_generations
    prompts_per_step = cfg.batch.global_batch_size // G

    # 1. Teacher (the policy) and the frozen student.
    teacher = load_model(cfg.model, mesh=mesh, seed=cfg.seed)
    tokenizer = load_tokenizer(cfg.model)
    # with LoRA only adapters train; the frozen base is also the reference (adapters off)
    graphdef, params, frozen = lora.split_trainable(teacher)
    del teacher  # its arrays now live in params / frozen only (offload may move frozen)
    full = lambda p: lora.full_params(p, frozen)  # noqa: E731

    # 2. Prompts.
    # Every process drives the same global rollout, so every process reads the same prompts.
    prompts = rl_batches(cfg.data, split="train", batch_size=prompts_per_step * t.generation_aggregation_steps,
                         seed=cfg.seed, process_index=0, process_count=1)
    eval_records = evaluation_records(cfg)

    # 3. Optimizer, state (policy + reference), resume.
    total = loop.total_steps(t, rl_num_examples(cfg.data, split="train") * G, cfg.batch.global_batch_size)
    optimizer, schedule = make_optimizer(t, total), make_schedule(t, total)
    state, shardings = policy.create_rl_state(params, optimizer, mesh, seed=cfg.seed,
                                              with_ref=t.beta > 0 and frozen is None)
    state, shardings, frozen = offload.apply(state, shardings, frozen, offload.resolve(t.offload, mesh))
    # After offload, a student that is the teacher's base shares the (possibly host) frozen
    # arrays; `params` were donated into the state, so the student is built from state.params.
    student, student_tok = (load_student(cfg, mesh, graphdef, state.params, tokenizer, frozen) if teaching
                            else (None, None))
    checkpointer = Checkpointer(str(out / "checkpoints"), save_steps=t.save_steps, max_to_keep=t.save_total_limit)
    state = checkpoint.resume(checkpointer, cfg.resume_from, state, prompts)

    # 4. The step: rollout from the current policy, then the update.
    accum = accumulation_steps(cfg.batch.global_batch_size, cfg.batch.micro_batch_size,
                               parallel.data_parallel_size(mesh))
    update = make_train_step(policy.make_grpo_loss(graphdef, t), optimizer, accum_steps=accum, mesh=mesh,
                             state_shardings=shardings, totals_fn=policy.grpo_totals, schedule=schedule,
                             frozen=frozen, combine=lora.combine, row_keys=cfg.model.lora.dropout > 0)
    logprobs = policy.make_logprob_fn(graphdef, mesh, jax.tree.map(lambda x: x.sharding, full(state.params)),
                                      t.temperature, accum)
    reference = (lambda s: s.ref_params) if frozen is None else (lambda s: full(lora.disabled(s.params)))  # noqa: E731
    mixup = (policy.make_ref_mixup(shardings.params)
             if t.sync_ref_model and t.beta > 0 and frozen is None else None)
    samples = SampleWriter(out / "completions.jsonl", t.save_completions_probability, cfg.seed)
    queue: list = []

    def episode(current, records, seed, *, num_generations, temperature):
        model = nnx.merge(graphdef, current)
        if teaching:
            return rollout.teaching_episode(model, student, tokenizer, student_tok, records, trainer=t,
                                            reward=cfg.reward, num_generations=num_generations,
                                            temperature=temperature, seed=seed, mesh=mesh,
                                            teacher_system=rollout.teacher_system(cfg.data))
        return rollout.answer_episode(model, tokenizer, records, trainer=t, reward=cfg.reward,
                                      num_generations=num_generations, temperature=temperature, seed=seed,
                                      mesh=mesh)

    def next_batch(state):
        if not queue:  # one rollout serves generation_aggregation_steps x num_iterations updates
            start = time.perf_counter()
            step = int(jax.device_get(state.step))
            records = next(prompts)
            ep = episode(full(state.params), records, cfg.seed * 1_000_003 + step,
                         num_generations=G, temperature=t.temperature)
            samples.write(sample_records(ep, records, G))
            advantages, group_std = group_advantages(ep.rewards, G, t.scale_rewards)
            batch_np, _ = rollout.training_batch(ep.policy, mask_truncated=t.mask_truncated_completions)
            stats = {**ep.metrics(), "frac_reward_zero_std": float(np.mean(np.asarray(group_std) < 1e-6))}
            updates = []
            for chunk in np.array_split(np.arange(len(ep.rewards)), t.generation_aggregation_steps):
                batch = jax.tree.map(lambda x: parallel.shard_rows(x[chunk], mesh), batch_np)
                extras = {"advantages": parallel.shard_rows(np.asarray(advantages)[chunk], mesh)}
                if t.beta > 0:
                    extras["ref_logp"] = logprobs(reference(state), batch)
                if t.num_iterations > 1:
                    extras["old_logp"] = logprobs(full(state.params), batch)
                updates.extend([(batch, extras)] * t.num_iterations)
            stats["rollout_time_s"] = time.perf_counter() - start
            queue.extend((batch, extras, stats) for batch, extras in updates)
        return queue.pop(0)

    def step_fn(state, item):
        batch, extras, stats = item
        start = time.perf_counter()
        state, device_metrics = update(state, batch, extras)
        step = int(jax.device_get(state.step))  # the next rollout needs these params anyway
        if mixup is not None and step % t.ref_model_sync_steps == 0:
            state = state.replace(ref_params=mixup(state.ref_params, state.params, t.ref_model_mixup_alpha))
        return state, {**device_metrics, **stats, "update_time_s": time.perf_counter() - start}

    def evaluate(state):
        records = [r for batch in eval_records for r in batch]
        ep = episode(full(state.params), records, cfg.seed, num_generations=1, temperature=0.0)
        return ep.metrics()

    writers = metrics_lib.Writers(str(out), t.report_to, total_steps=total, initial_step=int(state.step),
                                  run_name=cfg.run, config=json.loads(json.dumps(dataclasses.asdict(cfg), default=str)))
    try:
        result = loop.train_loop(state, step_fn, next_batch, total_steps=total, writers=writers,
                                 logging_steps=t.logging_steps, eval_fn=evaluate if eval_records else None,
                                 eval_steps=t.eval_steps, checkpointer=checkpointer,
                                 data_state=prompts.get_state)
    finally:
        writers.close()
        checkpointer.close()
    writers.message(f"{cfg.run}: {result.step} steps; outputs in {out} (metrics.jsonl, checkpoints/, "
                    f"completions.jsonl)")
    return {"output_dir": str(out), "checkpoints": str(out / "checkpoints"), "steps": result.step,
            "metrics": result.last_metrics}


def evaluation_records(cfg: TrainConfig) -> list:
    """The eval split's prompts, capped by data.max_eval_samples; [] when there is none."""
    if cfg.data.eval_split_ratio <= 0 and cfg.data.eval_split is None:
        return []
    size = cfg.data.max_eval_samples or cfg.batch.eval_batch_size
    batches = rl_batches(cfg.data, split="eval", batch_size=size, seed=cfg.seed, num_epochs=1,
                         process_index=0, process_count=1)
    return [next(batches)]
