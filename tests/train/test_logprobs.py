"""The chunked next-token pass: any chunk size (padded or not) gives the unchunked scores
and gradients; SFT's NLL and GRPO's log-probs are both read off it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from atlas_jax.models import init_model
from atlas_jax.rl import policy
from atlas_jax.train import logprobs, sft
from tests.tiny import TINY
from tests.train import helpers


def _unchunked(model, batch, temperature=1.0):
    """log p(next token) from the whole logits_BTV at once."""
    logits = model(batch.tokens, positions_BT=batch.positions, segment_ids_BT=batch.segment_ids) / temperature
    targets, mask = logprobs.next_token_targets(batch)
    return jnp.take_along_axis(jax.nn.log_softmax(logits, -1), targets[..., None], -1)[..., 0], mask


def _logp(logits_BcV, targets_Bc):
    return jnp.take_along_axis(jax.nn.log_softmax(logits_BcV, -1), targets_Bc[..., None], -1)[..., 0]


@pytest.fixture(scope="module")
def model_and_batch():
    return init_model(TINY, seed=0), jax.tree.map(jnp.asarray, helpers.synthetic_batch(0, batch=4, length=10))


def test_targets_are_the_next_tokens_with_their_mask(model_and_batch):
    _, batch = model_and_batch
    targets, mask = logprobs.next_token_targets(batch)
    np.testing.assert_array_equal(targets[:, :-1], batch.tokens[:, 1:])
    np.testing.assert_array_equal(mask[:, :-1], batch.loss_mask[:, 1:])
    assert not np.asarray(mask[:, -1]).any()


@pytest.mark.parametrize("chunk", [3, 5, 10, 1024])  # padded, exact, one chunk, longer than T
def test_any_chunk_gives_the_unchunked_logprobs(model_and_batch, chunk):
    model, batch = model_and_batch
    expected, mask = _unchunked(model, batch)
    got, got_mask = logprobs.next_token_scores(model, batch, _logp, chunk=chunk)
    assert got.shape == expected.shape
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-5)
    np.testing.assert_array_equal(got_mask, mask)


def test_chunked_gradients_equal_unchunked(model_and_batch):
    model, batch = model_and_batch
    graphdef, params = nnx.split(model, nnx.Param)

    def chunked(p):
        return sft.batch_nll(nnx.merge(graphdef, p), batch)[0]

    def whole(p):
        logp, mask = _unchunked(nnx.merge(graphdef, p), batch)
        return -jnp.sum(logp * mask)

    (a, ga), (b, gb) = jax.value_and_grad(chunked)(params), jax.value_and_grad(whole)(params)
    np.testing.assert_allclose(float(a), float(b), rtol=1e-5)
    for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5)


def test_sft_and_grpo_read_the_same_pass(model_and_batch):
    """SFT's summed NLL is minus the sum of GRPO's log-probs at temperature 1 over the same mask."""
    model, batch = model_and_batch
    nll, tokens = sft.batch_nll(model, batch)
    logp, entropy, mask = policy.shifted_logprobs(model, batch, 1.0)
    np.testing.assert_allclose(float(nll), -float(jnp.sum(logp * mask)), rtol=1e-6)
    assert float(tokens) == float(jnp.sum(mask)) and np.all(np.asarray(entropy) >= 0)
