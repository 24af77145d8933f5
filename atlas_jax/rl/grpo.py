"""GRPO math: group advantages, token log-probs at the sampling temperature, the clipped loss.

Pure functions with no models and no sampling; the training step calls them inside its jitted,
micro-batched update. Rows are prompt-major throughout: prompt i's G completions are rows
i*G .. i*G + G - 1. Letters: B completions, T completion tokens, V vocab, G generations per
prompt, P prompts (B = P * G).

Global normalisation. `grpo_loss` divides by quantities of the whole optimizer batch
(`num_sequences`, `num_tokens`), never of the micro-batch it sees. Summing its loss (and its
metrics) over the micro-batches of a step therefore gives exactly the full-batch value, so
micro-batching and gradient accumulation never change the result, and the gradients are summed
(not averaged) across accumulation steps.
"""

from __future__ import annotations

from typing import Optional, Union

import jax
import jax.numpy as jnp

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALE_REWARDS = ("group", "batch", "none")
_STD_EPS = 1e-4  # added to the std so groups with identical rewards get advantage 0, not NaN

Scalar = Union[int, float, jax.Array]


def _unbiased_std(x: jax.Array, axis=None) -> jax.Array:
    # Bessel-corrected like torch.std, the reference recipe's convention; a single value has 0.
    n = x.size if axis is None else x.shape[axis]
    return jnp.std(x, axis=axis, ddof=1) if n > 1 else jnp.zeros_like(jnp.mean(x, axis=axis))


def group_advantages(
    rewards_B: jax.Array, num_generations: int, scale_rewards: str = "group"
) -> tuple[jax.Array, jax.Array]:
    """(reward - its group's mean) / (std + 1e-4); returns (advantages_B, group_std_P).

    scale_rewards: "group" divides by the std of the prompt's G rewards, "batch" by the std of
    all B rewards, "none" does not divide (Dr. GRPO). group_std_P is the per-prompt reward std
    in every mode, for the "groups with zero reward std" metric.
    """
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards={scale_rewards!r} is not one of {', '.join(SCALE_REWARDS)}")
    if rewards_B.ndim != 1 or rewards_B.shape[0] % num_generations:
        raise ValueError(
            f"rewards of shape {rewards_B.shape} are not a flat batch of whole groups of {num_generations}"
        )
    rewards_PG = rewards_B.astype(jnp.float32).reshape(-1, num_generations)
    centred_PG = rewards_PG - rewards_PG.mean(axis=1, keepdims=True)
    group_std_P = _unbiased_std(rewards_PG, axis=1)
    if scale_rewards == "group":
        centred_PG = centred_PG / (group_std_P[:, None] + _STD_EPS)
    elif scale_rewards == "batch":
        centred_PG = centred_PG / (_unbiased_std(rewards_PG) + _STD_EPS)
    return centred_PG.reshape(-1), group_std_P


def reward_metrics(rewards_B: jax.Array, group_std_P: jax.Array) -> dict[str, jax.Array]:
    """reward mean/std over the batch and the share of prompts whose G rewards are all equal."""
    rewards_B = rewards_B.astype(jnp.float32)
    return {
        "reward": rewards_B.mean(),
        "reward_std": _unbiased_std(rewards_B),
        "frac_reward_zero_std": jnp.mean((group_std_P <= 1e-6).astype(jnp.float32)),
    }


def token_logprobs(
    logits_BTV: jax.Array, targets_BT: jax.Array, temperature: float = 1.0
) -> tuple[jax.Array, jax.Array]:
    """log p(target) and the entropy of the distribution the sampler drew from, float32 [B, T].

    logits_BTV[:, t] must be the prediction of targets_BT[:, t] (callers shift by one). Logits
    are divided by the sampling temperature so the ratio to the sampler's log-probs starts at 1.
    """
    if isinstance(temperature, (int, float)) and temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0 to score tokens (greedy has no log-probs)")
    logits_BTV = logits_BTV.astype(jnp.float32) / temperature
    logz_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    target_logit_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None].astype(jnp.int32), axis=-1)[..., 0]
    probs_BTV = jax.nn.softmax(logits_BTV, axis=-1)
    entropy_BT = logz_BT - jnp.sum(probs_BTV * logits_BTV, axis=-1)
    return target_logit_BT - logz_BT, entropy_BT


def completion_mask(lengths_B: jax.Array, num_tokens: int, truncated_B: Optional[jax.Array] = None) -> jax.Array:
    """float32 [B, T] mask of generated tokens (EOS included); rows in truncated_B are zeroed.

    Pass truncated_B (completions that hit the length limit without EOS) when
    `trainer.mask_truncated_completions` is set, so unfinished answers carry no gradient.
    """
    mask_BT = jnp.arange(num_tokens)[None, :] < lengths_B[:, None]
    if truncated_B is not None:
        mask_BT = mask_BT & ~truncated_B.astype(jnp.bool_)[:, None]
    return mask_BT.astype(jnp.float32)


