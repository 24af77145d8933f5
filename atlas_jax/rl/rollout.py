"""Rollouts: sampling from a model on text prompts, and the teacher-student episode.

The teacher RCL episode for a batch of problems:
  0. the student answers alone (the baseline);
  1. the student writes a short diagnostic of its approach (`reward.max_probe_tokens`);
  2. the teacher writes G guidance samples from its CURRENT parameters;
  3. the student solves each problem with each guidance.
Answers are checked on the host; the adaptive-teaching reward scores each guidance.
The teacher's own prompt and sampled tokens become its training batch, so the update
conditions on exactly the prompt it generated from.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any, Optional, Sequence

import jax.numpy as jnp
import numpy as np

from atlas_jax import parallel
from atlas_jax.config import DataConfig, RewardConfig, TrainerConfig
from atlas_jax.data import ADAPTIVE_TEACHING_SYSTEM_PROMPT
from atlas_jax.data.batch import Batch
from atlas_jax.generation import generate
from atlas_jax.rl import rewards as rewards_lib

_BUCKET = 64  # prompt lengths are padded to a multiple of this so shapes repeat
log = logging.getLogger(__name__)
_warn_once = functools.cache(log.warning)  # a repeated message is logged once per process


@dataclasses.dataclass
class Completions:
    """Left-padded prompts [B, Tp] and their sampled continuations [B, Tc]."""

    prompt_ids: np.ndarray
    prompt_mask: np.ndarray
    tokens: np.ndarray
    logprobs: np.ndarray
    lengths: np.ndarray
    texts: list[str]
    truncated: np.ndarray  # bool [B]: the budget ran out before an end-of-sequence token


def teacher_system(data: DataConfig) -> str:
    """The system prompt SFT trained the teacher under, so RL prompts it the same way."""
    return data.system_prompt if data.system_prompt is not None else ADAPTIVE_TEACHING_SYSTEM_PROMPT


def eos_ids(tokenizer) -> list[int]:
    """End-of-sequence ids: the tokenizer's EOS plus chat turn ends (Qwen stops on both)."""
    ids = {tokenizer.eos_token_id}
    for token in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>"):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id and token_id >= 0:
            ids.add(token_id)
    return sorted(i for i in ids if i is not None)


