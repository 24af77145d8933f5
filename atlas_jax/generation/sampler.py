"""One jitted program per shape bucket: prefill left-padded prompts, then a decode loop.

The decoder's own KV-cache path does the work (no second copy of the layers). Prompts are
left-padded to a power-of-two length, the token budget and the batch are rounded up the
same way, so calls with similar shapes reuse one compiled program; sampling settings are
traced values and never recompile; so is `logit_bias`, one float per vocabulary entry
added to every step's logits before sampling. With num_samples=G the prompts are prefilled
once and the cache is repeated G times (rows prompt-major). Long budgets decode in segments (a
quarter, a quarter, a half of the budget) over a cache grown between them, so attention
reads the slots a segment can fill rather than the whole budget from the first step:
0.69 of the reads for a full budget. Row r's random stream is
fold_in(fold_in(key(seed), r), step): deterministic, independent per row, and the same
whatever the batch padding or the device layout.

Rows that emitted EOS stop costing once half the batch has: the loop exits, the host reads
how many rows are live (one replicated scalar), and `_continue` gathers the live rows into a
batch of the next bucket down (a program per bucket and segment, compiled once) and decodes
on from the same step, writing its rows back into the full outputs; repeated down to
MIN_ROWS. On 2 CPU cores, qwen3_33m, 32 rows of which a quarter run the whole 64-token
budget (bench/grpo_step.py --threads 1 --lengths varied --drop-finished true|false, 3
interleaved pairs on a quiet host, 2026-12-05) the rollout (sampling and reference
log-probs) takes 2.84-2.96 s instead of 3.28-3.47 s, for about 4 s more compile in the first
step; the completions are the same token for token.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from atlas_jax import parallel
from atlas_jax.generation.sampling import sample_tokens
from atlas_jax.models.decoder import Decoder, KVCache

TRACES = {"count": 0}  # incremented when the program is traced: tests assert no recompiles


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class GenerateOutput:
    """tokens int32 [B*G, max_new_tokens] (pad after EOS); logprobs float32 (0 on pad);
    lengths int32 [B*G] (tokens generated, EOS included)."""

    tokens: jax.Array
    logprobs: jax.Array
    lengths: jax.Array


SEGMENTED_BUDGET = 256  # budgets from here on decode in segments (one loop body each to compile)


def segment_ends(budget: int) -> tuple[int, ...]:
    """The decode steps at which the cache grows (the last is the budget)."""
    return (budget // 4, budget // 2, budget) if budget >= SEGMENTED_BUDGET else (budget,)


def bucket(n: int, minimum: int = 16) -> int:
    """Next power of two, at least `minimum`."""
    return max(minimum, 1 << max(0, int(n) - 1).bit_length())


def _constrain(x, mesh: Optional[Mesh], spec: P):
    return x if mesh is None else jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def _cache_spec(mesh: Mesh, kv_heads: int) -> P:
    """One layer's [B, K, S, H] buffer: rows over the data axes, kv heads over tensor."""
    tensor = "tensor" if kv_heads % mesh.shape["tensor"] == 0 else None
    return P(parallel.DATA_AXES, tensor, None, None)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class _Resume:
    """Where a decode loop stopped, for `_continue`: rows in the loop's order, `index_R` their
    rows in the outputs, `live` (replicated) how many have not finished."""

    step: jax.Array
    logits_RV: jax.Array
    cache: KVCache
    pos_R: jax.Array
    done_R: jax.Array
    index_R: jax.Array
    row_ids_R: jax.Array
    live: jax.Array


def _decoder(graphdef, params):
    """(model, its layers' weights taken once, the logits head) for the decode steps: slicing a
    layer out of the stacked weights copies it, so each layer is taken here, once per program,
    for every step to read in place (the cache already has one buffer per layer)."""
    model: Decoder = nnx.merge(graphdef, params)
    table = parallel.on_device(model.embed[...] if model.config.tie_word_embeddings else model.lm_head[...])
    head = table.T if model.config.tie_word_embeddings else table
    return model, model.layers.unstacked(), head.astype(model.dtype)


def _sharded(cache: KVCache, mesh: Optional[Mesh], kv_heads: int) -> KVCache:
    if mesh is None:
        return cache
    spec = _cache_spec(mesh, kv_heads)
    return cache.map_buffers(lambda a_BKSH: _constrain(a_BKSH, mesh, spec))


