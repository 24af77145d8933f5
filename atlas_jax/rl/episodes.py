"""One episode of RCL (teacher guides a frozen student) or plain GRPO (the policy answers).

`Players` are the models an episode runs; the policy's trained parameters come with each
call (they change every update). `run_episode` samples and scores; `evaluate` is the greedy
episode the training loop logs as eval/<metric>.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

from flax import nnx

from atlas_jax.config import RewardConfig, TrainerConfig
from atlas_jax.models import lora
from atlas_jax.rl import rollout
from atlas_jax.rl.report import teaching_report


@dataclasses.dataclass(frozen=True)
class Players:
    """The policy's graph and frozen LoRA base (or None), its tokenizer, and for RCL the frozen
    student with its tokenizer and the teacher's system prompt (student None: plain GRPO)."""

    graphdef: nnx.GraphDef
    frozen: Any
    tokenizer: Any
    student: Any = None
    student_tokenizer: Any = None
    teacher_system: Optional[str] = None


def run_episode(players: Players, params, records: Sequence[dict], *, trainer: TrainerConfig,
                reward: RewardConfig, num_generations: int, temperature: float, seed: int, mesh=None):
    """A TeachingEpisode (RCL) or an AnswerEpisode (plain GRPO) sampled from `params`."""
    policy = nnx.merge(players.graphdef, lora.full_params(params, players.frozen))
    if players.student is None:
        return rollout.answer_episode(policy, players.tokenizer, records, trainer=trainer, reward=reward,
                                      num_generations=num_generations, temperature=temperature, seed=seed, mesh=mesh)
    return rollout.teaching_episode(policy, players.student, players.tokenizer, players.student_tokenizer, records,
                                    trainer=trainer, reward=reward, num_generations=num_generations,
                                    temperature=temperature, seed=seed, mesh=mesh,
                                    teacher_system=players.teacher_system)


def evaluate(players: Players, records: Sequence[dict], state, *, trainer: TrainerConfig, reward: RewardConfig,
             seed: int, mesh=None) -> dict[str, float]:
    """Greedy, one sample per problem: the episode's metrics, plus for RCL the teaching
    report's figures (accuracy_with_guidance, non_degradation_rate, ...)."""
    episode = run_episode(players, state.params, records, trainer=trainer, reward=reward, num_generations=1,
                          temperature=0.0, seed=seed, mesh=mesh)
    if players.student is None:
        return episode.metrics()
    report = {k: v for k, v in teaching_report([episode]).items() if isinstance(v, (int, float))}
    return {**report, **episode.metrics()}
