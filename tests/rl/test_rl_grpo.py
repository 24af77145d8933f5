"""GRPO math against NumPy references: advantages, log-probs, every loss type, gradients,
KL, clipping, and micro-batch sums equal to the full-batch loss."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from atlas_jax.rl.grpo import (
    LOSS_TYPES, completion_mask, group_advantages, grpo_loss, reward_metrics, token_logprobs,
)

G, P, T, L_MAX = 4, 3, 7, 7
B = G * P
EPS, EPS_HIGH, BETA = 0.2, 0.28, 0.04


def np_advantages(rewards, g, mode):
    groups = rewards.reshape(-1, g)
    centred = groups - groups.mean(1, keepdims=True)
    group_std = groups.std(1, ddof=1)
    if mode == "group":
        centred = centred / (group_std[:, None] + 1e-4)
    elif mode == "batch":
        centred = centred / (rewards.std(ddof=1) + 1e-4)
    return centred.reshape(-1), group_std


def np_loss(logp, old, ref, adv, mask, loss_type, beta):
    """TRL's per-token loss and reductions on one (whole) batch."""
    ratio = np.exp(logp - old)
    per_token = -np.minimum(ratio * adv[:, None], np.clip(ratio, 1 - EPS, 1 + EPS_HIGH) * adv[:, None])
    per_token = per_token + beta * (np.exp(ref - logp) - (ref - logp) - 1)
    total = (per_token * mask).sum()
    if loss_type == "grpo":
        return ((per_token * mask).sum(1) / np.maximum(mask.sum(1), 1)).mean()
    if loss_type == "dr_grpo":
        return total / (mask.shape[0] * L_MAX)
    return total / max(mask.sum(), 1)


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    logp = np.log(rng.uniform(0.05, 0.95, (B, T))).astype(np.float32)
    old = (logp + rng.normal(0, 0.3, (B, T))).astype(np.float32)  # ratios well outside the clip
    ref = (logp + rng.normal(0, 0.5, (B, T))).astype(np.float32)
    lengths = rng.integers(1, T + 1, B)
    lengths[5] = 0  # an empty completion must not divide by zero
    mask = (np.arange(T)[None] < lengths[:, None]).astype(np.float32)
    adv = rng.normal(0, 1, B).astype(np.float32)
    return dict(logp=logp, old=old, ref=ref, mask=mask, adv=adv)


def _loss(b, loss_type, beta=BETA, **overrides):
    args = dict(logp_BT=b["logp"], old_logp_BT=b["old"], ref_logp_BT=b["ref"], advantages_B=b["adv"],
                mask_BT=b["mask"])
    args.update(overrides)
    return grpo_loss(**args, beta=beta, epsilon=EPS, epsilon_high=EPS_HIGH, loss_type=loss_type,
                     max_completion_length=L_MAX, num_sequences=args["mask_BT"].shape[0],
                     num_tokens=args["mask_BT"].sum())


