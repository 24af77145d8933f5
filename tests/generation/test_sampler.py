"""generate: greedy parity with transformers, seeds, buckets, sharding, G samples, segments."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from atlas_jax.config import MeshConfig
from atlas_jax.generation import generate
from atlas_jax.generation.sampler import TRACES, bucket, segment_ends
from atlas_jax.models import from_pretrained, init_model
from atlas_jax.parallel import make_mesh
from tests.tiny import TINY


def _hf_model(family, path):
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[family]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cls(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, vocab_size=128, tie_word_embeddings=family == "qwen2")).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path, safe_serialization=True)
    return model


def _prompts():
    rng = np.random.default_rng(1)
    ids = rng.integers(3, 128, (3, 7)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :2] = 0
    mask[2, :5] = 0
    ids[mask == 0] = 0
    return ids, mask


def _hf_greedy(model, ids, mask, new, eos):
    with torch.no_grad():
        out = model.generate(input_ids=torch.as_tensor(ids, dtype=torch.long),
                             attention_mask=torch.as_tensor(mask, dtype=torch.long), max_new_tokens=new,
                             do_sample=False, pad_token_id=0, eos_token_id=eos)
    ref = np.zeros((ids.shape[0], new), np.int32)  # transformers stops early when all rows end
    gen = out.numpy()[:, ids.shape[1]:]
    ref[:, :gen.shape[1]] = gen
    return ref


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_greedy_matches_transformers(family, tmp_path):
    hf = _hf_model(family, tmp_path)
    model = from_pretrained(str(tmp_path))
    ids, mask = _prompts()
    free = generate(model, ids, mask, max_new_tokens=10)
    np.testing.assert_array_equal(np.asarray(free.tokens), _hf_greedy(hf, ids, mask, 10, None))
    assert (np.asarray(free.lengths) == 10).all()
    # stop on a token row 0 really emits at step 3 (and a second, unused EOS id)
    eos = int(np.asarray(free.tokens)[0, 3])
    unused = int(np.setdiff1d(np.arange(128), np.asarray(free.tokens))[0])
    hit = generate(model, ids, mask, max_new_tokens=10, eos_token_id=[unused, eos])
    tokens = np.asarray(hit.tokens)
    np.testing.assert_array_equal(tokens, _hf_greedy(hf, ids, mask, 10, [unused, eos]))
    lengths = np.asarray(hit.lengths)
    assert lengths[0] <= 4 and tokens[0, lengths[0] - 1] == eos
    logprobs = np.asarray(hit.logprobs)
    for row, n in enumerate(lengths):
        assert (tokens[row, n:] == 0).all() and (logprobs[row, n:] == 0).all() and (logprobs[row, :n] < 0).all()



def test_logit_bias_matches_transformers_sequence_bias(tmp_path):
    """{token: bias} is transformers' sequence_bias of one-token sequences, at every step."""
    hf = _hf_model("qwen3", tmp_path)
    model = from_pretrained(str(tmp_path))
    ids, mask = _prompts()
    free = np.asarray(generate(model, ids, mask, max_new_tokens=8).tokens)
    # raise a token greedy never picks just enough to win some steps, and lower one it picks
    bias = {int(np.setdiff1d(np.arange(128), free)[0]): 1.5, int(free[0, 0]): -2.0}
    ours = generate(model, ids, mask, max_new_tokens=8, logit_bias=bias)
    with torch.no_grad():
        out = hf.generate(input_ids=torch.as_tensor(ids, dtype=torch.long),
                          attention_mask=torch.as_tensor(mask, dtype=torch.long), max_new_tokens=8,
                          do_sample=False, pad_token_id=0, eos_token_id=None,
                          sequence_bias={(t,): b for t, b in bias.items()})
    theirs = out.numpy()[:, ids.shape[1]:]
    np.testing.assert_array_equal(np.asarray(ours.tokens), theirs)
    assert (np.asarray(ours.tokens) != free).any()  # the bias changed what greedy picks

@pytest.fixture(scope="module")
def tiny():
    return init_model(TINY, seed=0)


def test_top_k_one_is_greedy_and_seed_is_deterministic(tiny):
    ids, mask = _prompts()
    ids = ids % 64
    greedy = generate(tiny, ids, mask, max_new_tokens=6)
    top1 = generate(tiny, ids, mask, max_new_tokens=6, temperature=1.3, top_k=1, seed=7)
    np.testing.assert_array_equal(np.asarray(top1.tokens), np.asarray(greedy.tokens))
    a = generate(tiny, ids, mask, max_new_tokens=6, temperature=1.0, seed=3)
    b = generate(tiny, ids, mask, max_new_tokens=6, temperature=1.0, seed=3)
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))


