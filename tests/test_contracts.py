"""DESIGN.md's "Contracts other parts rely on": each signature called with keywords, as written
there, so a renamed argument fails here before it fails a user or a benchmark."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from atlas_jax import parallel
from atlas_jax.config import MeshConfig
from atlas_jax.data.batch import Batch, to_global
from atlas_jax.generation import generate
from atlas_jax.models import from_pretrained, save_pretrained
from atlas_jax.rl import policy
from atlas_jax.rl.rewards import adaptive_teaching_reward
from tests.models.conftest import left_padded_batch, make_hf_model  # noqa: F401  (fixture reused)


@pytest.fixture(scope="module")
def saved_dir(tmp_path_factory):
    """A directory written by our save_pretrained, from a tiny random transformers Qwen2."""
    source = tmp_path_factory.mktemp("hf_qwen2")
    make_hf_model("qwen2", source)
    out = tmp_path_factory.mktemp("saved")
    save_pretrained(model=from_pretrained(str(source)), path=str(out))
    return str(out)


@pytest.fixture(scope="module")
def model(saved_dir):
    return from_pretrained(path=saved_dir, dtype="float32", mesh=None)


def _transformers_logits(path, ids, mask):
    from transformers import AutoModelForCausalLM

    theirs = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        return theirs(input_ids=torch.as_tensor(ids, dtype=torch.long),
                      attention_mask=torch.as_tensor(mask, dtype=torch.long)).logits.numpy()


def test_from_pretrained_and_save_pretrained_match_transformers(model, saved_dir, left_padded_batch):
    ids, mask = left_padded_batch
    assert mask[:, 0].min() == 0 and mask[:, -1].min() == 1  # left padding
    logits = np.asarray(model(ids, attention_mask=mask))
    assert logits.dtype == np.float32 and logits.shape == (*ids.shape, model.config.vocab_size)
    real = mask.astype(bool)
    assert np.abs(logits - _transformers_logits(saved_dir, ids, mask))[real].max() <= 1e-4
    full = np.ones_like(mask)
    np.testing.assert_array_equal(np.asarray(model(input_ids=ids)), np.asarray(model(ids, attention_mask=full)))


def test_generate_output_shapes_and_dtypes(model, left_padded_batch):
    ids, mask = left_padded_batch
    out = generate(model=model, input_ids=ids, attention_mask=mask, max_new_tokens=5, temperature=0.0,
                   top_p=1.0, top_k=0, min_p=0.0, eos_token_id=None, pad_token_id=0, seed=0, num_samples=2,
                   mesh=None, grow_cache=True)
    rows = ids.shape[0] * 2
    assert out.tokens.shape == (rows, 5) and out.tokens.dtype == jnp.int32
    assert out.logprobs.shape == (rows, 5) and out.logprobs.dtype == jnp.float32
    assert out.lengths.shape == (rows,) and out.lengths.dtype == jnp.int32
    assert (np.asarray(out.lengths) == 5).all()  # no EOS: every row runs the budget
    tokens = np.asarray(out.tokens)
    np.testing.assert_array_equal(tokens[0::2], tokens[1::2])  # prompt-major; greedy samples agree


def test_adaptive_teaching_reward_jits():
    kw = dict(perf_with_teaching=jnp.array([1.0, 0.0, 1.0, 0.5]), perf_baseline=jnp.array([0.0, 1.0, 1.0, 0.5]),
              teaching_length=jnp.array([100, 10, 0, 5]), has_answer=jnp.array([True, True, True, False]))
    fn = jax.jit(lambda **signals: adaptive_teaching_reward(
        **signals, efficiency_weight=1.0, baseline_threshold=0.5, degradation_penalty_multiplier=2.0))
    reward = fn(**kw)
    assert reward.dtype == jnp.float32 and reward.shape == (4,)
    np.testing.assert_allclose(np.asarray(reward), [1.5, -2.0, 1.0, 0.0], rtol=1e-6)


def test_make_logprob_fn_gives_next_token_logprobs(model, left_padded_batch):
    ids, mask = left_padded_batch
    mesh = parallel.make_mesh(MeshConfig(name="contract", fsdp=-1), jax.devices()[:1])
    graphdef, params = nnx.split(model, nnx.Param)
    shardings = jax.tree.map(lambda x: x.sharding, params)
    batch = Batch(tokens=ids, positions=np.maximum(np.cumsum(mask, 1) - 1, 0).astype(np.int32),
                  segment_ids=mask.astype(np.int32), loss_mask=mask.astype(np.float32))
    fn = policy.make_logprob_fn(graphdef=graphdef, mesh=mesh, shardings=shardings, temperature=1.0, accum_steps=1)
    logp_BT = np.asarray(fn(params, to_global(batch, mesh)))
    assert logp_BT.shape == ids.shape
    want_BTV = jax.nn.log_softmax(np.asarray(model(ids, attention_mask=mask)), axis=-1)
    want_BT = np.take_along_axis(np.asarray(want_BTV)[:, :-1], ids[:, 1:, None], axis=-1)[..., 0]
    both = mask[:, :-1].astype(bool) & mask[:, 1:].astype(bool)
    np.testing.assert_allclose(logp_BT[:, :-1][both], want_BT[both], atol=1e-5)


def test_in_host_memory_and_on_device():
    on_host = jax.device_put(jnp.arange(4.0), jax.memory.Space.Host)
    assert parallel.in_host_memory(x=on_host)
    fetched = parallel.on_device(x=on_host)
    assert not parallel.in_host_memory(x=fetched)
    np.testing.assert_array_equal(np.asarray(fetched), np.arange(4.0))
    traced = []  # inside jit (the layer scan's case) the tracer says where its buffer lives

    def double(x):
        traced.append(parallel.in_host_memory(x=x))
        return parallel.on_device(x=x) * 2

    np.testing.assert_array_equal(np.asarray(jax.jit(double)(on_host)), 2 * np.arange(4.0))
    assert traced == [True]
    already = jnp.ones(3)
    assert parallel.on_device(x=already) is already
