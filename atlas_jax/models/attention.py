"""Attention for every forward of the decoder, through one entry point: `attend`.

`attend` computes softmax(q k^T * scale, masked) v exactly; `attention_path` picks how, from
the number of queries, whether keys come from a KV cache, and the platform:

  "one_query_sums"  a decode step (one query against the cache) on CPU. XLA:CPU runs the
                    T=1 batched dots of dot_product_attention as slow generic kernels; as a
                    multiply and a sum they are plain fused loops. Other platforms keep the
                    library call.
  "query_blocks"    every other forward: a training forward, a cached prefill. Where XLA
                    materialises the scores (XLA:CPU always; JAX's default implementation on
                    GPU and TPU too), B x N x T x S of them would be held at once, and a long
                    sequence or a prefill of many prompts against a long cache asks for more
                    memory than any device has. A block of queries at a time, each block
                    rematerialised, bounds forward and backward to one block's scores
                    (SCORES_PER_BLOCK). When one block covers every query (the common short
                    case) this is the whole computation below, in one call.
  "whole"           a decode step on GPU or TPU: one jax.nn.dot_product_attention call.
                    tests/test_accelerator.py records which implementation a device ran.

On CPU a whole computation (a training forward short enough for one block) is written as
[B, K]-batched matmuls in the layout XLA:CPU runs without transposed copies of the scores
(`_whole_as_batched_matmuls`); elsewhere it is the library call.

Every path gives each query row a softmax over all its keys, so they agree to rounding.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from atlas_jax.models.matmul import copied_transpose

SCORES_PER_BLOCK = 2**28  # score elements per query block (1 GiB in float32)


def attention_path(num_queries: int, *, cached: bool, platform: str) -> str:
    """The path `attend` takes (module docstring): "one_query_sums", "query_blocks" or "whole"."""
    if cached and num_queries == 1:  # a decode step
        return "one_query_sums" if platform == "cpu" else "whole"
    return "query_blocks"  # the whole computation when one block covers every query


def attend(q_BTNH, k_BSKH, v_BSKH, mask_BTS, *, cached: bool) -> jax.Array:
    """out_BTNH of T queries over S keys (K kv heads shared by N / K query heads each);
    mask_BTS is True where a query may see a key. `cached` = the keys are a KV cache's slots."""
    scale = q_BTNH.shape[-1] ** -0.5
    path = attention_path(q_BTNH.shape[1], cached=cached, platform=jax.default_backend())
    if path == "one_query_sums":
        return _one_query_as_sums(q_BTNH, k_BSKH, v_BSKH, mask_BTS, scale)
    if path == "query_blocks":
        return _in_query_blocks(q_BTNH, k_BSKH, v_BSKH, mask_BTS, scale)
    return _whole(q_BTNH, k_BSKH, v_BSKH, mask_BTS, scale)


def _whole(q_BTNH, k_BSKH, v_BSKH, mask_BTS, scale):
    if jax.default_backend() == "cpu":
        return _whole_as_batched_matmuls(q_BTNH, k_BSKH, v_BSKH, mask_BTS, scale)
    return jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, mask=mask_BTS[:, None], scale=scale)


