"""Attention's one entry point: the path it picks on each platform, and every path exact."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from atlas_jax.models import attention, init_model
from tests.tiny import TINY


def _qkv_mask(B=2, T=64, S=96, N=4, K=2, H=8, seed=0):
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.normal(size=shape), jnp.float32)
               for shape in ((B, T, N, H), (B, S, K, H), (B, S, K, H)))
    mask = jnp.asarray(np.tril(np.ones((T, S), bool), k=S - T)[None].repeat(B, 0)).at[0, :, :5].set(False)
    return q, k, v, mask


def _whole(q, k, v, mask):
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], scale=q.shape[-1] ** -0.5)


@pytest.mark.parametrize("num_queries, cached, platform, path", [
    (1, True, "gpu", "whole"),  # a decode step on GPU keeps dot_product_attention
    (1, True, "tpu", "whole"),
    (1, True, "cpu", "one_query_sums"),  # XLA:CPU's T=1 dots are slow
    (64, True, "gpu", "query_blocks"),  # a cached prefill bounds its scores everywhere
    (64, True, "cpu", "query_blocks"),
    (64, False, "cpu", "query_blocks"),  # training: bounded scores on every platform
    (64, False, "gpu", "query_blocks"),  # training on GPU too: XLA's default holds the scores
    (64, False, "tpu", "query_blocks"),
    (1, False, "cpu", "query_blocks"),  # one token without a cache is no decode step
])
def test_path_by_platform(num_queries, cached, platform, path):
    assert attention.attention_path(num_queries, cached=cached, platform=platform) == path


@pytest.mark.parametrize("T", [64, 60])  # 60: the last 16-query block is part padding
def test_cached_prefill_in_query_blocks_equals_whole(monkeypatch, T):
    q, k, v, mask = _qkv_mask(T=T)
    B, T, N, _ = q.shape
    monkeypatch.setattr(attention, "SCORES_PER_BLOCK", B * N * k.shape[1] * 16)  # 16-query blocks
    blocked = jax.jit(lambda *a: attention.attend(*a, cached=True))(q, k, v, mask)
    np.testing.assert_allclose(np.asarray(blocked), np.asarray(_whole(q, k, v, mask)), atol=1e-6)


def test_decode_step_as_sums_equals_whole():
    q, k, v, mask = _qkv_mask(T=1, seed=1)
    assert jax.default_backend() == "cpu"  # the CPU path is the one under test
    out = jax.jit(lambda *a: attention.attend(*a, cached=True))(q, k, v, mask)
    np.testing.assert_allclose(np.asarray(out), np.asarray(_whole(q, k, v, mask)), atol=1e-6)


def test_training_attention_in_query_blocks_keeps_loss_and_gradients(monkeypatch):
    """On CPU the training forward attends in query blocks once the scores would pass
    SCORES_PER_BLOCK: the same loss and gradients as attending all queries at once."""
    model = init_model(TINY, seed=1)
    tokens = jnp.asarray(np.random.default_rng(3).integers(1, TINY.vocab_size, (2, 32)), jnp.int32)
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(p):
        logits = nnx.merge(graphdef, p)(tokens)
        return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, tokens[..., None], -1)[..., 0])

    whole = jax.value_and_grad(loss)(params)  # 2 x 4 x 32 x 32 scores: one block
    monkeypatch.setattr(attention, "SCORES_PER_BLOCK", 2 * 4 * 32 * 8)  # 8-query blocks
    blocked = jax.value_and_grad(loss)(params)
    assert jax.default_backend() == "cpu"
    np.testing.assert_allclose(blocked[0], whole[0], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(blocked[1]), jax.tree.leaves(whole[1])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_training_attention_gradients_equal_the_library_call():
    """The CPU training path writes its backward pass out (attention._softmax_attention):
    values and q/k/v gradients as jax.nn.dot_product_attention's autodiff, rows that see no
    key (padding-only rows: uniform over masked scores) included."""
    q, k, v, mask = _qkv_mask(T=64, S=64)
    mask = mask.at[1, 7].set(False)  # a row with no visible key
    w = jnp.asarray(np.random.default_rng(5).normal(size=q.shape), jnp.float32)
    assert jax.default_backend() == "cpu"

    def loss(attn):
        return lambda q, k, v: jnp.sum(attn(q, k, v) * w)

    ours = jax.jit(jax.value_and_grad(loss(lambda *a: attention.attend(*a, mask, cached=False)), argnums=(0, 1, 2)))
    ref = jax.value_and_grad(loss(lambda *a: _whole(*a, mask)), argnums=(0, 1, 2))
    (got, got_grads), (want, want_grads) = ours(q, k, v), ref(q, k, v)
    np.testing.assert_allclose(got, want, rtol=1e-4)  # a sum over 4096 products of O(1)
    out = jax.jit(lambda *a: attention.attend(*a, mask, cached=False))(q, k, v)
    np.testing.assert_allclose(np.asarray(out), np.asarray(_whole(q, k, v, mask)), atol=1e-6)
    for a, b in zip(got_grads, want_grads):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)