def test_same_bucket_does_not_recompile(tiny):
    ids, mask = _prompts()
    ids = ids % 64
    generate(tiny, ids, mask, max_new_tokens=10, temperature=0.5)
    before = TRACES["count"]
    generate(tiny, ids[:, 2:], mask[:, 2:], max_new_tokens=12, temperature=0.9, seed=4)
    assert TRACES["count"] == before


def test_a_checkpoint_of_the_same_architecture_reuses_the_program(tiny, tmp_path):
    """Where the weights came from is not part of the program: the saved and reloaded model
    (its config naming the directory) samples with the program the random one compiled."""
    from atlas_jax.models import save_pretrained

    ids, mask = _prompts()
    ids = ids % 64
    first = generate(tiny, ids, mask, max_new_tokens=10)
    save_pretrained(tiny, str(tmp_path / "hf"))
    loaded = from_pretrained(str(tmp_path / "hf"), config=TINY)
    assert loaded.config.model_name_or_path == str(tmp_path / "hf") and tiny.config.model_name_or_path is None
    before = TRACES["count"]
    again = generate(loaded, ids, mask, max_new_tokens=10)
    assert TRACES["count"] == before
    np.testing.assert_array_equal(np.asarray(again.tokens), np.asarray(first.tokens))


def test_logit_bias_is_traced_checked_and_shortens_completions(tiny):
    ids, mask = _prompts()
    ids = ids % 64
    eos = 7
    # one program: no batch shrinks as rows finish (those programs: test_dropping_finished_rows...)
    kw = dict(max_new_tokens=12, temperature=1.0, seed=2, eos_token_id=eos, num_samples=8, drop_finished=False)
    plain = generate(tiny, ids, mask, **kw)
    before = TRACES["count"]
    zero = generate(tiny, ids, mask, **kw, logit_bias={eos: 0.0})
    sooner = generate(tiny, ids, mask, **kw, logit_bias={eos: 3.0})
    assert TRACES["count"] == before  # the bias is an argument of the program, not a constant
    for name in ("tokens", "logprobs", "lengths"):
        np.testing.assert_array_equal(np.asarray(getattr(zero, name)), np.asarray(getattr(plain, name)))
    assert np.asarray(sooner.lengths).mean() < np.asarray(plain.lengths).mean() - 2
    banned = generate(tiny, ids, mask, max_new_tokens=12, temperature=1.0, seed=2, num_samples=8,
                      logit_bias={eos: -np.inf})
    assert not (np.asarray(banned.tokens) == eos).any()
    for bad, match in (({64: 1.0}, "token id 64 is outside the vocabulary"), ({-1: 1.0}, "token id -1"),
                       ({3: float("nan")}, "token id 3 has bias nan")):
        with pytest.raises(ValueError, match=match):
            generate(tiny, ids, mask, max_new_tokens=4, logit_bias=bad)


def test_num_samples_rows_are_prompt_major_and_independent(tiny):
    ids, mask = _prompts()
    ids = ids % 64
    G = 4
    greedy = np.asarray(generate(tiny, ids, mask, max_new_tokens=5).tokens)
    out = generate(tiny, ids, mask, max_new_tokens=5, num_samples=G)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.repeat(greedy, G, axis=0))
    sampled = np.asarray(generate(tiny, ids, mask, max_new_tokens=5, num_samples=G, temperature=2.0).tokens)
    assert sampled.shape == (3 * G, 5)
    assert len({tuple(r) for r in sampled[:G]}) > 1  # one prompt's samples differ


def test_sharded_greedy_equals_single_device(tiny):
    ids, mask = _prompts()
    ids = ids % 64
    mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
    sharded = init_model(tiny.config, mesh=mesh, seed=0)
    single = np.asarray(generate(tiny, ids, mask, max_new_tokens=6).tokens)
    out = generate(sharded, ids, mask, max_new_tokens=6, num_samples=2)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.repeat(single, 2, axis=0))


def test_long_budgets_decode_in_segments_like_a_full_forward(tiny):
    """A budget from SEGMENTED_BUDGET on decodes in segments over a growing cache. Every
    sampled token's logprob equals the full forward's over prompt + completion, across the
    segment boundaries too, and 8 devices give the single device's greedy tokens."""
    ids, mask = _prompts()
    ids, G, new = ids % 64, 2, 300
    assert segment_ends(bucket(new)) == (128, 256, 512)
    out = generate(tiny, ids, mask, max_new_tokens=new, temperature=1.0, num_samples=G, seed=5)
    tokens, logps = np.asarray(out.tokens), np.asarray(out.logprobs)
    assert tokens.shape == (3 * G, new) and (np.asarray(out.lengths) == new).all()
    full_ids = np.concatenate([np.repeat(ids, G, 0), tokens], axis=1)
    full_mask = np.concatenate([np.repeat(mask, G, 0), np.ones_like(tokens)], axis=1)
    logits = jax.nn.log_softmax(tiny(jnp.asarray(full_ids), jnp.asarray(full_mask)), axis=-1)
    expected = np.take_along_axis(np.asarray(logits[:, ids.shape[1] - 1:-1]), tokens[..., None], axis=-1)[..., 0]
    np.testing.assert_allclose(logps, expected, atol=2e-4)

    mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
    sharded = init_model(tiny.config, mesh=mesh, seed=0)
    single = np.asarray(generate(tiny, ids, mask, max_new_tokens=new).tokens)
    np.testing.assert_array_equal(np.asarray(generate(sharded, ids, mask, max_new_tokens=new).tokens), single)