def _whole_as_batched_matmuls(q_BTNH, k_BSKH, v_BSKH, mask_BTS, scale):
    """dot_product_attention's computation (float32 scores, the same masking value, softmax
    in float32), laid out for XLA:CPU: each kv head's G query heads are stacked along the
    query axis (Q = G x T), so both products are [B, K]-batched matmuls with one contracting
    axis, forward and backward. In the library's layout XLA:CPU copied a transpose of the
    scores around every product of the backward pass."""
    B, T, N, H = q_BTNH.shape
    S, K = k_BSKH.shape[1], k_BSKH.shape[2]
    G = N // K
    q_BKQH = q_BTNH.reshape(B, T, K, G, H).transpose(0, 2, 3, 1, 4).reshape(B, K, G * T, H)
    k_BKSH, v_BKSH = jnp.swapaxes(k_BSKH, 1, 2), jnp.swapaxes(v_BSKH, 1, 2)
    mask_B1QS = jnp.broadcast_to(mask_BTS[:, None, None], (B, 1, G, T, S)).reshape(B, 1, G * T, S)
    out_BKQH = _softmax_attention(q_BKQH, k_BKSH, v_BKSH, mask_B1QS, scale)
    return out_BKQH.reshape(B, K, G, T, H).transpose(0, 3, 1, 2, 4).reshape(B, T, N, H)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _softmax_attention(q_BKQH, k_BKSH, v_BKSH, mask_B1QS, scale):
    """softmax(q k^T * scale, masked) v over [B, K]-batched matmuls, with the backward pass
    written out (below): autodiff's passes over the Q x S scores (the softmax's sums and
    broadcasts, a divide, their transposes) cost XLA:CPU more than the four matmuls did."""
    return _softmax_attention_fwd(q_BKQH, k_BKSH, v_BKSH, mask_B1QS, scale)[0]


def _softmax_attention_fwd(q_BKQH, k_BKSH, v_BKSH, mask_B1QS, scale):
    # the probabilities stay unnormalised (exp(s - max)); the output's rows are divided by
    # their sums instead, Q x H values rather than Q x S
    scores_BKQS = jnp.einsum("BKQH,BKSH->BKQS", q_BKQH, k_BKSH, preferred_element_type=jnp.float32)
    scores_BKQS = jnp.where(mask_B1QS, scores_BKQS * jnp.float32(scale), -0.7 * jnp.finfo(jnp.float32).max)
    exp_BKQS = jnp.exp(scores_BKQS - jnp.max(scores_BKQS, axis=-1, keepdims=True)).astype(v_BKSH.dtype)
    inv_sum_BKQ = 1.0 / jnp.sum(exp_BKQS.astype(jnp.float32), axis=-1)
    out_BKQH = jnp.einsum("BKQS,BKSH->BKQH", exp_BKQS, v_BKSH, preferred_element_type=jnp.float32)
    out_BKQH = (out_BKQH * inv_sum_BKQ[..., None]).astype(v_BKSH.dtype)
    return out_BKQH, (q_BKQH, k_BKSH, v_BKSH, mask_B1QS, exp_BKQS, inv_sum_BKQ, out_BKQH)


def _softmax_attention_bwd(scale, residuals, dout_BKQH):
    """With P = exp / sum: dV = P^T dO, dS = P (dO V^T - rowsum(dO O)) scale, dQ = dS K,
    dK = dS^T Q (rowsum(dO O) equals softmax's rowsum(P dP) over H values instead of S)."""
    q_BKQH, k_BKSH, v_BKSH, mask_B1QS, exp_BKQS, inv_sum_BKQ, out_BKQH = residuals
    dout_BKQH = dout_BKQH.astype(jnp.float32)
    dv_BKSH = _keys_gradient(exp_BKQS, (dout_BKQH * inv_sum_BKQ[..., None]).astype(exp_BKQS.dtype))
    dprobs_BKQS = jnp.einsum("BKQH,BKSH->BKQS", dout_BKQH.astype(v_BKSH.dtype), v_BKSH,
                             preferred_element_type=jnp.float32)
    rowsum_BKQ = jnp.sum(dout_BKQH * out_BKQH.astype(jnp.float32), axis=-1)
    # masked scores are constants (a row with no visible key is uniform over them all)
    dscores_BKQS = jnp.where(mask_B1QS, exp_BKQS.astype(jnp.float32) * (inv_sum_BKQ * jnp.float32(scale))[..., None]
                             * (dprobs_BKQS - rowsum_BKQ[..., None]), 0.0).astype(q_BKQH.dtype)
    dq_BKQH = jnp.einsum("BKQS,BKSH->BKQH", dscores_BKQS, k_BKSH, preferred_element_type=jnp.float32)
    dk_BKSH = _keys_gradient(dscores_BKQS, q_BKQH)
    cotangents = (dq_BKQH.astype(q_BKQH.dtype), dk_BKSH.astype(k_BKSH.dtype), dv_BKSH.astype(v_BKSH.dtype))
    return (*cotangents, None)


