"""One generic decoder for Llama 3 / 3.1 / 3.2, Qwen2 / 2.5 and Qwen3 dense causal LMs.

The families differ only by `ModelConfig` flags: `attention_bias` (Qwen2/2.5), `qk_norm`
(Qwen3), `tie_word_embeddings`, `rope_theta` / `rope_scaling`, head_dim and the GQA ratio.

Shape letters (used in names and einsum strings throughout the package):
  B batch, T query length, S key length (cache slots), D model, F MLP hidden,
  N query heads, K kv heads, H head dim, V vocab, L layers, G generations per prompt.

All L layers' weights are stacked on a leading `layers` axis and run under one
`lax.scan`, so compile time does not grow with depth. The KV cache is a plain pytree
(`KVCache`) threaded through the same layer code: without a cache the layer attends to
its own keys; with one it first writes its keys at `cache.index` and attends to all slots.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from atlas_jax.config import ModelConfig
from atlas_jax.models import lora, quant

# remat name (says what the backward pass keeps from each layer's forward) -> jax policy
REMAT_POLICIES = {
    "none": None,  # no rematerialisation: every intermediate is kept
    # outputs of x @ W (projections, MLP, adapters); attention and elementwise ops recomputed
    "save_weight_matmuls": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # every matmul output, attention scores and weighted values included
    "save_all_matmuls": jax.checkpoint_policies.dots_saveable,
    # only each layer's input (the scan carry); the whole layer is recomputed
    "save_layer_inputs": jax.checkpoint_policies.nothing_saveable,
}
# the older names, kept so existing configs keep working
REMAT_POLICIES.update(minimal=REMAT_POLICIES["save_weight_matmuls"],
                      save_dots=REMAT_POLICIES["save_all_matmuls"], full=REMAT_POLICIES["save_layer_inputs"])


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Preallocated keys/values for every layer; slots [0, index) are filled."""

    k_LBSKH: jax.Array
    v_LBSKH: jax.Array
    segment_ids_BS: jax.Array  # 0 = empty or padding: never attended by real tokens
    index: jax.Array  # int32 scalar: the slot the next token is written to

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, slots: int) -> "KVCache":
        shape = (cfg.num_hidden_layers, batch, slots, cfg.num_key_value_heads, cfg.resolved_head_dim)
        dtype = jnp.dtype(cfg.dtype)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
                   jnp.zeros((batch, slots), jnp.int32), jnp.zeros((), jnp.int32))


def _param(key, shape, axes, dtype, init="normal"):
    """A Param carrying its logical axis names (mapped to the mesh by parallel.py rules)."""
    if init == "normal":  # the HF initializer_range default
        value = 0.02 * jax.random.normal(key, shape, jnp.float32)
    elif init == "ones":
        value = jnp.ones(shape, jnp.float32)
    else:
        value = jnp.zeros(shape, jnp.float32)
    return nnx.Param(value.astype(dtype), out_sharding=axes, eager_sharding=False)


def rms_norm(x, weight, eps):
    # statistics in float32 whatever the compute dtype, as the HF reference does
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * normed.astype(x.dtype)


def rope_frequencies(cfg: ModelConfig) -> jax.Array:
    """Inverse frequencies [H/2], with Llama 3 frequency-dependent scaling when configured."""
    H = cfg.resolved_head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, H, 2, dtype=jnp.float32) / H))
    rs = cfg.rope_scaling
    if rs is None or rs.rope_type in ("none", "default"):
        return inv_freq
    if rs.rope_type != "llama3":
        raise ValueError(f"model.rope_scaling.rope_type={rs.rope_type!r} is not supported (only 'llama3')")
    wavelen = 2 * math.pi / inv_freq
    low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
    high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
    smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
        rs.high_freq_factor - rs.low_freq_factor)
    smoothed = (1 - smooth) * inv_freq / rs.factor + smooth * inv_freq
    scaled = jnp.where(wavelen > low_wavelen, inv_freq / rs.factor, inv_freq)
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(medium, smoothed, scaled)


