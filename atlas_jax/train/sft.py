"""SFT: masked next-token cross-entropy in the step's loss convention, and the eval step."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from atlas_jax import parallel
from atlas_jax.train.logprobs import next_token_scores


def _nll(logits_BcV, targets_Bc):
    """-log p(target) of each position, from one chunk's float32 logits."""
    logz_Bc = jax.nn.logsumexp(logits_BcV, axis=-1)
    return logz_Bc - jnp.take_along_axis(logits_BcV, targets_Bc[..., None], axis=-1)[..., 0]


def batch_nll(model, batch, dropout_keys_B=None) -> tuple[jax.Array, jax.Array]:
    """(summed NLL over loss tokens, number of loss tokens) of one batch; per-row keys turn
    on LoRA dropout (training only)."""
    nll_BT, mask_BT = next_token_scores(model, batch, _nll, dropout_keys_B=dropout_keys_B)
    return jnp.sum(nll_BT * mask_BT), jnp.sum(mask_BT)


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
    return jax.jit(eval_step, in_shardings=(params_shardings, data), out_shardings=parallel.replicated(mesh),
                   compiler_options=parallel.COMPILER_OPTIONS)


def evaluate(eval_step: Callable, params, batches) -> dict:
    """Loss over every loss token of `batches` (global jax Batches) and its perplexity."""
    nll, tokens = 0.0, 0.0
    for batch in batches:
        sums = jax.device_get(eval_step(params, batch))
        nll, tokens = nll + float(sums["nll_sum"]), tokens + float(sums["loss_tokens"])
    loss = nll / max(tokens, 1.0)
    return {"loss": loss, "perplexity": float(jnp.exp(jnp.minimum(loss, 80.0))), "loss_tokens": tokens}
