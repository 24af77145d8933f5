"""The update step: micro-batching and device count never change the result."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from . import helpers


def _reference_loss(graphdef, params, batch) -> float:
    """Full-batch masked next-token CE with plain logits (no chunking, no accumulation)."""
    logits = nnx.merge(graphdef, params)(batch.tokens, positions_BT=batch.positions,
                                         segment_ids_BT=batch.segment_ids)
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    nll = -jnp.take_along_axis(logp, batch.tokens[:, 1:, None], axis=-1)[..., 0]
    return float((nll * batch.loss_mask[:, 1:]).sum() / batch.loss_mask[:, 1:].sum())


def _run(n_devices: int, micro_batch: int, steps: int = 3):
    mesh = helpers.mesh_of(n_devices)
    train_step, state, _, graphdef = helpers.setup(mesh, micro_batch=micro_batch)
    expected_first = _reference_loss(graphdef, state.params, helpers.synthetic_batch(0))
    losses, all_metrics = [], []
    for i in range(steps):
        state, metrics = train_step(state, helpers.to_mesh(helpers.synthetic_batch(i), mesh))
        losses.append(float(metrics["loss"]))
        all_metrics.append(jax.device_get(metrics))
    assert losses[0] == pytest.approx(expected_first, abs=1e-5)
    return losses, jax.device_get(state), all_metrics


def test_micro_batching_and_devices_do_not_change_loss_or_params():
    ref_losses, ref_state, metrics = _run(1, micro_batch=8)  # accumulation 1
    assert int(ref_state.step) == 3
    assert float(metrics[0]["learning_rate"]) == 0.0 and float(metrics[1]["learning_rate"]) > 0  # warmup
    assert float(metrics[0]["loss_tokens"]) == helpers.synthetic_batch(0).loss_mask[:, 1:].sum()
    assert all(np.isfinite(float(m["grad_norm"])) and m["tokens"] == 8 * 16 for m in metrics)
    for n_devices, micro in ((1, 2), (8, 1)):  # accumulation 4; 8 data shards x accumulation 1
        losses, state, _ = _run(n_devices, micro)
        np.testing.assert_allclose(losses, ref_losses, atol=1e-5, rtol=0)
        for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_state.params), strict=True):
            np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