def apply_rope(x_BTNH, cos_BTH, sin_BTH):
    """Rotate-half RoPE (the HF layout: first and second halves of head_dim pair up)."""
    half = x_BTNH.shape[-1] // 2
    rotated = jnp.concatenate([-x_BTNH[..., half:], x_BTNH[..., :half]], axis=-1)
    cos, sin = cos_BTH[:, :, None].astype(x_BTNH.dtype), sin_BTH[:, :, None].astype(x_BTNH.dtype)
    return x_BTNH * cos + rotated * sin


class DecoderLayers(nnx.Module):
    """The L transformer blocks, weights stacked on a leading `layers` axis."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        L, D, F = cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size
        N, K, H = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.resolved_head_dim
        pd = jnp.dtype(cfg.param_dtype)
        self.input_norm = _param(None, (L, D), ("layers", "norm"), pd, "ones")
        self.q_proj = _param(rngs.params(), (L, D, N, H), ("layers", "embed", "heads", "head_dim"), pd)
        self.k_proj = _param(rngs.params(), (L, D, K, H), ("layers", "embed", "kv_heads", "head_dim"), pd)
        self.v_proj = _param(rngs.params(), (L, D, K, H), ("layers", "embed", "kv_heads", "head_dim"), pd)
        self.o_proj = _param(rngs.params(), (L, N, H, D), ("layers", "heads", "head_dim", "embed"), pd)
        if cfg.attention_bias:
            self.q_bias = _param(None, (L, N, H), ("layers", "heads", "head_dim"), pd, "zeros")
            self.k_bias = _param(None, (L, K, H), ("layers", "kv_heads", "head_dim"), pd, "zeros")
            self.v_bias = _param(None, (L, K, H), ("layers", "kv_heads", "head_dim"), pd, "zeros")
        if cfg.qk_norm:
            self.q_norm = _param(None, (L, H), ("layers", "norm"), pd, "ones")
            self.k_norm = _param(None, (L, H), ("layers", "norm"), pd, "ones")
        self.post_attention_norm = _param(None, (L, D), ("layers", "norm"), pd, "ones")
        self.gate_proj = _param(rngs.params(), (L, D, F), ("layers", "embed", "mlp"), pd)
        self.up_proj = _param(rngs.params(), (L, D, F), ("layers", "embed", "mlp"), pd)
        self.down_proj = _param(rngs.params(), (L, F, D), ("layers", "mlp", "embed"), pd)
        if cfg.lora.rank > 0:
            lora.add_adapters(self, cfg, rngs)

    def __call__(self, cfg, x_BTD, cos_BTH, sin_BTH, mask_BTS, cache: Optional[KVCache]):
        params = {name: var[...] for name, var in vars(self).items() if isinstance(var, nnx.Param)}
        dtype = jnp.dtype(cfg.dtype)

        def body(carry, layer):
            x, kv = carry
            p, l = layer
            # one layer at a time: 4-bit projections are dequantised here, inside the scan
            x, kv = _block(cfg, quant.layer_weights(p, dtype), x, cos_BTH, sin_BTH, mask_BTS, kv, l)
            return (x, kv), None

        policy = REMAT_POLICIES[cfg.remat]
        if cfg.remat != "none":
            body = jax.checkpoint(body, policy=policy, prevent_cse=False)
        kv = None if cache is None else (cache.k_LBSKH, cache.v_LBSKH, cache.index)
        layer_ids = jnp.arange(cfg.num_hidden_layers, dtype=jnp.int32)
        if cfg.scan_layers:
            (x_BTD, kv), _ = jax.lax.scan(body, (x_BTD, kv), (params, layer_ids))
        else:  # unrolled: same body, for debugging or tiny depth
            for l in range(cfg.num_hidden_layers):
                (x_BTD, kv), _ = body((x_BTD, kv), (jax.tree.map(lambda a: a[l], params), layer_ids[l]))
        if cache is not None:
            cache = dataclasses.replace(cache, k_LBSKH=kv[0], v_LBSKH=kv[1])
        return x_BTD, cache


def _block(cfg, p, x_BTD, cos_BTH, sin_BTH, mask_BTS, kv, l):
    """One pre-norm block: attention + SwiGLU MLP. `kv` = (k cache, v cache, write index)."""
    h_BTD = rms_norm(x_BTD, p["input_norm"], cfg.rms_norm_eps)
    q_BTNH = lora.project(cfg, p, "q_proj", "BTD,DNH->BTNH", h_BTD)
    k_BTKH = lora.project(cfg, p, "k_proj", "BTD,DKH->BTKH", h_BTD)
    v_BTKH = lora.project(cfg, p, "v_proj", "BTD,DKH->BTKH", h_BTD)
    if cfg.attention_bias:
        q_BTNH, k_BTKH, v_BTKH = q_BTNH + p["q_bias"], k_BTKH + p["k_bias"], v_BTKH + p["v_bias"]
    if cfg.qk_norm:
        q_BTNH = rms_norm(q_BTNH, p["q_norm"], cfg.rms_norm_eps)
        k_BTKH = rms_norm(k_BTKH, p["k_norm"], cfg.rms_norm_eps)
    q_BTNH = apply_rope(q_BTNH, cos_BTH, sin_BTH)
    k_BTKH = apply_rope(k_BTKH, cos_BTH, sin_BTH)
    if kv is not None:
        # write this step's keys into layer l's slots [index, index+T), then attend to all slots
        k_cache, v_cache, index = kv
        zero = jnp.zeros((), jnp.int32)
        start = (l, zero, index, zero, zero)
        k_cache = jax.lax.dynamic_update_slice(k_cache, k_BTKH[None].astype(k_cache.dtype), start)
        v_cache = jax.lax.dynamic_update_slice(v_cache, v_BTKH[None].astype(v_cache.dtype), start)
        k_BTKH, v_BTKH = k_cache[l], v_cache[l]
        kv = (k_cache, v_cache, index)
    out_BTNH = jax.nn.dot_product_attention(
        q_BTNH, k_BTKH.astype(q_BTNH.dtype), v_BTKH.astype(q_BTNH.dtype),
        mask=mask_BTS[:, None], scale=cfg.resolved_head_dim ** -0.5)
    x_BTD = x_BTD + lora.project(cfg, p, "o_proj", "BTNH,NHD->BTD", out_BTNH)
    h_BTD = rms_norm(x_BTD, p["post_attention_norm"], cfg.rms_norm_eps)
    gate_BTF = jax.nn.silu(lora.project(cfg, p, "gate_proj", "BTD,DF->BTF", h_BTD))
    up_BTF = lora.project(cfg, p, "up_proj", "BTD,DF->BTF", h_BTD)
    x_BTD = x_BTD + lora.project(cfg, p, "down_proj", "BTF,FD->BTD", gate_BTF * up_BTF)
    return x_BTD, kv


def positions_from_mask(mask_BT: jax.Array) -> jax.Array:
    """Left padding: the first real token is position 0; pads get 0 too (they are masked)."""
    return jnp.maximum(jnp.cumsum(mask_BT.astype(jnp.int32), axis=-1) - 1, 0)


class Decoder(nnx.Module):
    """Token ids -> float32 logits. `model.config` is the architecture and numerics."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        V, D = config.vocab_size, config.hidden_size
        pd = jnp.dtype(config.param_dtype)
        self.embed = _param(rngs.params(), (V, D), ("vocab", "embed"), pd)
        self.layers = DecoderLayers(config, rngs=rngs)
        self.final_norm = _param(None, (D,), ("norm",), pd, "ones")
        if not config.tie_word_embeddings:
            self.lm_head = _param(rngs.params(), (D, V), ("embed", "vocab"), pd)

    @property
    def dtype(self):
        return jnp.dtype(self.config.dtype)

    @property
    def param_dtype(self):
        return jnp.dtype(self.config.param_dtype)

    @property
    def remat(self) -> str:
        return self.config.remat

    def __call__(self, input_ids_BT, attention_mask_BT=None, *, positions_BT=None, segment_ids_BT=None):
        x_BTD = self.hidden_states(input_ids_BT, attention_mask_BT, positions_BT=positions_BT,
                                   segment_ids_BT=segment_ids_BT)
        return self.logits(x_BTD)

    def hidden_states(self, input_ids_BT, attention_mask_BT=None, *, positions_BT=None, segment_ids_BT=None):
        """Final normed activations x_BTD; pair with `logits` for chunked losses."""
        x_BTD, _ = self.forward_with_cache(input_ids_BT, None, attention_mask_BT=attention_mask_BT,
                                           positions_BT=positions_BT, segment_ids_BT=segment_ids_BT)
        return x_BTD

    def logits(self, x_BTD):
        """x_BTD -> float32 logits_BTV (tied embeddings reuse the embedding table)."""
        x_BTD = x_BTD.astype(self.dtype)
        if self.config.tie_word_embeddings:  # contract against the table as stored: no transpose copy
            return jnp.einsum("BTD,VD->BTV", x_BTD, self.embed[...].astype(self.dtype),
                              preferred_element_type=jnp.float32)
        return jnp.einsum("BTD,DV->BTV", x_BTD, self.lm_head[...].astype(self.dtype),
                          preferred_element_type=jnp.float32)

    def forward_with_cache(self, input_ids_BT, cache: Optional[KVCache], *, attention_mask_BT=None,
                           positions_BT=None, segment_ids_BT=None):
        """Runs the stack; with a cache, writes T new slots at cache.index and advances it.

        Returns (final normed x_BTD, cache). Tokens attend to earlier slots/tokens of the same
        segment only (segment 0 = padding). Packed rows must pass positions_BT explicitly.
        """
        cfg = self.config
        B, T = input_ids_BT.shape
        if segment_ids_BT is None:
            segment_ids_BT = (jnp.ones((B, T), jnp.int32) if attention_mask_BT is None
                              else attention_mask_BT.astype(jnp.int32))
        segment_ids_BT = segment_ids_BT.astype(jnp.int32)
        if positions_BT is None:
            positions_BT = positions_from_mask(segment_ids_BT != 0)
        angle_BTH = positions_BT.astype(jnp.float32)[..., None] * rope_frequencies(cfg)
        angle_BTH = jnp.concatenate([angle_BTH, angle_BTH], axis=-1)
        cos_BTH, sin_BTH = jnp.cos(angle_BTH), jnp.sin(angle_BTH)

        if cache is None:
            q_idx_T, kv_idx_S, kv_seg_BS = jnp.arange(T), jnp.arange(T), segment_ids_BT
        else:
            kv_seg_BS = jax.lax.dynamic_update_slice(cache.segment_ids_BS, segment_ids_BT, (0, cache.index))
            cache = dataclasses.replace(cache, segment_ids_BS=kv_seg_BS)
            q_idx_T = cache.index + jnp.arange(T)
            kv_idx_S = jnp.arange(kv_seg_BS.shape[1])
        # causal by slot index, isolated by segment: pads (segment 0) only see pads, so no
        # softmax row is empty, and real tokens never see pads or other packed examples
        mask_BTS = (segment_ids_BT[:, :, None] == kv_seg_BS[:, None, :]) & (
            kv_idx_S[None, None, :] <= q_idx_T[None, :, None])

        x_BTD = self.embed[...].astype(self.dtype)[input_ids_BT]
        x_BTD, cache = self.layers(cfg, x_BTD, cos_BTH, sin_BTH, mask_BTS, cache)
        if cache is not None:
            cache = dataclasses.replace(cache, index=cache.index + T)
        return rms_norm(x_BTD, self.final_norm[...], cfg.rms_norm_eps), cache