def grpo_loss(
    logp_BT: jax.Array,
    old_logp_BT: jax.Array,
    ref_logp_BT: Optional[jax.Array],
    advantages_B: jax.Array,
    mask_BT: jax.Array,
    *,
    beta: float,
    epsilon: float,
    epsilon_high: Optional[float],
    loss_type: str,
    max_completion_length: int,
    num_sequences: Scalar,
    num_tokens: Scalar,
    entropy_BT: Optional[jax.Array] = None,
    sequence_tokens_BT: Optional[jax.Array] = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """This micro-batch's share of the GRPO loss of the whole optimizer batch, and its metrics.

    Per token: rho = exp(logp - old_logp), surrogate -min(rho A, clip(rho, 1-eps, 1+eps_high) A)
    plus beta * (exp(ref - logp) - (ref - logp) - 1) (k3 KL; skipped when ref_logp_BT is None,
    which requires beta == 0). num_sequences / num_tokens count the completions / unmasked
    tokens of the WHOLE optimizer batch (all micro-batches, all data shards). Reductions, with
    S = sum over tokens of loss * mask:

      grpo     sum over sequences of (S_seq / tokens_seq) / num_sequences. TRL: the same (mean of
               per-sequence means; TRL averages micro-batch means, equal when micro-batches hold
               equally many sequences).
      bnpo     S / num_tokens. TRL divides by the tokens of each process's micro-batch and
               averages those means; with global normalisation there is one batch, so bnpo here
               equals dapo exactly.
      dr_grpo  S / (num_sequences * max_completion_length). TRL: the same.
      dapo     S / num_tokens. TRL: the same (num_items_in_batch = tokens of the global batch).

    With old_logp = stop_gradient(logp) (one update per rollout) rho is 1 and the gradient is
    REINFORCE with the group advantage plus the KL gradient.

    Packed rows (`rl.packing`: several completions a row) pass advantages per token [B, T]
    and `sequence_tokens_BT`, the loss tokens of the completion each token belongs to; "grpo"
    then takes each completion's mean through those counts instead of per row. Everything
    else is a sum over tokens already, so packed and unpacked rows give the same loss. Metrics are normalised by the same
    global counts, so they too sum over micro-batches: kl, entropy and clip_ratio/low, /high,
    /region are token means (clip fractions count tokens whose gradient the clip removed).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r} is not one of {', '.join(LOSS_TYPES)}")
    use_kl = ref_logp_BT is not None
    if not use_kl and not (isinstance(beta, (int, float)) and beta == 0):
        raise ValueError(f"beta={beta} needs reference log-probs; pass ref_logp_BT or set beta=0")
    eps_low = epsilon
    eps_high = epsilon if epsilon_high is None else epsilon_high
    mask_BT = mask_BT.astype(jnp.float32)
    logp_BT = logp_BT.astype(jnp.float32)
    adv_B1 = advantages_B.astype(jnp.float32)  # [B, 1], or [B, T] on packed rows
    adv_B1 = adv_B1 if adv_B1.ndim == 2 else adv_B1[:, None]
    tokens = jnp.maximum(jnp.asarray(num_tokens, jnp.float32), 1.0)
    sequences = jnp.maximum(jnp.asarray(num_sequences, jnp.float32), 1.0)

    ratio_BT = jnp.exp(logp_BT - old_logp_BT.astype(jnp.float32))
    clipped_BT = jnp.clip(ratio_BT, 1.0 - eps_low, 1.0 + eps_high)
    loss_BT = -jnp.minimum(ratio_BT * adv_B1, clipped_BT * adv_B1)
    if use_kl:
        log_ratio_BT = ref_logp_BT.astype(jnp.float32) - logp_BT
        kl_BT = jnp.exp(log_ratio_BT) - log_ratio_BT - 1.0
        loss_BT = loss_BT + beta * kl_BT
    else:
        kl_BT = jnp.zeros_like(logp_BT)

    masked_sum = jnp.sum(loss_BT * mask_BT)
    if loss_type == "grpo" and sequence_tokens_BT is not None:
        loss = jnp.sum(loss_BT * mask_BT / jnp.maximum(sequence_tokens_BT.astype(jnp.float32), 1.0)) / sequences
    elif loss_type == "grpo":
        per_seq_B = jnp.sum(loss_BT * mask_BT, axis=1) / jnp.maximum(mask_BT.sum(axis=1), 1.0)
        loss = jnp.sum(per_seq_B) / sequences
    elif loss_type == "dr_grpo":
        loss = masked_sum / (sequences * max_completion_length)
    else:  # bnpo, dapo
        loss = masked_sum / tokens

    def token_mean(x_BT: jax.Array) -> jax.Array:
        return jnp.sum(x_BT.astype(jnp.float32) * mask_BT) / tokens

    low_BT = (ratio_BT < 1.0 - eps_low) & (adv_B1 < 0)
    high_BT = (ratio_BT > 1.0 + eps_high) & (adv_B1 > 0)
    metrics = {
        "kl": token_mean(kl_BT),
        "clip_ratio/low": token_mean(low_BT),
        "clip_ratio/high": token_mean(high_BT),
        "clip_ratio/region": token_mean(low_BT | high_BT),
    }
    if entropy_BT is not None:
        metrics["entropy"] = token_mean(entropy_BT)
    return loss, metrics