@pytest.mark.parametrize("new", [12, 300])
def test_dropping_finished_rows_changes_no_token(tiny, new, monkeypatch):
    """Rows that emitted EOS leave the batch once half of it has finished (drop_finished): the
    tokens and lengths are those of a batch that carries every row to the end, the logprobs
    equal up to float rounding (the batch size changes XLA's blocking), on 1 and 8 devices,
    within one segment (12) and across the segments of a growing cache (300)."""
    from atlas_jax.generation import sampler

    continued = []
    jitted = sampler._continue

    def recording(*args, **kwargs):
        continued.append(kwargs["rows"])
        return jitted(*args, **kwargs)

    monkeypatch.setattr(sampler, "_continue", recording)
    ids, mask = _prompts()
    ids = ids % 64
    kw = dict(max_new_tokens=new, temperature=1.0, seed=2, eos_token_id=7, num_samples=8,
              logit_bias={7: 2.5 if new < 100 else 0.5})
    mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
    for model in (tiny, init_model(tiny.config, mesh=mesh, seed=0)):
        kept = generate(model, ids, mask, drop_finished=False, **kw)
        assert not continued
        dropped = generate(model, ids, mask, **kw)
        assert continued and continued == sorted(continued, reverse=True) and continued[0] <= 16, continued
        lengths = np.asarray(kept.lengths)
        assert lengths.min() < new // 2 and lengths.max() > new // 2  # a spread worth dropping rows for
        np.testing.assert_array_equal(np.asarray(dropped.tokens), np.asarray(kept.tokens))
        np.testing.assert_array_equal(np.asarray(dropped.lengths), lengths)
        np.testing.assert_allclose(np.asarray(dropped.logprobs), np.asarray(kept.logprobs), atol=1e-6)
        before, calls = TRACES["count"], len(continued)
        again = generate(model, ids, mask, **kw)
        assert TRACES["count"] == before and len(continued) == 2 * calls  # same shapes: no new programs
        np.testing.assert_array_equal(np.asarray(again.tokens), np.asarray(dropped.tokens))
        continued.clear()


def test_the_plan_of_the_shrunk_decode_is_the_one_that_runs(tiny, monkeypatch):
    """abstract_continue (what memory.report compiles for RL runs) lowers the first `_continue`
    a generate call of those shapes makes: same static arguments, same memory."""
    from atlas_jax import memory
    from atlas_jax.generation import sampler

    calls = []
    jitted = sampler._continue

    def recording(*args, **kwargs):
        def abstract(x):  # uncommitted scalars (placed by jit wherever the mesh is) stay unplaced
            committed = getattr(x, "committed", False)
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding if committed else None)

        calls.append(((args[0], *jax.tree.map(abstract, args[1:])), kwargs))
        return jitted(*args, **kwargs)

    monkeypatch.setattr(sampler, "_continue", recording)
    ids, mask = _prompts()
    mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
    sharded = init_model(tiny.config, mesh=mesh, seed=0)
    generate(sharded, ids % 64, mask, max_new_tokens=12, temperature=1.0, seed=2, eos_token_id=7, num_samples=8,
             logit_bias={7: 2.0})
    program, args, kwargs = sampler.abstract_continue(sharded, mesh, prompts=3, prompt_length=7, max_new_tokens=12,
                                                      num_samples=8, sort=False)
    ran_args, ran_kwargs = calls[0]
    assert program is recording and kwargs == ran_kwargs and kwargs["rows"] == 16
    planned = memory.ProgramMemory.of(jitted.lower(*args, **kwargs).compile())
    ran = memory.ProgramMemory.of(jitted.lower(*ran_args, **ran_kwargs).compile())
    assert abs(planned.peak - ran.peak) <= 0.1 * ran.peak, (planned, ran)
    assert sampler.abstract_continue(sharded, mesh, prompts=1, prompt_length=7, max_new_tokens=12, num_samples=2,
                                     sort=False) is None  # 4 prompts (dp 4) x 2 = 8 rows: too few to shrink
