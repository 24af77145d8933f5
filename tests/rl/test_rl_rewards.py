"""adaptive_teaching_reward: every branch under jit/no-jit/device, one trace, vmap, properties;
the reward registry and the reward YAMLs."""

import pathlib
import string

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from atlas_jax.config import ConfigError, RewardConfig
from atlas_jax.rl import rewards
from atlas_jax.rl.rewards import adaptive_teaching_reward, get_reward, register_reward

CONFIGS = pathlib.Path(__file__).resolve().parents[2] / "configs" / "reward"

# (name, p_t, p_b, length, has_answer, m, expected) with w = 1, tau = 0.5.
CASES = (
    ("no_answer", 1.0, 0.0, 0, False, 2.0, 0.0),
    ("degraded", 0.25, 0.75, 50, True, 2.0, -1.0),
    ("degraded_above_tau", 0.5, 1.0, 0, True, 2.0, -1.0),
    ("degraded_m0_is_zero", 0.25, 0.75, 50, True, 0.0, 0.0),
    ("improved", 1.0, 0.5, 100, True, 2.0, 0.5 * (1 + 0.5)),
    ("improved_zero_length", 0.75, 0.25, 0, True, 2.0, 0.5 * 2.0),
    ("improved_below_tau", 0.25, 0.0, 10, True, 2.0, 0.0),
    ("kept_right", 0.75, 0.75, 300, True, 2.0, 0.5 * (1 + 0.25)),
    ("same_within_tolerance", 0.75 + 5e-7, 0.75, 300, True, 2.0, 0.5 * (1 + 0.25)),
    ("same_below_tau", 0.25, 0.25, 10, True, 2.0, 0.0),
    ("same_at_tau", 0.5, 0.5, 100, True, 2.0, 0.5 * 1.5),
)


class AdaptiveTeachingRewardTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True, with_device=True)
    @parameterized.named_parameters(*CASES)
    def test_branch(self, p_t, p_b, length, has_answer, m, expected):
        fn = self.variant(
            lambda a, b, c, d: adaptive_teaching_reward(a, b, c, d, degradation_penalty_multiplier=m)
        )
        out = fn(jnp.float32(p_t), jnp.float32(p_b), jnp.int32(length), jnp.bool_(has_answer))
        chex.assert_shape(out, ())
        chex.assert_type(out, jnp.float32)
        np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-7)

    @chex.variants(with_jit=True, without_jit=True)
    def test_batch_of_all_branches(self):
        cols = list(zip(*CASES))[1:]
        # Same m everywhere so one call covers the table; the m = 0 row is checked above.
        rows = [i for i, c in enumerate(CASES) if c[5] == 2.0]
        p_t, p_b, length, has, _, expected = (np.asarray(c)[rows] for c in cols)
        args = (p_t.reshape(2, -1), p_b.reshape(2, -1), length.reshape(2, -1), has.reshape(2, -1))
        out = self.variant(adaptive_teaching_reward)(*args)
        chex.assert_shape(out, (2, len(rows) // 2))
        chex.assert_type(out, jnp.float32)
        np.testing.assert_allclose(out.reshape(-1), expected.astype(np.float32), rtol=1e-6, atol=1e-7)


def test_one_trace_for_same_shapes():
    chex.clear_trace_counter()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def reward(p_t, p_b, length, has):
        return adaptive_teaching_reward(p_t, p_b, length, has)

    rng = np.random.default_rng(0)
    for _ in range(3):  # new values, same shapes and dtypes: no retrace (a second raises)
        args = (rng.random(16, np.float32), rng.random(16, np.float32),
                rng.integers(0, 500, 16).astype(np.int32), rng.random(16) < 0.9)
        reward(*args).block_until_ready()


def test_vmap_matches_batched_call():
    rng = np.random.default_rng(1)
    p_t, p_b = rng.random((4, 8), np.float32), rng.random((4, 8), np.float32)
    length = rng.integers(0, 400, (4, 8)).astype(np.float32)
    has = rng.random((4, 8)) < 0.8
    batched = adaptive_teaching_reward(p_t, p_b, length, has)
    mapped = jax.vmap(adaptive_teaching_reward)(p_t, p_b, length, has)
    chex.assert_trees_all_close(mapped, batched)
    chex.assert_shape(mapped, (4, 8))


# --- properties --------------------------------------------------------------------------

_jitted = jax.jit(adaptive_teaching_reward)
fractions = st.sampled_from([i / 8 for i in range(9)])  # a student's share of 8 attempts
lengths = st.integers(0, 4096)
weights = st.floats(0.0, 3.0)
multipliers = st.one_of(st.just(0.0), st.floats(0.01, 4.0))  # m = 0 is the ATLAS original


def _reward(p_t, p_b, length, w=1.0, m=2.0, has=True):
    return float(_jitted(np.float32(p_t), np.float32(p_b), np.float32(length), np.bool_(has),
                         efficiency_weight=np.float32(w), degradation_penalty_multiplier=np.float32(m)))


@settings(max_examples=60, deadline=None)
@given(fractions, fractions, lengths, weights, multipliers)
def test_reward_is_bounded(p_t, p_b, length, w, m):
    r = _reward(p_t, p_b, length, w, m)
    assert -m - 1e-6 <= r <= 1 + w + 1e-6


@settings(max_examples=60, deadline=None)
@given(fractions, fractions, lengths, st.integers(1, 2000), weights)
def test_longer_guidance_never_pays_more(p_t, p_b, length, extra, w):
    assert _reward(p_t, p_b, length + extra, w) <= _reward(p_t, p_b, length, w) + 1e-7


@settings(max_examples=60, deadline=None)
@given(fractions, fractions, fractions, lengths, lengths, multipliers)
def test_degradation_ranks_below_any_non_degradation(p_b, worse, better, len_a, len_b, m):
    # For the same baseline, guidance that lowers accuracy never beats guidance that does not.
    lowered, kept = min(worse, p_b), max(better, p_b)
    assume(lowered < p_b)
    degraded = _reward(lowered, p_b, len_a, m=m)
    assert degraded <= 0.0 <= _reward(kept, p_b, len_b, m=m)
    assert degraded < 0.0 or m == 0.0


# --- registry ----------------------------------------------------------------------------

def test_registry_selects_builtins_by_config_name():
    assert {"adaptive_teaching", "math_exact"} <= set(rewards.registered_rewards())
    signals = dict(perf_with_teaching=jnp.array([1.0, 0.0]), perf_baseline=jnp.array([0.5, 0.5]),
                   teaching_length=jnp.array([100, 0]), has_answer=jnp.array([True, True]),
                   correct=jnp.array([1.0, 0.0]))
    cfg = RewardConfig(degradation_penalty_multiplier=3.0)
    np.testing.assert_allclose(get_reward("adaptive_teaching")(cfg, **signals), [0.75, -1.5])
    exact = get_reward("math_exact")(RewardConfig(name="math_exact"), **signals)
    np.testing.assert_array_equal(exact, [1.0, 0.0])
    assert exact.dtype == jnp.float32


def test_registry_errors_are_one_line():
    with pytest.raises(ConfigError, match="not registered; known: .*adaptive_teaching"):
        get_reward("nope")
    with pytest.raises(ValueError, match="needs signals correct; got has_answer"):
        get_reward("math_exact")(RewardConfig(), has_answer=jnp.array([True]))


@pytest.fixture
def scratch_reward_name():
    name = "test_length_penalty"
    yield name
    rewards._REGISTRY.pop(name, None)


def test_user_reward_registers_and_runs_under_jit(scratch_reward_name):
    @register_reward(scratch_reward_name, inputs=("correct", "teaching_length"))
    def length_penalty(cfg, *, correct, teaching_length):
        return correct - cfg.efficiency_weight * teaching_length / 100.0

    reward = get_reward(scratch_reward_name)
    cfg = RewardConfig(name=scratch_reward_name, efficiency_weight=0.5)
    out = jax.jit(lambda c, n: reward(cfg, correct=c, teaching_length=n))(jnp.array([1.0]), jnp.array([20.0]))
    np.testing.assert_allclose(out, [0.9])
    with pytest.raises(ValueError, match="already registered"):
        register_reward(scratch_reward_name, inputs=("correct",))(length_penalty)


# --- configs/reward/*.yaml ---------------------------------------------------------------

PLACEHOLDERS = {
    "probe_template": {"problem"},
    "teacher_template": {"problem", "approach"},
    "student_with_teaching_template": {"problem", "teaching"},
    "student_baseline_template": {"problem"},
}


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_reward_yaml_is_valid(path):
    from atlas_jax.config import compose

    cfg = compose(["+run=teacher_rcl", f"reward={path.stem}"]).reward  # defaults applied; unknown key raises
    get_reward(cfg.name)
    # The teaching world's student and teacher learned their formats from traces written in
    # these very prompts (tests/data/test_teaching_world.py); prompts for instruction-tuned
    # models must ask for the formats the answer checks read.
    instructs = path.stem != "teaching_world"
    for key, expected in PLACEHOLDERS.items():
        template = getattr(cfg, key)
        if not template:
            continue
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
        assert fields == expected, f"{path.name}:{key} uses {fields}"
        text = template.format(**{f: f"<{f.upper()}>" for f in fields})
        if key.startswith("student") and instructs:
            assert "\\boxed{}" in text
        if key == "teacher_template" and instructs:
            assert "<teaching>" in text and "</teaching>" in text


def test_adaptive_teaching_yaml_has_the_recipe_values():
    cfg = OmegaConf.load(CONFIGS / "adaptive_teaching.yaml")
    assert (cfg.efficiency_weight, cfg.baseline_threshold, cfg.degradation_penalty_multiplier) == (1.0, 0.5, 2.0)
    assert cfg.max_probe_tokens == 500
    assert all(cfg[key] for key in PLACEHOLDERS)