def _decode(model, layers, head_DV, state, row_keys_R, sampling, *, prompt_slots, ends, sort, mesh):
    """Runs the decode loop over `ends` (the cache grows to prompt_slots + end before each
    segment but the first) until max_new tokens, every row done, or live rows <= min_live."""
    max_new, eos_E, pad_id, temperature, top_k, top_p, min_p, bias_V, min_live = sampling
    rows = P(parallel.DATA_AXES) if mesh is not None else None

    def cond(end, state):
        step, _, _, _, done_R, *_ = state
        live = jnp.sum(~done_R)
        return (step < jnp.minimum(max_new, end)) & (live > 0) & (live > min_live)

    def body(state):
        step, logits_RV, cache, pos_R, done_R, tokens_RS, logps_RS, lengths_R = state
        keys_R = jax.vmap(lambda k: jax.random.fold_in(k, step))(row_keys_R)
        tok_R, logp_R = sample_tokens(keys_R, logits_RV.astype(jnp.float32) + bias_V, temperature, top_k, top_p,
                                      min_p, sort=sort)
        tok_R = jnp.where(done_R, pad_id, tok_R)
        logp_R = jnp.where(done_R, 0.0, logp_R)
        tokens_RS = jax.lax.dynamic_update_index_in_dim(tokens_RS, tok_R, step, 1)
        logps_RS = jax.lax.dynamic_update_index_in_dim(logps_RS, logp_R, step, 1)
        lengths_R = lengths_R + (~done_R).astype(jnp.int32)
        done_R = done_R | jnp.isin(tok_R, eos_E)
        x_R1D, cache = model.forward_with_cache(tok_R[:, None], cache, positions_BT=pos_R[:, None],
                                                segment_ids_BT=jnp.ones((tok_R.shape[0], 1), jnp.int32),
                                                layer_params=layers)
        logits_RV = _constrain(model.logits(x_R1D, head_DV)[:, 0], mesh, rows)
        return step + 1, logits_RV, cache, pos_R + 1, done_R, tokens_RS, logps_RS, lengths_R

    for i, end in enumerate(ends):
        if i:  # room for this segment's tokens (a loop that ended early skips the rest at once)
            grown = _sharded(state[2].grown(prompt_slots + end), mesh, model.config.num_key_value_heads)
            state = (*state[:2], grown, *state[3:])
        state = jax.lax.while_loop(functools.partial(cond, end), body, state)
    return state


def _stopped(state, index_R, row_ids_R, mesh) -> _Resume:
    step, logits_RV, cache, pos_R, done_R, *_ = state
    replicated = lambda x: _constrain(x, mesh, P())  # noqa: E731  (the host reads them)
    return _Resume(replicated(step), logits_RV, cache, pos_R, done_R, index_R, row_ids_R,
                   replicated(jnp.sum(~done_R).astype(jnp.int32)))


@functools.partial(jax.jit, static_argnames=("graphdef", "budget", "num_samples", "sort", "mesh", "ends"))
def _program(graphdef, params, ids_BT, mask_BT, row_ids_R, max_new, eos_E, pad_id, seed,
             temperature, top_k, top_p, min_p, bias_V, min_live, *, budget, num_samples, sort, mesh, ends):
    """Prefill, then decode until done or until min_live rows are left (-1: never):
    (GenerateOutput, _Resume)."""
    TRACES["count"] += 1
    model, layers, head_DV = _decoder(graphdef, params)
    cfg = model.config
    B, T = ids_BT.shape
    G, R = num_samples, B * num_samples

    cache = _sharded(KVCache.empty(cfg, B, T + ends[0]), mesh, cfg.num_key_value_heads)
    x_BTD, cache = model.forward_with_cache(ids_BT, cache, attention_mask=mask_BT, layer_params=layers)
    logits_BV = model.logits(x_BTD[:, -1:])[:, 0]

    # G samples per prompt share one prefill: repeat its cache and last logits (prompt-major)
    def repeat(a):
        return a if G == 1 else jnp.repeat(a, G, axis=0)

    cache = dataclasses.replace(cache.map_buffers(repeat), segment_ids_BS=repeat(cache.segment_ids_BS))
    logits_RV = repeat(logits_BV)
    pos_R = repeat(jnp.sum(mask_BT, axis=1).astype(jnp.int32))
    done_R = pos_R == 0  # all-padding rows (batch bucket filler) generate nothing
    base_key = jax.random.key(seed)
    row_keys_R = jax.vmap(lambda r: jax.random.fold_in(base_key, r))(row_ids_R)
    state = (jnp.zeros((), jnp.int32), logits_RV, cache, pos_R, done_R,
             jnp.full((R, budget), pad_id, jnp.int32), jnp.zeros((R, budget), jnp.float32),
             jnp.zeros((R,), jnp.int32))
    sampling = (max_new, eos_E, pad_id, temperature, top_k, top_p, min_p, bias_V, min_live)
    state = _decode(model, layers, head_DV, state, row_keys_R, sampling, prompt_slots=T, ends=ends, sort=sort,
                    mesh=mesh)
    index_R = _constrain(jnp.arange(R, dtype=jnp.int32), mesh, P(parallel.DATA_AXES) if mesh is not None else None)
    return GenerateOutput(*state[5:]), _stopped(state, index_R, row_ids_R, mesh)