def chat_prompt(tokenizer, user_text: str, system: Optional[str] = None) -> str:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user_text}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode_left_padded(tokenizer, texts: Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids [B, Tp] left-padded to a bucketed length; over-long prompts keep their end."""
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"][-max_length:] for t in texts]
    width = max(len(e) for e in encoded)
    width = min(-(-width // _BUCKET) * _BUCKET, max(max_length, width))
    ids = np.full((len(texts), width), tokenizer.pad_token_id, np.int32)
    mask = np.zeros((len(texts), width), np.int32)
    for row, e in enumerate(encoded):
        ids[row, width - len(e):] = e
        mask[row, width - len(e):] = 1
    return ids, mask


def sample(model, tokenizer, prompts: Sequence[str], *, max_prompt_length: int, max_new_tokens: int,
           temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0,
           num_samples: int = 1, seed: int = 0, mesh=None, system: Optional[str] = None) -> Completions:
    """Chat-formats `prompts`, samples `num_samples` continuations each (prompt-major rows).

    Prompt plus completion stay inside the model's context window: prompts keep their end
    and the token budget shrinks to the room left, with a warning (a tiny model's window
    is smaller than the recipe's 4096 + 4096).
    """
    window = model.config.max_position_embeddings
    prompt_cap = min(max_prompt_length, window - min(max_new_tokens, window // 2))
    ids, mask = encode_left_padded(tokenizer, [chat_prompt(tokenizer, p, system) for p in prompts],
                                   prompt_cap)
    room = window - int(mask.sum(axis=1).max())
    if max_new_tokens > room or prompt_cap < max_prompt_length:
        _warn_once(f"max_prompt_length={max_prompt_length} + max_new_tokens={max_new_tokens} exceed the "
                   f"model's max_position_embeddings={window}; clamped to its window")
        max_new_tokens = min(max_new_tokens, room)
    stop = eos_ids(tokenizer)
    out = generate(model, jnp.asarray(ids), jnp.asarray(mask), max_new_tokens=max_new_tokens,
                   temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, eos_token_id=stop,
                   pad_token_id=tokenizer.pad_token_id, seed=seed, num_samples=num_samples, mesh=mesh)
    tokens, logprobs, lengths = (parallel.to_host(x) for x in (out.tokens, out.logprobs, out.lengths))
    last = tokens[np.arange(len(tokens)), np.maximum(lengths - 1, 0)]
    truncated = ~np.isin(last, stop) | (lengths == 0)
    texts = tokenizer.batch_decode([t[:n] for t, n in zip(tokens, lengths)], skip_special_tokens=True)
    return Completions(np.repeat(ids, num_samples, 0), np.repeat(mask, num_samples, 0),
                       tokens, logprobs, lengths, texts, truncated)


def training_batch(c: Completions, *, mask_truncated: bool) -> tuple[Batch, np.ndarray]:
    """Prompt + completion rows as a Batch whose loss mask covers the sampled tokens only.

    Returns the batch and the sampler's log-probs aligned to its tokens (0 off the mask).
    """
    B, Tp = c.prompt_ids.shape
    Tc = c.tokens.shape[1]
    completion_valid = np.arange(Tc)[None, :] < c.lengths[:, None]
    if mask_truncated:
        completion_valid &= ~c.truncated[:, None]
    tokens = np.concatenate([c.prompt_ids, c.tokens], axis=1).astype(np.int32)
    present = np.concatenate([c.prompt_mask.astype(bool), np.arange(Tc)[None, :] < c.lengths[:, None]], 1)
    positions = np.maximum(np.cumsum(present, axis=1) - 1, 0).astype(np.int32)
    loss_mask = np.concatenate([np.zeros((B, Tp), bool), completion_valid], axis=1)
    old = np.concatenate([np.zeros((B, Tp), np.float32), np.where(completion_valid, c.logprobs, 0.0)], 1)
    batch = Batch(tokens=tokens, positions=positions, segment_ids=present.astype(np.int32),
                  loss_mask=loss_mask.astype(np.float32))
    return batch, old.astype(np.float32)


@dataclasses.dataclass
class TeachingEpisode:
    """One RCL episode over P problems with G guidance samples each (rows prompt-major)."""

    teacher: Completions  # [P*G]
    rewards: np.ndarray  # [P*G]
    perf_with: np.ndarray  # [P*G] student accuracy with each guidance
    perf_baseline: np.ndarray  # [P*G] (repeated per problem)
    teaching_length: np.ndarray  # [P*G] tokens of the extracted guidance
    baseline: Completions  # [P]
    probe: Completions  # [P]
    with_teaching: Completions  # [P*G]
    has_answer: np.ndarray  # [P*G] bool

    @property
    def policy(self) -> Completions:
        """The trained model's samples (the teacher's guidance)."""
        return self.teacher

    def metrics(self) -> dict[str, float]:
        d = self.perf_with - self.perf_baseline
        scored = self.has_answer
        frac = lambda x: float(np.mean(x[scored])) if scored.any() else 0.0  # noqa: E731
        eff = 100.0 / (100.0 + self.teaching_length)
        return {
            "student_accuracy": frac(self.perf_with),
            "baseline_accuracy": frac(self.perf_baseline),
            "accuracy_delta": frac(d),
            "improvement_rate": frac(d > 1e-6),
            "degradation_rate": frac(d < -1e-6),
            "non_degradation_rate": frac(d >= -1e-6),
            "teaching_length_mean": float(self.teaching_length.mean()),
            "teaching_length_std": float(self.teaching_length.std()),
            "student_approach_length": float(self.probe.lengths.mean()),
            "token_efficiency": float(eff.mean()),
            "student_response_length_with": float(self.with_teaching.lengths.mean()),
            "student_response_length_baseline": float(self.baseline.lengths.mean()),
            "reward": float(self.rewards.mean()),
            "reward_std": float(self.rewards.std()),
        }


def teaching_episode(teacher, student, teacher_tok, student_tok, records: Sequence[dict[str, Any]], *,
                     trainer: TrainerConfig, reward: RewardConfig, num_generations: int,
                     temperature: float, seed: int, mesh=None,
                     teacher_system: Optional[str] = None) -> TeachingEpisode:
    """Runs steps 0-3 of the episode and scores every guidance sample.

    teacher_system: the teacher's system prompt; pass the one SFT trained it under.
    """
    G = num_generations
    problems = [r["prompt"] for r in records]
    answers = [str(r.get("ground_truth") or "") for r in records]
    budget = dict(max_prompt_length=trainer.max_prompt_length, mesh=mesh)
    student_budget = dict(budget, max_new_tokens=trainer.max_completion_length)

    baseline = sample(student, student_tok, [reward.student_baseline_template.format(problem=p)
                                             for p in problems], seed=seed, **student_budget)
    probe = sample(student, student_tok, [reward.probe_template.format(problem=p) for p in problems],
                   max_new_tokens=reward.max_probe_tokens, seed=seed + 1, **budget)
    teacher_out = sample(teacher, teacher_tok,
                         [reward.teacher_template.format(problem=p, approach=a)
                          for p, a in zip(problems, probe.texts)],
                         max_new_tokens=trainer.max_completion_length, temperature=temperature,
                         top_p=trainer.top_p, top_k=trainer.top_k, min_p=trainer.min_p,
                         num_samples=G, seed=seed + 2, system=teacher_system, **budget)
    guidance = [rewards_lib.extract_teaching(t) for t in teacher_out.texts]
    problems_G = [p for p in problems for _ in range(G)]
    answers_G = [a for a in answers for _ in range(G)]
    with_teaching = sample(student, student_tok,
                           [reward.student_with_teaching_template.format(problem=p, teaching=g)
                            for p, g in zip(problems_G, guidance)], seed=seed + 3, **student_budget)

    perf_with = rewards_lib.score_responses(with_teaching.texts, answers_G)
    perf_baseline = np.repeat(rewards_lib.score_responses(baseline.texts, answers), G)
    teaching_length = np.asarray([len(teacher_tok(g, add_special_tokens=False)["input_ids"])
                                  for g in guidance], np.float32)
    has_answer = np.asarray([bool(a.strip()) for a in answers_G])
    scores = rewards_lib.get_reward(reward.name)(
        reward, perf_with_teaching=jnp.asarray(perf_with), perf_baseline=jnp.asarray(perf_baseline),
        teaching_length=jnp.asarray(teaching_length), has_answer=jnp.asarray(has_answer))
    return TeachingEpisode(teacher_out, np.asarray(scores), perf_with, perf_baseline, teaching_length,
                           baseline, probe, with_teaching, has_answer)


@dataclasses.dataclass
class AnswerEpisode:
    """Plain GRPO: the policy answers each problem G times; answers are checked."""

    policy: Completions  # [P*G]
    correct: np.ndarray  # [P*G]
    rewards: np.ndarray  # [P*G]

    def metrics(self) -> dict[str, float]:
        return {"accuracy": float(self.correct.mean()), "reward": float(self.rewards.mean()),
                "reward_std": float(self.rewards.std()),
                "completion_length": float(self.policy.lengths.mean()),
                "truncated_rate": float(self.policy.truncated.mean())}


def answer_episode(policy, tokenizer, records: Sequence[dict[str, Any]], *, trainer: TrainerConfig,
                   reward: RewardConfig, num_generations: int, temperature: float, seed: int,
                   mesh=None) -> AnswerEpisode:
    """Samples G answers per problem (prompted by the reward's baseline template) and scores them."""
    G = num_generations
    answers_G = [str(r.get("ground_truth") or "") for r in records for _ in range(G)]
    out = sample(policy, tokenizer, [reward.student_baseline_template.format(problem=r["prompt"])
                                     for r in records],
                 max_prompt_length=trainer.max_prompt_length, max_new_tokens=trainer.max_completion_length,
                 temperature=temperature, top_p=trainer.top_p, top_k=trainer.top_k, min_p=trainer.min_p,
                 num_samples=G, seed=seed, mesh=mesh)
    correct = rewards_lib.score_responses(out.texts, answers_G)
    has_answer = np.asarray([bool(a.strip()) for a in answers_G])
    scores = rewards_lib.get_reward(reward.name)(reward, correct=jnp.asarray(correct),
                                                 has_answer=jnp.asarray(has_answer))
    return AnswerEpisode(out, correct, np.asarray(scores))