# --- advantages ----------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["group", "batch", "none"])
def test_group_advantages_match_numpy(mode):
    rewards = np.random.default_rng(1).random(B).astype(np.float32)
    rewards[:G] = 0.5  # one group with identical rewards: advantage 0, std 0
    adv, std = group_advantages(jnp.asarray(rewards), G, mode)
    ref_adv, ref_std = np_advantages(rewards.astype(np.float64), G, mode)
    np.testing.assert_allclose(adv, ref_adv, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(std, ref_std, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(adv[:G], 0.0)
    metrics = reward_metrics(jnp.asarray(rewards), std)
    np.testing.assert_allclose(metrics["frac_reward_zero_std"], 1 / P)
    np.testing.assert_allclose(metrics["reward"], rewards.mean(), rtol=1e-6)
    np.testing.assert_allclose(metrics["reward_std"], rewards.std(ddof=1), rtol=1e-5)


def test_group_advantages_are_per_prompt_and_jittable():
    rewards = jnp.array([1.0, 0.0, 1.0, 0.0, 5.0, 5.0, 5.0, 6.0])
    adv, _ = jax.jit(group_advantages, static_argnums=(1, 2))(rewards, 4, "none")
    np.testing.assert_allclose(adv, [0.5, -0.5, 0.5, -0.5, -0.25, -0.25, -0.25, 0.75])
    single, std = group_advantages(jnp.array([1.0, 2.0]), 1, "group")  # G = 1: nothing to compare
    np.testing.assert_array_equal(single, [0.0, 0.0])
    np.testing.assert_array_equal(std, [0.0, 0.0])


def test_group_advantages_errors():
    with pytest.raises(ValueError, match="not a flat batch of whole groups of 4"):
        group_advantages(jnp.zeros(6), 4)
    with pytest.raises(ValueError, match="scale_rewards='mean' is not one of"):
        group_advantages(jnp.zeros(8), 4, "mean")


# --- log-probs -----------------------------------------------------------------------------

def test_token_logprobs_at_temperature():
    rng = np.random.default_rng(2)
    logits = rng.normal(0, 3, (2, 5, 11)).astype(np.float32)
    targets = rng.integers(0, 11, (2, 5))
    logp, entropy = jax.jit(token_logprobs, static_argnums=2)(jnp.asarray(logits), jnp.asarray(targets), 0.7)
    scaled = logits.astype(np.float64) / 0.7
    log_softmax = scaled - np.log(np.exp(scaled).sum(-1, keepdims=True))
    np.testing.assert_allclose(logp, np.take_along_axis(log_softmax, targets[..., None], -1)[..., 0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(entropy, -(np.exp(log_softmax) * log_softmax).sum(-1), rtol=1e-5, atol=1e-5)
    assert logp.dtype == entropy.dtype == jnp.float32
    with pytest.raises(ValueError, match="temperature=0 must be > 0"):
        token_logprobs(jnp.asarray(logits), jnp.asarray(targets), 0)


def test_completion_mask_and_truncation():
    mask = completion_mask(jnp.array([0, 2, 4]), 4, truncated_B=jnp.array([False, False, True]))
    np.testing.assert_array_equal(mask, [[0, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(completion_mask(jnp.array([3]), 4), [[1, 1, 1, 0]])


# --- loss ----------------------------------------------------------------------------------

@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_loss_matches_numpy(batch, loss_type):
    loss, metrics = _loss(batch, loss_type)
    expected = np_loss(*(batch[k].astype(np.float64) for k in ("logp", "old", "ref", "adv", "mask")),
                       loss_type, BETA)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    kl = np.exp(batch["ref"] - batch["logp"]) - (batch["ref"] - batch["logp"]) - 1
    np.testing.assert_allclose(metrics["kl"], (kl * batch["mask"]).sum() / batch["mask"].sum(), rtol=1e-5)


def test_bnpo_equals_dapo_under_global_normalisation(batch):
    np.testing.assert_allclose(_loss(batch, "bnpo")[0], _loss(batch, "dapo")[0], rtol=1e-7)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_micro_batch_sums_equal_full_batch(batch, loss_type):
    step = jax.jit(functools.partial(
        grpo_loss, beta=BETA, epsilon=EPS, epsilon_high=EPS_HIGH, loss_type=loss_type, max_completion_length=L_MAX))
    num_tokens = jnp.asarray(batch["mask"].sum())
    keys = ("logp", "old", "ref", "adv", "mask")
    full_loss, full_metrics = step(*(batch[k] for k in keys), num_sequences=B, num_tokens=num_tokens,
                                   entropy_BT=batch["logp"] * -1.0)
    parts = [step(*(batch[k][i:i + 3] for k in keys), num_sequences=B, num_tokens=num_tokens,
                  entropy_BT=batch["logp"][i:i + 3] * -1.0) for i in range(0, B, 3)]
    np.testing.assert_allclose(sum(p[0] for p in parts), full_loss, rtol=1e-5)
    for key, value in full_metrics.items():
        np.testing.assert_allclose(sum(p[1][key] for p in parts), value, rtol=1e-5, atol=1e-7, err_msg=key)
    assert set(full_metrics) == {"kl", "entropy", "clip_ratio/low", "clip_ratio/high", "clip_ratio/region"}


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_one_iteration_gradient_is_reinforce_plus_kl(batch, loss_type):
    def loss_of(logp):
        return _loss(batch, loss_type, logp_BT=logp, old_logp_BT=jax.lax.stop_gradient(logp))[0]

    grad = jax.grad(loss_of)(jnp.asarray(batch["logp"]))
    mask, logp, ref, adv = batch["mask"], batch["logp"], batch["ref"], batch["adv"]
    # d/dlogp of [-A logp + beta (exp(ref - logp) - (ref - logp) - 1)], then the reduction's weights.
    per_token = -adv[:, None] + BETA * (1.0 - np.exp(ref - logp))
    weight = {
        "grpo": 1.0 / (np.maximum(mask.sum(1, keepdims=True), 1) * B),
        "dr_grpo": 1.0 / (B * L_MAX),
    }.get(loss_type, 1.0 / mask.sum())
    np.testing.assert_allclose(grad, per_token * mask * weight, rtol=1e-4, atol=1e-7)


def test_kl_is_zero_when_policy_equals_reference(batch):
    loss, metrics = _loss(batch, "grpo", ref_logp_BT=batch["logp"])
    np.testing.assert_allclose(metrics["kl"], 0.0, atol=1e-7)
    no_kl_loss, no_kl_metrics = _loss(batch, "grpo", beta=0.0, ref_logp_BT=None)
    np.testing.assert_allclose(loss, no_kl_loss, rtol=1e-6)
    assert float(no_kl_metrics["kl"]) == 0.0


def test_clipping_engages_only_outside_the_trust_region():
    ratios = np.array([0.5, 0.79, 0.81, 1.0, 1.19, 1.21, 1.27, 1.29, 2.0], np.float32)
    logp = np.zeros((2, ratios.size), np.float32)
    old = np.broadcast_to(-np.log(ratios), logp.shape)  # rho = exp(logp - old) = ratios
    adv = np.array([1.0, -1.0], np.float32)
    mask = np.ones_like(logp)
    loss_of = lambda lp: _loss(dict(logp=lp, old=old, ref=None, adv=adv, mask=mask), "dapo", beta=0.0)[0]
    grad = np.asarray(jax.grad(loss_of)(jnp.asarray(logp)))
    # A > 0: only rho > 1 + eps_high (1.28) is clipped; A < 0: only rho < 1 - eps (0.8).
    clipped = np.stack([ratios > 1 + EPS_HIGH, ratios < 1 - EPS])
    np.testing.assert_array_equal(grad == 0, clipped)
    np.testing.assert_allclose(grad[~clipped], (-adv[:, None] * ratios / mask.sum())[~clipped], rtol=1e-5)
    _, metrics = _loss(dict(logp=logp, old=old, ref=None, adv=adv, mask=mask), "dapo", beta=0.0)
    np.testing.assert_allclose(metrics["clip_ratio/high"], clipped[0].sum() / mask.sum())
    np.testing.assert_allclose(metrics["clip_ratio/low"], clipped[1].sum() / mask.sum())
    np.testing.assert_allclose(metrics["clip_ratio/region"], clipped.sum() / mask.sum())


def test_loss_errors(batch):
    with pytest.raises(ValueError, match="loss_type='ppo' is not one of"):
        _loss(batch, "ppo")
    with pytest.raises(ValueError, match="beta=0.04 needs reference log-probs"):
        _loss(batch, "grpo", ref_logp_BT=None)