def _keys_gradient(a_BKQS, b_BKQH):
    """a^T b over the queries, [B, K, S, H] in float32, as (b^T a)^T: b^T (Q x H values, fewer than
    a's Q x S) copied once, so the product contracts its left operand's last axis, the form
    XLA:CPU sends to its fast matmul kernels (models/matmul.py)."""
    out_BKHS = jnp.einsum("BKHQ,BKQS->BKHS", copied_transpose(b_BKQH), a_BKQS, preferred_element_type=jnp.float32)
    return copied_transpose(out_BKHS)


_softmax_attention.defvjp(_softmax_attention_fwd, _softmax_attention_bwd)


def _in_query_blocks(q_BTNH, k_BSKH, v_BSKH, mask_BTS, scale):
    """Attention a block of queries at a time, each block rematerialised, so the forward and
    the backward pass hold one block's scores at a time; whole when one block covers T. A
    length that is no multiple of the block gets padding queries that see no key (their
    rows are computed and dropped)."""
    B, T, N, _ = q_BTNH.shape
    S = k_BSKH.shape[1]
    block = 1 << max(0, (SCORES_PER_BLOCK // max(B * N * S, 1)).bit_length() - 1)
    if block >= T:
        return _whole(q_BTNH, k_BSKH, v_BSKH, mask_BTS, scale)
    pad = -T % block
    C = (T + pad) // block
    q_CBtNH = jnp.pad(q_BTNH, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(B, C, block, *q_BTNH.shape[2:])
    q_CBtNH = q_CBtNH.swapaxes(0, 1)
    mask_CBtS = jnp.pad(mask_BTS, ((0, 0), (0, pad), (0, 0))).reshape(B, C, block, S).swapaxes(0, 1)

    @jax.checkpoint  # backward recomputes a block's scores instead of keeping all of them
    def one_block(q_BtNH, mask_BtS):
        return _whole(q_BtNH, k_BSKH, v_BSKH, mask_BtS, scale)

    out_CBtNH = jax.lax.map(lambda qm: one_block(*qm), (q_CBtNH, mask_CBtS))
    return out_CBtNH.swapaxes(0, 1).reshape(B, C * block, *q_BTNH.shape[2:])[:, :T]


def _one_query_as_sums(q_B1NH, k_BSKH, v_BSKH, mask_B1S, scale):
    """dot_product_attention for one query token, both products as a multiply + sum (XLA:CPU
    runs T=1 batched dots as generic kernels, slower than these fused loops). Scores and
    softmax in float32, as dot_product_attention computes them."""
    B, _, N, H = q_B1NH.shape
    K = k_BSKH.shape[2]
    q_BKGH = q_B1NH.reshape(B, K, N // K, H).astype(jnp.float32)
    k_BKSH = jnp.swapaxes(k_BSKH, 1, 2).astype(jnp.float32)
    scores_BKGS = jnp.sum(q_BKGH[:, :, :, None] * k_BKSH[:, :, None], axis=-1) * scale
    scores_BKGS = jnp.where(mask_B1S[:, :, None], scores_BKGS, -0.7 * jnp.finfo(scores_BKGS.dtype).max)
    probs_BKGS = jax.nn.softmax(scores_BKGS, axis=-1).astype(q_B1NH.dtype)
    out_BKGH = jnp.sum(probs_BKGS[..., None] * jnp.swapaxes(v_BSKH, 1, 2)[:, :, None], axis=3)
    return out_BKGH.reshape(B, 1, N, H)
