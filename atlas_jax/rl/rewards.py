"""Rewards: pure `jax.numpy` functions of per-completion signals, selected by `cfg.reward.name`.

Calling convention of a registered reward
-----------------------------------------
Answers are checked on the host (strings, see `atlas_jax.rl.answers`); what reaches a reward is
a set of named per-completion *signals*, arrays of one common batch shape (usually [B], one
row per completion in prompt-major order). A recipe computes every signal it can and calls

    reward_fn = get_reward(cfg.reward.name)
    rewards_B = reward_fn(cfg.reward, **signals)          # float32, same shape as the signals

The reward reads only the signals it declares in `inputs` (extra ones are ignored, a missing one
is a one-line error), takes its weights from the `RewardConfig`, and must be pure `jax.numpy`
(jittable, no Python branching on values). The signal names in use:

    correct             float [B] in [0, 1]: this completion's answer is right (plain GRPO)
    perf_with_teaching  float [B] in [0, 1]: share of the student's attempts, given this
                        guidance, that were right (teacher RCL: one row per guidance)
    perf_baseline       float [B] in [0, 1]: the same student's share without guidance
    teaching_length     float/int [B]: tokens in the guidance
    has_answer          bool [B]: the problem has a ground truth to check against

Built in: `adaptive_teaching` (RCL; reads the last four) and `math_exact` (plain GRPO; reads
`correct`). Add your own with

    @register_reward("my_reward", inputs=("correct", "teaching_length"))
    def my_reward(cfg, *, correct, teaching_length): ...

and select it with `reward.name=my_reward` (a YAML in configs/reward/ named the same).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from atlas_jax.config import ConfigError
from atlas_jax.rl.answers import extract_answer, extract_teaching, is_correct, score_responses

__all__ = [
    "Reward", "adaptive_teaching_reward", "extract_answer", "extract_teaching", "get_reward",
    "is_correct", "math_exact_reward", "register_reward", "registered_rewards", "score_responses",
]

# |p_t - p_b| at or below this counts as "no change": fractions of a few attempts are exact,
# but signals that went through float32 averaging may carry rounding noise.
_SAME = 1e-6


def adaptive_teaching_reward(
    perf_with_teaching: jax.Array,
    perf_baseline: jax.Array,
    teaching_length: jax.Array,
    has_answer: jax.Array,
    *,
    efficiency_weight: float = 1.0,
    baseline_threshold: float = 0.5,
    degradation_penalty_multiplier: float = 2.0,
) -> jax.Array:
    """ATLAS adaptive-teaching reward, elementwise over any (broadcastable) batch shape.

    With d = p_t - p_b and e = 100 / (100 + L): 0 without an answer; -m|d| when the guidance
    made the student worse; d(1 + w e) when it helped and p_t >= tau; 0.5(1 + w e) when the
    student was already right (p_t >= tau) and stayed right; 0 otherwise. Lengths below zero
    are treated as zero. Returns float32.
    """
    p_t = jnp.asarray(perf_with_teaching, jnp.float32)
    p_b = jnp.asarray(perf_baseline, jnp.float32)
    length = jnp.maximum(jnp.asarray(teaching_length, jnp.float32), 0.0)
    answered = jnp.asarray(has_answer, jnp.bool_)
    w = jnp.asarray(efficiency_weight, jnp.float32)
    tau = jnp.asarray(baseline_threshold, jnp.float32)
    m = jnp.asarray(degradation_penalty_multiplier, jnp.float32)

    delta = p_t - p_b
    delta = jnp.where(jnp.abs(delta) <= _SAME, 0.0, delta)
    bonus = 1.0 + w * (100.0 / (100.0 + length))
    kept_up = p_t >= tau
    reward = jnp.select(
        [~answered, delta < 0, (delta > 0) & kept_up, (delta == 0) & kept_up],
        [jnp.zeros_like(delta), -m * jnp.abs(delta), delta * bonus, 0.5 * bonus],
        default=jnp.zeros_like(delta),
    )
    return reward.astype(jnp.float32)


def math_exact_reward(correct: jax.Array) -> jax.Array:
    """1 for a right answer, 0 otherwise (fractional correctness passes through); float32."""
    return jnp.clip(jnp.asarray(correct, jnp.float32), 0.0, 1.0)


@dataclasses.dataclass(frozen=True)
class Reward:
    """A registered reward: `fn(cfg, **signals)` reading the signals named in `inputs`."""

    name: str
    inputs: tuple[str, ...]
    fn: Callable[..., jax.Array]

    def __call__(self, cfg: Any, **signals: Any) -> jax.Array:
        missing = [key for key in self.inputs if key not in signals]
        if missing:
            raise ValueError(
                f"reward '{self.name}' needs signals {', '.join(missing)}; got {', '.join(sorted(signals)) or 'none'}"
            )
        return self.fn(cfg, **{key: signals[key] for key in self.inputs})


_REGISTRY: dict[str, Reward] = {}


def register_reward(name: str, *, inputs: tuple[str, ...]) -> Callable:
    """Decorator: registers `fn(cfg, **inputs) -> rewards` under `name` (names are unique)."""

    def decorate(fn: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
        if name in _REGISTRY:
            raise ValueError(f"reward '{name}' is already registered")
        _REGISTRY[name] = Reward(name=name, inputs=tuple(inputs), fn=fn)
        return fn

    return decorate


def get_reward(name: str) -> Reward:
    """The reward registered as `name`; a one-line error lists the known names."""
    if name not in _REGISTRY:
        raise ConfigError(f"reward.name={name!r} is not registered; known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def registered_rewards() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


@register_reward(
    "adaptive_teaching", inputs=("perf_with_teaching", "perf_baseline", "teaching_length", "has_answer")
)
def _adaptive_teaching(cfg, *, perf_with_teaching, perf_baseline, teaching_length, has_answer):
    return adaptive_teaching_reward(
        perf_with_teaching, perf_baseline, teaching_length, has_answer,
        efficiency_weight=cfg.efficiency_weight,
        baseline_threshold=cfg.baseline_threshold,
        degradation_penalty_multiplier=cfg.degradation_penalty_multiplier,
    )


@register_reward("math_exact", inputs=("correct",))
def _math_exact(cfg, *, correct):
    del cfg  # no weights: the verifiable reward is the correctness itself
    return math_exact_reward(correct)
