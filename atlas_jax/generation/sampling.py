"""Next-token choice: temperature, top-k, top-p, min-p, and the log-prob GRPO needs.

The log-prob returned for a sampled token is taken under the distribution it was
actually drawn from: logits / temperature, with tokens outside top-k, outside the top-p
nucleus, or below min_p x the top probability removed, then renormalised. GRPO's
importance ratios compare against exactly this distribution. With temperature 0
(greedy) that distribution is a point mass, so the model's own untempered log-prob of
the argmax token is returned instead (useful for scoring, never 0 by construction).
Filters apply in the order transformers uses: temperature, top-k, top-p, min-p.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def filtered_logits(logits_BV, temperature, top_k, top_p, min_p, *, sort: bool):
    """Tempered logits with filtered-out tokens at -inf. `sort` = top-k or top-p is active."""
    V = logits_BV.shape[-1]
    scaled_BV = logits_BV / jnp.where(temperature > 0, temperature, 1.0)
    neg_inf = jnp.finfo(scaled_BV.dtype).min
    if sort:
        sorted_BV = -jnp.sort(-scaled_BV, axis=-1)  # descending
        k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)
        rank_V = jnp.arange(V)
        sorted_BV = jnp.where(rank_V < k, sorted_BV, neg_inf)
        probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
        keep_BV = (mass_before_BV < top_p) & (rank_V < k)
        threshold_B1 = jnp.min(jnp.where(keep_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
        scaled_BV = jnp.where(scaled_BV >= threshold_B1, scaled_BV, neg_inf)
    probs_BV = jax.nn.softmax(scaled_BV, axis=-1)
    floor_B1 = min_p * jnp.max(probs_BV, axis=-1, keepdims=True)
    return jnp.where(probs_BV >= floor_B1, scaled_BV, neg_inf)


def first_argmax(x_BV):
    """argmax over the vocab (first index on ties), as a max then a min over matching indices:
    XLA:CPU lowers jnp.argmax to a (value, index) reduce several times slower than these two."""
    V = x_BV.shape[-1]
    hit_BV = x_BV == jnp.max(x_BV, axis=-1, keepdims=True)
    return jnp.min(jnp.where(hit_BV, jnp.arange(V, dtype=jnp.int32), V), axis=-1)


def sample_tokens(keys_B, logits_BV, temperature, top_k, top_p, min_p, *, sort: bool):
    """(tokens_B int32, logprobs_B float32) for one decode step; one PRNG key per row.

    A `lax.cond` on the traced temperature: greedy steps skip the noise and the filters."""
    logits_BV = logits_BV.astype(jnp.float32)

    def greedy(logits_BV):
        # the argmax's log-prob is its logit (the max) minus the log-partition
        return first_argmax(logits_BV), jnp.max(logits_BV, axis=-1) - jax.nn.logsumexp(logits_BV, axis=-1)

    def sampled(logits_BV):
        filtered_BV = filtered_logits(logits_BV, temperature, top_k, top_p, min_p, sort=sort)
        # Gumbel-max, as jax.random.categorical draws it
        gumbel_BV = jax.vmap(lambda k: jax.random.gumbel(k, logits_BV.shape[-1:], jnp.float32))(keys_B)
        tokens_B = first_argmax(filtered_BV + gumbel_BV)
        logp_BV = jax.nn.log_softmax(filtered_BV, axis=-1)
        return tokens_B, jnp.take_along_axis(logp_BV, tokens_B[:, None], axis=-1)[:, 0]

    return jax.lax.cond(temperature > 0, sampled, greedy, logits_BV)