@functools.partial(jax.jit, static_argnames=("graphdef", "rows", "sort", "mesh", "ends"))
def _continue(graphdef, params, out: GenerateOutput, resume: _Resume, max_new, eos_E, pad_id, seed,
              temperature, top_k, top_p, min_p, bias_V, min_live, *, rows, sort, mesh, ends):
    """Resumes `_program`'s (or its own) decode on its first `rows` rows, live ones first:
    the finished rows leave the batch. `ends` are the segments left, the first the one the
    loop stopped in; tokens, logprobs and lengths are written back to `out`'s rows."""
    TRACES["count"] += 1
    model, layers, head_DV = _decoder(graphdef, params)
    cfg = model.config
    prompt_slots = resume.cache.segment_ids_BS.shape[1] - out.tokens.shape[1]
    slots = prompt_slots + ends[0]
    spec = P(parallel.DATA_AXES) if mesh is not None else None
    keep_R = jnp.argsort(resume.done_R.astype(jnp.int32), stable=True)[:rows]  # live rows first
    take = lambda a: _constrain(a[keep_R], mesh, spec)  # noqa: E731
    cache = resume.cache
    cache = KVCache(tuple(a[keep_R, :, :slots] for a in cache.k_BKSH), tuple(a[keep_R, :, :slots] for a in cache.v_BKSH),
                    cache.segment_ids_BS[keep_R, :slots], cache.index)
    cache = _sharded(cache, mesh, cfg.num_key_value_heads)
    index_R, row_ids_R = take(resume.index_R), take(resume.row_ids_R)
    base_key = jax.random.key(seed)
    row_keys_R = jax.vmap(lambda r: jax.random.fold_in(base_key, r))(row_ids_R)
    rows_of = lambda a: _constrain(a[index_R], mesh, spec)  # noqa: E731  (the outputs' rows)
    state = (resume.step, take(resume.logits_RV), cache, take(resume.pos_R), take(resume.done_R),
             rows_of(out.tokens), rows_of(out.logprobs), rows_of(out.lengths))
    sampling = (max_new, eos_E, pad_id, temperature, top_k, top_p, min_p, bias_V, min_live)
    state = _decode(model, layers, head_DV, state, row_keys_R, sampling, prompt_slots=prompt_slots, ends=ends,
                    sort=sort, mesh=mesh)
    tokens_RS, logps_RS, lengths_R = state[5:]
    out = GenerateOutput(out.tokens.at[index_R].set(tokens_RS), out.logprobs.at[index_R].set(logps_RS),
                         out.lengths.at[index_R].set(lengths_R))
    return out, _stopped(state, index_R, row_ids_R, mesh)


MIN_ROWS = 8  # rows are not dropped below this batch (see generate's drop_finished)


