"""models/matmul.dense: autodiff's values and gradients, with every matmul of the backward
pass in the form XLA:CPU runs on its fast (YNNPACK) kernels."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from atlas_jax.models import attention
from atlas_jax.models.matmul import dense


def slow_dots(fn, *args) -> int:
    """Dots of fn's compiled CPU program outside YNNPACK fusions."""
    text = jax.jit(fn).lower(*args).compile().as_text()
    fast = set(re.findall(r"calls=%([\w.-]+).*__ynn_fusion", text))
    slow, computation = 0, None
    for line in text.splitlines():
        header = re.match(r"^(?:ENTRY )?%([\w.-]+) ", line)
        if header:
            computation = header.group(1)
        slow += " dot(" in line and computation not in fast
    return slow


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("M, I, O", [(64, 32, 96), (64, 96, 32)])  # x or dy the narrower
def test_dense_is_autodiffs_matmul(M, I, O, transposed):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(M, I)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(O, I) if transposed else (I, O)), jnp.float32)
    weights = jnp.asarray(rng.normal(size=(M, O)), jnp.float32)

    def loss(product):
        return lambda x, w: jnp.sum(jnp.sin(product(x, w)) * weights)

    ours = jax.value_and_grad(loss(lambda x, w: dense(x, w, transposed=transposed)), argnums=(0, 1))
    ref = jax.value_and_grad(loss(lambda x, w: x @ (w.T if transposed else w)), argnums=(0, 1))
    (got, got_grads), (want, want_grads) = jax.jit(ours)(x, w), ref(x, w)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for a, b in zip(got_grads, want_grads):
        assert a.shape == b.shape
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4)
    assert jax.default_backend() == "cpu"
    assert slow_dots(jax.grad(loss(lambda x, w: dense(x, w, transposed=transposed)), (0, 1)), x, w) == 0
    # autodiff's weight gradient contracts x's first axis: the slow form this module avoids
    assert slow_dots(jax.grad(loss(lambda x, w: x @ (w.T if transposed else w)), (0, 1)), x, w) > 0


def test_dense_keeps_the_output_dtype():
    x, w = jnp.ones((8, 4), jnp.bfloat16), jnp.ones((4, 16), jnp.bfloat16)
    assert dense(x, w).dtype == jnp.bfloat16
    assert dense(x, w, out_dtype=jnp.float32).dtype == jnp.float32
    dx, dw = jax.grad(lambda x, w: jnp.sum(dense(x, w, out_dtype=jnp.float32)), (0, 1))(x, w)
    assert (dx.dtype, dw.dtype) == (jnp.bfloat16, jnp.bfloat16)


def test_training_attention_backward_has_no_slow_dots():
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.normal(size=(2, 32, 4, 16)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(2, 32, 2, 16)), jnp.float32) for _ in range(2))
    mask = jnp.asarray(np.tril(np.ones((32, 32), bool))[None].repeat(2, 0))
    loss = lambda q, k, v: jnp.sum(jnp.sin(attention.attend(q, k, v, mask, cached=False)))  # noqa: E731
    assert slow_dots(jax.grad(loss, (0, 1, 2)), q, k, v) == 0
