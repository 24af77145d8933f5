"""Next-token choice: sampled frequencies follow the filtered, tempered softmax."""

import jax
import jax.numpy as jnp
import numpy as np

from atlas_jax.generation import filtered_logits, sample_tokens


def test_sampled_frequencies_match_tempered_softmax():
    logits = jnp.asarray([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    n = 40_000
    keys = jax.random.split(jax.random.key(0), n)
    for temperature, top_k, top_p, min_p in [(0.7, 0, 1.0, 0.0), (1.0, 3, 1.0, 0.0), (1.5, 0, 0.8, 0.0),
                                             (1.0, 0, 1.0, 0.2)]:
        args = (jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p), jnp.float32(min_p))
        sort = top_k > 0 or top_p < 1
        expected = np.asarray(jax.nn.softmax(filtered_logits(logits, *args, sort=sort)))[0]
        tokens, logps = jax.jit(lambda k: sample_tokens(k, jnp.repeat(logits, n, 0), *args, sort=sort))(keys)
        freq = np.bincount(np.asarray(tokens), minlength=6) / n
        sigma = np.sqrt(expected * (1 - expected) / n) + 1e-9
        assert (np.abs(freq - expected) <= 5 * sigma + 1e-6).all(), (temperature, top_k, top_p, min_p, freq, expected)
        np.testing.assert_allclose(np.exp(np.asarray(logps)), expected[np.asarray(tokens)], rtol=1e-5)
    # the filters really cut: top_k=3 leaves 3 tokens, top_p=0.8 at T=1.5 leaves the nucleus
    probs = jax.nn.softmax(filtered_logits(logits, 1.0, 3, 1.0, 0.0, sort=True))
    assert int((probs > 0).sum()) == 3
