"""Optimizer from config: schedules, warmup, decay mask, clipping."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from atlas_jax.config import TrainerConfig
from atlas_jax.train import optim

BASE = TrainerConfig(learning_rate=1.0, warmup_ratio=0.1, weight_decay=0.5, max_grad_norm=1.0)


@pytest.mark.parametrize("kind,mid,end", [("constant", 1.0, 1.0), ("cosine", 0.5, 0.0), ("linear", 0.5, 0.0)])
def test_schedules_warm_up_then_decay(kind, mid, end):
    schedule = optim.make_schedule(dataclasses.replace(BASE, lr_scheduler_type=kind), 100)
    assert float(schedule(0)) == 0.0 and float(schedule(5)) == pytest.approx(0.5)  # 10 warmup steps
    assert float(schedule(10)) == pytest.approx(1.0)
    assert float(schedule(10 + 45)) == pytest.approx(mid, abs=1e-6)
    assert float(schedule(100)) == pytest.approx(end, abs=1e-6)
    assert optim.warmup_steps(BASE, 110) == 11  # 0.1 * 110 = 11.000000000000002 in floats


def test_warmup_steps_override_ratio():
    cfg = dataclasses.replace(BASE, warmup_steps=4, lr_scheduler_type="constant")
    assert optim.warmup_steps(cfg, 100) == 4
    assert float(optim.make_schedule(cfg, 100)(2)) == pytest.approx(0.5)


def test_decay_skips_norms_and_biases_and_clipping_bounds_the_update():
    params = {"layers": {"q_proj": jnp.ones((2, 4, 4)), "input_norm": jnp.ones((2, 4)), "q_bias": jnp.ones((2, 4, 1))},
              "embed": jnp.ones((8, 4))}
    mask = optim.decay_mask(params)
    assert mask == {"layers": {"q_proj": True, "input_norm": False, "q_bias": False}, "embed": True}
    cfg = dataclasses.replace(BASE, lr_scheduler_type="constant", warmup_ratio=0.0, learning_rate=0.1)
    tx = optim.make_optimizer(cfg, 10)
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero_grads, tx.init(params), params)
    # zero gradient: only decoupled weight decay moves the decayed weights (-lr * wd * p)
    np.testing.assert_allclose(updates["layers"]["q_proj"], -0.05)
    np.testing.assert_allclose(updates["layers"]["input_norm"], 0.0)
    np.testing.assert_allclose(updates["layers"]["q_bias"], 0.0)
    huge = jax.tree.map(lambda p: 1e6 * jnp.ones_like(p), params)
    clip = optax.clip_by_global_norm(1.0)
    clipped, _ = clip.update(huge, clip.init(params))
    assert float(optax.global_norm(clipped)) == pytest.approx(1.0, rel=1e-5)
