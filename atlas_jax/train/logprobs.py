"""The one pass that scores next tokens: final hidden states -> logits -> per-token scores,
a length chunk at a time. SFT's loss (train/sft.py) and every GRPO log-prob pass
(rl/policy.py: the update, the old and the reference policy) go through it; each says
only what to compute from a chunk's logits.

Position t predicts token t + 1 and carries loss_mask[t + 1], so prompt and padding
positions carry no loss and the last position predicts nothing.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

# Positions per logits chunk. Whole float32 logits_BTV fit on no device at long lengths and
# large vocabularies (16k tokens x 152k entries is 10 GB a row, before the softmax and its
# gradient), while a chunk's are B x CHUNK_T x V. A chunk stays long enough that its
# [B, CHUNK_T, D] x [D, V] matmul keeps the device busy and the scan takes few steps; SFT and
# RL share it, so both hold the same logits memory, which plan.py counts in its estimate.
CHUNK_T = 1024


def next_token_targets(batch):
    """targets_BT[t] = tokens[t + 1], weighted by loss_mask[t + 1] (0 for the last position)."""
    targets_BT = jnp.roll(batch.tokens, -1, axis=1)
    mask_BT = jnp.roll(batch.loss_mask.astype(jnp.float32), -1, axis=1).at[:, -1].set(0.0)
    return targets_BT, mask_BT


def next_token_scores(model, batch, score: Callable, *, chunk: int = CHUNK_T, dropout_keys_B=None):
    """(score over [B, T], mask_BT) for one batch.

    `score(logits_BcV, targets_Bc)` returns one [B, c] array or a tuple of them; it sees float32
    logits `chunk` positions at a time, and each chunk's logits are recomputed in the backward
    pass instead of stored. A batch of at most `chunk` positions is one chunk: the backward
    pass then keeps its logits, since recomputing them would hold as many at once. Per-row
    `dropout_keys_B` turn on LoRA dropout (training updates only).
    """
    x_BTD = model.hidden_states(batch.tokens, positions_BT=batch.positions, segment_ids_BT=batch.segment_ids,
                                dropout_keys_B=dropout_keys_B)
    targets_BT, mask_BT = next_token_targets(batch)
    B, T, D = x_BTD.shape
    if T <= chunk:  # one chunk: its logits are held once either way, so nothing is recomputed
        return score(model.logits(x_BTD), targets_BT), mask_BT
    pad = -T % chunk
    C = (T + pad) // chunk
    x_CBcD = jnp.pad(x_BTD, ((0, 0), (0, pad), (0, 0))).reshape(B, C, chunk, D).swapaxes(0, 1)
    targets_CBc = jnp.pad(targets_BT, ((0, 0), (0, pad))).reshape(B, C, chunk).swapaxes(0, 1)

    @jax.checkpoint
    def one_chunk(_, xs):
        x_BcD, targets_Bc = xs
        return None, score(model.logits(x_BcD), targets_Bc)

    _, scores_C = jax.lax.scan(one_chunk, None, (x_CBcD, targets_CBc))
    unchunk = lambda a_CBc: a_CBc.swapaxes(0, 1).reshape(B, C * chunk)[:, :T]  # noqa: E731
    return jax.tree.map(unchunk, scores_C), mask_BT