def _rows_after(live: int, dp: int) -> int:
    """The batch the live rows continue in: bucketed, at least MIN_ROWS, a multiple of dp."""
    return -(-bucket(live, MIN_ROWS) // dp) * dp


def _min_live(rows: int, dp: int) -> int:
    """The live count at which a batch of `rows` stops to shrink (-1: it never does), so that
    the continuation runs at most half the rows."""
    return rows // 2 if _rows_after(rows // 2, dp) <= rows // 2 else -1


def _mesh_of(params) -> Optional[Mesh]:
    leaf = jax.tree.leaves(params)[0]
    sharding = getattr(leaf, "sharding", None)
    return sharding.mesh if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1 else None


def bucketed_shapes(rows: int, length: int, max_new_tokens: int, mesh: Optional[Mesh]) -> tuple[int, int, int]:
    """(rows, prompt length, budget) the program is compiled for: each bucketed, the rows also
    a multiple of the mesh's data-parallel size."""
    dp = 1 if mesh is None else parallel.data_parallel_size(mesh)
    return -(-bucket(rows, 1) // dp) * dp, bucket(length), bucket(max_new_tokens)


def abstract_call(model, mesh: Mesh, *, prompts: int, prompt_length: int, max_new_tokens: int, num_samples: int,
                  sort: bool, stop_tokens: int = 1) -> tuple:
    """(jitted program, abstract args, static kwargs) of the call `generate` makes for `prompts`
    rows of `prompt_length` tokens and `stop_tokens` EOS ids, for lowering without data (the
    model's leaves may be ShapeDtypeStructs); a later `generate` of those shapes reuses it."""
    graphdef, params = nnx.split(model)
    rows, length, budget = bucketed_shapes(prompts, prompt_length, max_new_tokens, mesh)
    sds, i32, f32 = jax.ShapeDtypeStruct, np.int32, np.float32
    ids = sds((rows, length), i32, sharding=parallel.batch_sharding(mesh, 2))
    row_ids = sds((rows * num_samples,), i32, sharding=parallel.batch_sharding(mesh, 1))
    max_new, temperature, top_k, top_p, min_p = (sds((), dtype) for dtype in (i32, f32, i32, f32, f32))
    args = (graphdef, params, ids, ids, row_ids, max_new, sds((stop_tokens,), i32), sds((), i32),
            sds((), np.uint32), temperature, top_k, top_p, min_p, sds((model.config.vocab_size,), f32), sds((), i32))
    return _program, args, dict(budget=budget, num_samples=num_samples, sort=sort, mesh=mesh,
                                ends=segment_ends(budget))


def abstract_continue(model, mesh: Mesh, **shapes) -> Optional[tuple]:
    """Like abstract_call (same keywords), for the first `_continue` a call of those shapes makes
    once half its rows have finished: it holds the full batch's cache (its argument) and the
    half batch's at once, so its peak can pass the first program's. None where the batch never
    shrinks (too few rows, or no EOS to finish on)."""
    program, args, kwargs = abstract_call(model, mesh, **shapes)
    dp = parallel.data_parallel_size(mesh)
    rows = args[4].shape[0]
    min_live = _min_live(rows, dp)
    if min_live < 0:
        return None
    out, resume = program.trace(*args, **kwargs).out_info

    def sharded(path, x):
        if x.ndim == 0:
            spec = P()
        elif x.ndim == 4:  # a layer's cache buffer
            spec = _cache_spec(mesh, model.config.num_key_value_heads)
        else:
            spec = P(parallel.DATA_AXES)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec))

    out, resume = jax.tree_util.tree_map_with_path(sharded, (out, resume))
    after = _rows_after(min_live, dp)
    return _continue, (*args[:2], out, resume, *args[5:]), dict(
        rows=after, sort=kwargs["sort"], mesh=kwargs["mesh"], ends=kwargs["ends"])


def _dense_bias(logit_bias: Optional[Mapping[int, float]], vocab_size: int) -> np.ndarray:
    """{token id: bias} as one float32 per vocabulary entry (0 elsewhere)."""
    bias = np.zeros((vocab_size,), np.float32)
    for token, value in (logit_bias or {}).items():
        if not 0 <= int(token) < vocab_size:
            raise ValueError(f"logit_bias: token id {token} is outside the vocabulary (0..{vocab_size - 1})")
        if np.isnan(value) or value == np.inf:
            raise ValueError(f"logit_bias: token id {token} has bias {value}; use a number (-inf bans the token)")
        bias[int(token)] = value
    return bias


