"""SFT: masked next-token cross-entropy in the step's loss convention, and the eval step."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from atlas_jax import parallel

# Logits are computed CHUNK_T positions at a time (and recomputed in the backward pass):
# at 16k tokens x 150k vocab a full float32 logits_BTV would not fit on any device.
CHUNK_T = 1024


def next_token_targets(batch):
    """targets_BT[t] = tokens[t + 1], weighted by loss_mask[t + 1] (0 for the last position)."""
    targets_BT = jnp.roll(batch.tokens, -1, axis=1)
    mask_BT = jnp.roll(batch.loss_mask.astype(jnp.float32), -1, axis=1).at[:, -1].set(0.0)
    return targets_BT, mask_BT


def chunked_nll(model, x_BTD, targets_BT, mask_BT, chunk: int = CHUNK_T) -> jax.Array:
    """sum over t of mask * -log p(target | x), logits built one length-chunk at a time."""
    B, T, D = x_BTD.shape
    chunk = min(chunk, T)
    pad = -T % chunk
    if pad:
        x_BTD = jnp.pad(x_BTD, ((0, 0), (0, pad), (0, 0)))
        targets_BT = jnp.pad(targets_BT, ((0, 0), (0, pad)))
        mask_BT = jnp.pad(mask_BT, ((0, 0), (0, pad)))
    C = (T + pad) // chunk
    xs = (x_BTD.reshape(B, C, chunk, D).swapaxes(0, 1),
          targets_BT.reshape(B, C, chunk).swapaxes(0, 1),
          mask_BT.reshape(B, C, chunk).swapaxes(0, 1))

    @jax.checkpoint
    def chunk_nll(x_BcD, targets_Bc, mask_Bc):
        logits_BcV = model.logits(x_BcD)
        logz_Bc = jax.nn.logsumexp(logits_BcV, axis=-1)
        target_Bc = jnp.take_along_axis(logits_BcV, targets_Bc[..., None], axis=-1)[..., 0]
        return jnp.sum((logz_Bc - target_Bc) * mask_Bc)

    def body(total, chunk_xs):
        return total + chunk_nll(*chunk_xs), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), xs)
    return total


def batch_nll(model, batch, dropout_keys_B=None) -> tuple[jax.Array, jax.Array]:
    """(summed NLL over loss tokens, number of loss tokens) of one batch; per-row keys turn
    on LoRA dropout (training only)."""
    x_BTD = model.hidden_states(batch.tokens, positions_BT=batch.positions, segment_ids_BT=batch.segment_ids,
                                dropout_keys_B=dropout_keys_B)
    targets_BT, mask_BT = next_token_targets(batch)
    return chunked_nll(model, x_BTD, targets_BT, mask_BT), jnp.sum(mask_BT)


def make_sft_loss(graphdef: nnx.GraphDef) -> Callable:
    """loss_fn(params, micro_batch, extras, totals) -> (loss, metric_sums) for make_train_step.

    The loss is the micro-batch's summed NLL over the GLOBAL batch's loss tokens. With
    `keys_B` (make_train_step's row_keys=True) the model applies LoRA dropout.
    """
    def loss_fn(params, batch, extras, totals, keys_B=None):
        del extras
        nll, _ = batch_nll(nnx.merge(graphdef, params), batch, keys_B)
        return nll / totals["loss_tokens"], {}
    return loss_fn


def make_eval_step(graphdef: nnx.GraphDef, mesh: Mesh, params_shardings) -> Callable:
    """eval_step(params, batch) -> {"nll_sum", "loss_tokens"}: sums, reduced by the caller."""
    def eval_step(params, batch):
        nll, tokens = batch_nll(nnx.merge(graphdef, params), batch)
        return {"nll_sum": nll, "loss_tokens": tokens}

    data = NamedSharding(mesh, P(parallel.DATA_AXES))
    return jax.jit(eval_step, in_shardings=(params_shardings, data), out_shardings=parallel.replicated(mesh))


def evaluate(eval_step: Callable, params, batches) -> dict:
    """Loss over every loss token of `batches` (global jax Batches) and its perplexity."""
    nll, tokens = 0.0, 0.0
    for batch in batches:
        sums = jax.device_get(eval_step(params, batch))
        nll, tokens = nll + float(sums["nll_sum"]), tokens + float(sums["loss_tokens"])
    loss = nll / max(tokens, 1.0)
    return {"loss": loss, "perplexity": float(jnp.exp(jnp.minimum(loss, 80.0))), "loss_tokens": tokens}
