"""Teacher RCL (and plain GRPO): on-policy rollouts, group advantages, GRPO updates.

  1. Prompts, and the step count.
  2. The run as shapes, its GRPO update and the rollout's sampling program compiled for
     them: the memory plan, checked against the devices' before anything loads.
  3. The teacher (the policy, trained) with its optimizer, state and reference, set up and
     resumed as SFT's; the frozen student (no gradients, no optimizer state); the
     old/reference log-prob pass, the reference's mixup.
  4. For each rollout: sample from the teacher's CURRENT parameters and score (RCL: the
     student's baseline and diagnostic, G guidance samples, the student's solutions with
     each; plain GRPO: G answers checked against the ground truth); the rollout becomes
     generation_aggregation_steps x num_iterations updates (rl/updates.py). For each update:
     step, then log, save (with the updates left of the rollout) and evaluate.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from atlas_jax import memory, parallel
from atlas_jax.config import TrainConfig, accumulation_steps
from atlas_jax.data import Batch, rl_batches, rl_num_examples
from atlas_jax.generation import sampler
from atlas_jax.models import load_tokenizer, lora
from atlas_jax.rl import episodes, packing, policy, rollout, updates
from atlas_jax.rl.samples import SampleWriter, sample_records
from atlas_jax.rl.student import load_student
from atlas_jax.train import loop, setup
from atlas_jax.train.state import shardings_of
from atlas_jax.train.step import make_train_step


def run(cfg: TrainConfig, mesh) -> dict:
    t, G = cfg.trainer, cfg.trainer.num_generations

    # 1. Tokenizer and prompts: every process drives the same global rollout, so every process
    #    reads the same ones.
    tokenizer = load_tokenizer(cfg.model)
    per_rollout = cfg.batch.global_batch_size // G * t.generation_aggregation_steps
    prompts = rl_batches(cfg.data, split="train", batch_size=per_rollout, seed=cfg.seed, process_index=0,
                         process_count=1)
    total = loop.total_steps(t, rl_num_examples(cfg.data, split="train") * G, cfg.batch.global_batch_size)

    # 2. The run as shapes (nothing allocated), its GRPO update and the rollout's sampling
    #    program compiled for them: the memory plan, refused here when it cannot fit.
    shapes, grpo_update, programs = prepare(cfg, mesh, total_steps=total, stop_tokens=len(rollout.eos_ids(tokenizer)))
    memory.report(cfg, mesh, programs)

    # 3. Teacher, optimizer, state (+ a reference copy; with LoRA the frozen base is the reference),
    #    checkpointer, writers, resume; then the student. A student that is the teacher's base
    #    shares the (possibly offloaded) frozen arrays; it is built from the state's params.
    job = setup.start(cfg, mesh, shapes, total_steps=total, batches=prompts, create_state=functools.partial(
        policy.create_rl_state, with_ref=_with_ref(cfg)))
    student, student_tok = (load_student(cfg, mesh, job.graphdef, job.state.params, tokenizer, job.frozen)
                            if cfg.run != "grpo" else (None, None))
    players = episodes.Players(job.graphdef, job.frozen, tokenizer, student, student_tok,
                               rollout.teacher_system(cfg.data))

    # The update, log-probs of the old and reference policies, the reference's mixup.
    update = job.bind(grpo_update)
    logprobs = policy.make_logprob_fn(job.graphdef, mesh, shardings_of(job.full(job.state.params)), t.temperature,
                                      _accumulation(cfg, mesh))
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
                                                mesh=mesh, started=started, accum_steps=_accumulation(cfg, mesh))
            batch, extras, stats = queue.pop()
            started = time.perf_counter()
            state, metrics = update(state, batch, extras)
            jax.block_until_ready(state.step)  # the next rollout needs these params anyway
            if mixup is not None and step % t.ref_model_sync_steps == 0:
                state = state.replace(ref_params=mixup(state.ref_params, state.params, t.ref_model_mixup_alpha))
            steps.end_step(state, {**metrics, **stats, "update_time_s": time.perf_counter() - started},
                           data_state=prompts.get_state(), pending=queue)

    return setup.finish(job, steps.result, tokenizer, "config.yaml, metrics.jsonl, checkpoints/, completions.jsonl")


def prepare(cfg: TrainConfig, mesh, *, total_steps: int, stop_tokens: int = 1) -> tuple[setup.AbstractRun, Any, dict]:
    """(the run's shapes, its GRPO update step, the programs memory.report compiles: the update
    on the longest rows a rollout can make, the policy's sampling program for a rollout's
    prompts, `stop_tokens` EOS ids, and its decode once half the rows have finished); nothing
    is allocated, so a dry run calls this alone."""
    t, b = cfg.trainer, cfg.batch
    shapes = setup.abstract_run(cfg, mesh, total_steps=total_steps,
                                abstract_state=functools.partial(abstract_rl_state, with_ref=_with_ref(cfg)))
    update = make_train_step(policy.make_grpo_loss(shapes.graphdef, t), shapes.optimizer,
                             accum_steps=_accumulation(cfg, mesh), mesh=mesh, state_shardings=shapes.shardings,
                             totals_fn=policy.grpo_totals, schedule=shapes.schedule, frozen=shapes.frozen,
                             combine=lora.combine, row_keys=cfg.model.lora.dropout > 0)
    # rollout.sample's clamp: prompt + completion inside the model's window
    window = cfg.model.max_position_embeddings
    prompt = min(t.max_prompt_length, window - min(t.max_completion_length, window // 2))
    completion = min(t.max_completion_length, window - prompt)
    B, T = b.global_batch_size, prompt + completion

    def sds(shape, dtype):  # rows over the data axes, as parallel.shard_rows puts them
        return jax.ShapeDtypeStruct(shape, dtype, sharding=parallel.batch_sharding(mesh, len(shape)))

    R, W = B, T  # the update's rows
    extras = {"advantages": sds((R,), jnp.float32)}
    if t.padding_free:  # packed rows (rl/packing.py): its largest layout, per-token advantages
        R, W = packing.packed_layout(B, T, _accumulation(cfg, mesh) * parallel.data_parallel_size(mesh))
        extras = {"advantages": sds((R, W), jnp.float32), "sequence_tokens": sds((R, W), jnp.float32),
                  "sequences": sds((R,), jnp.float32)}
    batch = Batch(sds((R, W), jnp.int32), sds((R, W), jnp.int32), sds((R, W), jnp.int32), sds((R, W), jnp.float32))
    if t.beta > 0:
        extras["ref_logp"] = sds((R, W), jnp.float32)
    if t.num_iterations > 1:
        extras["old_logp"] = sds((R, W), jnp.float32)
    sampler_model = nnx.merge(shapes.graphdef, lora.full_params(shapes.state.params, shapes.frozen))
    sampling = dict(prompts=B // t.num_generations * t.generation_aggregation_steps, prompt_length=prompt,
                    max_new_tokens=completion, num_samples=t.num_generations, sort=t.top_k > 0 or t.top_p < 1.0,
                    stop_tokens=stop_tokens)
    programs = {"update step": (update.jitted, (shapes.state, batch, extras, shapes.frozen)),
                "generation": sampler.abstract_call(sampler_model, mesh, **sampling)}
    shrunk = sampler.abstract_continue(sampler_model, mesh, **sampling) if stop_tokens else None
    if shrunk is not None:  # the decode goes on with half the rows: both batches' caches live at once
        programs["shrunk decode"] = shrunk
    return shapes, update, programs


def abstract_rl_state(params, optimizer, mesh, *, with_ref: bool):
    """policy.create_rl_state's (state, shardings) as ShapeDtypeStructs: nothing allocated."""
    state, shardings = setup.abstract_train_state(params, optimizer, mesh)
    fields = lambda s: {f: getattr(s, f) for f in ("params", "opt_state", "step", "rng")}  # noqa: E731
    return (policy.RLState(**fields(state), ref_params=params if with_ref else None),
            policy.RLState(**fields(shardings), ref_params=shardings.params if with_ref else None))


def _with_ref(cfg: TrainConfig) -> bool:
    """A reference copy for the KL term; with LoRA the frozen base is the reference."""
    return cfg.trainer.beta > 0 and cfg.model.lora.rank == 0


def _accumulation(cfg: TrainConfig, mesh) -> int:
    return accumulation_steps(cfg.batch.global_batch_size, cfg.batch.micro_batch_size,
                              parallel.data_parallel_size(mesh))


def evaluation_records(cfg: TrainConfig) -> list:
    """The eval split's prompts, capped by data.max_eval_samples; [] when there is none."""
    if cfg.data.eval_split_ratio <= 0 and cfg.data.eval_split is None:
        return []
    size = cfg.data.max_eval_samples or cfg.batch.eval_batch_size
    batches = rl_batches(cfg.data, split="eval", batch_size=size, seed=cfg.seed, num_epochs=1,
                         process_index=0, process_count=1)
    return list(next(batches))