def generate(model: Decoder, input_ids, attention_mask, *, max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0,
             eos_token_id: Union[int, Sequence[int], None] = None, pad_token_id: int = 0, seed: int = 0,
             num_samples: int = 1, mesh: Optional[Mesh] = None, grow_cache: bool = True,
             logit_bias: Optional[Mapping[int, float]] = None, drop_finished: bool = True) -> GenerateOutput:
    """Continues left-padded prompts [B, T]; see GenerateOutput. temperature=0 is greedy.

    Rows are prompt-major: prompt i's samples are rows i*G .. i*G+G-1. `.logprobs` are under
    the distribution sampled from (see atlas_jax.generation.sampling). With a mesh (or a
    model whose params are sharded) rows split over the data axes and weights keep their
    sharding; the outputs are global arrays. The layers run unrolled on weights sliced out of
    the stack once per call (a transient copy of them; compile time grows with depth), so
    each step reads the weights and its cache in place.
    `grow_cache` decodes budgets from SEGMENTED_BUDGET on in segments over a growing cache
    (module docstring): less attention reading per step, a loop body to compile per segment.
    `logit_bias` {token id: bias} is added to every step's logits before sampling, greedy
    included (OpenAI's `logit_bias`; transformers' `sequence_bias` for one-token sequences):
    e.g. {eos: 2.0} ends completions sooner. The logprobs are then the biased distribution's.
    `drop_finished`: once half the rows of the batch have finished (EOS), the decode stops,
    the live rows continue as a batch of half the size (or smaller, re-bucketed; never below
    MIN_ROWS) and the finished ones leave it, so a long tail does not decode a batch of mostly
    finished rows. Tokens are the same either way (each row's random stream depends on its row
    and step alone); each smaller batch is one more program to compile, once.
    """
    ids = np.asarray(input_ids, np.int32)
    mask = np.asarray(attention_mask, np.int32)
    if ids.ndim != 2 or ids.shape != mask.shape:
        raise ValueError(f"input_ids {ids.shape} and attention_mask {mask.shape} must both be [B, T]")
    if max_new_tokens < 1 or num_samples < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} and num_samples={num_samples} must be >= 1")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0 or not 0 <= min_p <= 1:
        raise ValueError(f"bad sampling settings: temperature={temperature} top_p={top_p} top_k={top_k} min_p={min_p}")
    bias = _dense_bias(logit_bias, model.config.vocab_size)
    graphdef, params = nnx.split(model)
    mesh = mesh or _mesh_of(params)
    B, T = ids.shape
    Bb, Tb, budget = bucketed_shapes(B, T, max_new_tokens, mesh)
    # left-pad to the length bucket, add all-padding filler rows to the batch bucket
    ids_p = np.full((Bb, Tb), pad_token_id, np.int32)
    mask_p = np.zeros((Bb, Tb), np.int32)
    ids_p[:B, Tb - T:], mask_p[:B, Tb - T:] = ids, mask
    row_ids = np.arange(Bb * num_samples, dtype=np.int32)
    eos = np.asarray([-1] if eos_token_id is None else np.atleast_1d(eos_token_id), np.int32)
    if mesh is not None:  # every process passes the same full rows (see parallel.shard_rows)
        ids_p, mask_p, row_ids = (parallel.shard_rows(a, mesh) for a in (ids_p, mask_p, row_ids))
    dp = 1 if mesh is None else parallel.data_parallel_size(mesh)
    rows = Bb * num_samples
    sort = bool(top_k > 0 or top_p < 1.0)
    ends = segment_ends(budget) if grow_cache else (budget,)
    sampling = (jnp.int32(max_new_tokens), eos, jnp.int32(pad_token_id), jnp.uint32(seed), jnp.float32(temperature),
                jnp.int32(top_k), jnp.float32(top_p), jnp.float32(min_p), bias)
    min_live = _min_live(rows, dp) if drop_finished and eos_token_id is not None else -1
    out, resume = _program(graphdef, params, ids_p, mask_p, row_ids, *sampling, jnp.int32(min_live), budget=budget,
                           num_samples=num_samples, sort=sort, mesh=mesh, ends=ends)
    while min_live >= 0:  # the loop stopped at min_live rows or finished: the host reads which
        step, live = int(resume.step), int(resume.live)
        if live == 0 or step >= max_new_tokens or live > min_live:
            break
        rows = _rows_after(live, dp)
        min_live = _min_live(rows, dp)
        left = tuple(end for end in ends if end > step)  # the segment it stopped in, and the rest
        out, resume = _continue(graphdef, params, out, resume, *sampling, jnp.int32(min_live), rows=rows, sort=sort,
                                mesh=mesh, ends=left)
    R = B * num_samples
    return GenerateOutput(out.tokens[:R, :max_new_tokens], out.logprobs[:R, :max_new_tokens], out.lengths[:R])
