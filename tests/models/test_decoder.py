"""Decoder properties: KV cache == full forward, packing isolation, causality, remat."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from atlas_jax.config import RopeScalingConfig
from atlas_jax.models import Decoder, KVCache, init_model
from tests.tiny import tiny_config

CFG = tiny_config(vocab_size=96, tie_word_embeddings=False,
                  rope_scaling=RopeScalingConfig(rope_type="llama3", original_max_position_embeddings=16))


@pytest.fixture(scope="module")
def model():
    return init_model(CFG, seed=1)


def test_jit_and_eager_agree_and_split_merge_works(model):
    ids = jnp.arange(12, dtype=jnp.int32).reshape(2, 6)
    graphdef, params = nnx.split(model, nnx.Param)
    jitted = jax.jit(lambda p, i: nnx.merge(graphdef, p)(i))(params, ids)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(model(ids)), atol=1e-5)
    x_BTD = model.hidden_states(ids)
    np.testing.assert_allclose(np.asarray(model.logits(x_BTD)), np.asarray(model(ids)), atol=1e-6)


@pytest.mark.parametrize("grow", [False, True])
def test_kv_cache_prefill_then_decode_equals_full_forward(model, grow):
    """Prefill 6 tokens, decode 4 one at a time (over a cache grown after the prefill, or
    not): the full forward's logits. The cache holds one [B, K, S, H] buffer per layer."""
    ids = jnp.asarray(np.random.default_rng(0).integers(1, 96, (2, 10)), jnp.int32)
    mask = jnp.ones((2, 10), jnp.int32).at[1, :3].set(0)
    full = np.asarray(model(ids, mask))
    prompt = 6
    cache = KVCache.empty(CFG, batch=2, slots=6 if grow else 16)
    assert [k.shape for k in cache.k_BKSH] == [(2, 2, cache.segment_ids_BS.shape[1], 8)] * CFG.num_hidden_layers
    x, cache = model.forward_with_cache(ids[:, :prompt], cache, attention_mask=mask[:, :prompt])
    if grow:
        cache = cache.grown(16)
        assert cache.v_BKSH[1].shape == (2, 2, 16, 8) and cache.segment_ids_BS.shape == (2, 16)
    steps = [model.logits(x)]
    next_pos = jnp.sum(mask[:, :prompt], axis=1)
    for t in range(prompt, 10):
        x, cache = model.forward_with_cache(ids[:, t:t + 1], cache, positions_BT=next_pos[:, None],
                                            segment_ids_BT=jnp.ones((2, 1), jnp.int32))
        steps.append(model.logits(x))
        next_pos = next_pos + 1
    assert int(cache.index) == 10
    cached = np.asarray(jnp.concatenate(steps, axis=1))
    real = np.asarray(mask).astype(bool)
    assert np.abs(cached - full)[real].max() <= 1e-4


def test_packed_row_equals_each_sequence_alone(model):
    a = jnp.asarray([[5, 6, 7, 8, 9]], jnp.int32)
    b = jnp.asarray([[11, 12, 13]], jnp.int32)
    packed = jnp.concatenate([a, b, jnp.zeros((1, 2), jnp.int32)], axis=1)
    segments = jnp.asarray([[1, 1, 1, 1, 1, 2, 2, 2, 0, 0]], jnp.int32)
    positions = jnp.asarray([[0, 1, 2, 3, 4, 0, 1, 2, 0, 0]], jnp.int32)
    out = np.asarray(model(packed, positions_BT=positions, segment_ids_BT=segments))
    np.testing.assert_allclose(out[0, :5], np.asarray(model(a))[0], atol=1e-5)
    np.testing.assert_allclose(out[0, 5:8], np.asarray(model(b))[0], atol=1e-5)


def test_causal_by_gradient(model):
    # gradient of position 4's hidden state w.r.t. the embedding rows: zero for future tokens
    ids = jnp.arange(1, 9, dtype=jnp.int32)[None]
    graphdef, params = nnx.split(model, nnx.Param)

    def hidden_sum(embed, t):
        p = nnx.State({**params, "embed": params["embed"].replace(embed)})
        return nnx.merge(graphdef, p).hidden_states(ids)[0, t].sum()

    g = jax.grad(hidden_sum)(params["embed"][...], 4)
    touched = np.abs(np.asarray(g)).sum(axis=1) > 0
    assert touched[np.asarray(ids[0, :5])].all() and not touched[np.asarray(ids[0, 5:])].any()


@pytest.mark.parametrize("remat", ["save_weight_matmuls", "save_layer_inputs"])
def test_remat_keeps_gradients(model, remat):
    ids = jnp.arange(1, 9, dtype=jnp.int32)[None]
    graphdef, params = nnx.split(model, nnx.Param)
    other = nnx.split(Decoder(dataclasses.replace(CFG, remat=remat), rngs=nnx.Rngs(0)), nnx.Param)[0]

    def loss(p, gd):
        return jnp.mean(nnx.merge(gd, p)(ids) ** 2)

    g0 = jax.grad(loss)(params, graphdef)
    g1 = jax.grad(loss)(params, other)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
