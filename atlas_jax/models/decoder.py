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
Attention itself, and the reasons it takes one path or another, are in models/attention.py.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from atlas_jax import parallel
from atlas_jax.config import ModelConfig
from atlas_jax.models import lora, quant
from atlas_jax.models.attention import attend
from atlas_jax.models.matmul import dense

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


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Preallocated keys/values for every layer; slots [0, index) are filled.

    One [B, K, S, H] buffer per layer for keys and one for values: heads-major, so attention
    reads the slots without a transpose, and separate, so a decode step writes and reads each
    layer's buffer in place (taking layer l out of a stacked [L, ...] array would copy it every
    step). A forward with a cache therefore runs its layers unrolled (DecoderLayers).
    """

    k_BKSH: tuple[jax.Array, ...]  # one per layer
    v_BKSH: tuple[jax.Array, ...]
    segment_ids_BS: jax.Array  # 0 = empty or padding: never attended by real tokens
    index: jax.Array  # int32 scalar: the slot the next token is written to

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, slots: int) -> "KVCache":
        shape = (batch, cfg.num_key_value_heads, slots, cfg.resolved_head_dim)
        dtype, L = jnp.dtype(cfg.dtype), cfg.num_hidden_layers
        return cls(tuple(jnp.zeros(shape, dtype) for _ in range(L)), tuple(jnp.zeros(shape, dtype) for _ in range(L)),
                   jnp.zeros((batch, slots), jnp.int32), jnp.zeros((), jnp.int32))

    def grown(self, slots: int) -> "KVCache":
        """The same cache with `slots` slots, the new ones empty (a copy)."""
        extra = slots - self.segment_ids_BS.shape[1]
        grown = self.map_buffers(lambda a_BKSH: jnp.pad(a_BKSH, ((0, 0), (0, 0), (0, extra), (0, 0))))
        return dataclasses.replace(grown, segment_ids_BS=jnp.pad(self.segment_ids_BS, ((0, 0), (0, extra))))

    def map_buffers(self, fn) -> "KVCache":
        """The cache with fn applied to every layer's key and value buffer."""
        return dataclasses.replace(self, k_BKSH=tuple(map(fn, self.k_BKSH)), v_BKSH=tuple(map(fn, self.v_BKSH)))


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
    """Rotate-half RoPE (the HF layout: first and second halves of head_dim pair up).

    Written as a split and a concatenate, each the other's transpose: the gradient is one
    pass, where slicing the halves made it zero-padded copies summed."""
    half = x_BTNH.shape[-1] // 2
    x1_BTNh, x2_BTNh = jnp.split(x_BTNH, 2, axis=-1)
    cos, sin = (a[:, :, None, :half].astype(x_BTNH.dtype) for a in (cos_BTH, sin_BTH))
    return jnp.concatenate([x1_BTNh * cos - x2_BTNh * sin, x2_BTNh * cos + x1_BTNh * sin], axis=-1)


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

    def unstacked(self) -> list:
        """Each layer's raw variables, sliced out of the stack: a decode loop takes them once,
        outside the loop, since XLA materialises a slice (a copy) every time one is taken."""
        params = {name: var[...] for name, var in vars(self).items() if isinstance(var, nnx.Param)}
        # one split per weight: its gradient is one concatenate, where L slices' gradients
        # were L zero-padded stacks summed
        layers = {name: [parallel.on_device(piece.reshape(piece.shape[1:])) for piece in jnp.split(a, a.shape[0])]
                  for name, a in params.items()}
        return [{name: pieces[l] for name, pieces in layers.items()} for l in range(self.input_norm.shape[0])]

    def __call__(self, cfg, x_BTD, cos_BTH, sin_BTH, mask_BTS, cache: Optional[KVCache], layer_params=None,
                 dropout_keys_B=None):
        params = {name: var[...] for name, var in vars(self).items() if isinstance(var, nnx.Param)}
        dtype = jnp.dtype(cfg.dtype)

        def body(carry, layer):
            x, kv = carry
            p, l = layer
            keys_B = None if dropout_keys_B is None else lora.fold_in(dropout_keys_B, l)
            # one layer at a time: host-resident weights are fetched and 4-bit projections
            # dequantised here, inside the scan
            p = {k: parallel.on_device(a) for k, a in p.items()}  # trainer.offload=optimizer_and_frozen
            x, kv = _block(cfg, quant.layer_weights(p, dtype), x, cos_BTH, sin_BTH, mask_BTS, kv, keys_B)
            return (x, kv), None

        remat = cfg.remat
        if remat == "none" and any(parallel.in_host_memory(a) for a in params.values()):
            # "none" would keep, for backward, every intermediate of every layer, device copies
            # of the fetched weights among them: the whole offloaded base again. Keep the
            # matmul outputs only; backward fetches the weights again.
            remat = "save_all_matmuls"
        if remat != "none":  # no policy saves fetched weights: they are not matmul outputs
            body = jax.checkpoint(body, policy=REMAT_POLICIES[remat], prevent_cse=False)
        layer_ids = jnp.arange(cfg.num_hidden_layers, dtype=jnp.int32)
        if cfg.scan_layers and layer_params is None and cache is None:
            (x_BTD, _), _ = jax.lax.scan(body, (x_BTD, None), (params, layer_ids))
            return x_BTD, None
        # unrolled: the same body, one cache buffer per layer (KVCache); decode loops, debugging
        layer_params = self.unstacked() if layer_params is None else layer_params
        ks, vs = [], []
        for l in range(cfg.num_hidden_layers):
            kv = None if cache is None else (cache.k_BKSH[l], cache.v_BKSH[l], cache.index)
            (x_BTD, kv), _ = body((x_BTD, kv), (layer_params[l], layer_ids[l]))
            if kv is not None:
                ks.append(kv[0])
                vs.append(kv[1])
        if cache is not None:
            cache = dataclasses.replace(cache, k_BKSH=tuple(ks), v_BKSH=tuple(vs))
        return x_BTD, cache


def _block(cfg, p, x_BTD, cos_BTH, sin_BTH, mask_BTS, kv, keys_B=None):
    """One pre-norm block: attention + SwiGLU MLP. `kv` = (this layer's k cache, v cache,
    write index); `keys_B` (this layer's per-row keys) turn on LoRA dropout."""
    project = functools.partial(lora.project, cfg, p, dropout_keys_B=keys_B)
    h_BTD = rms_norm(x_BTD, p["input_norm"], cfg.rms_norm_eps)
    q_BTNH = project("q_proj", h_BTD)
    k_BTKH = project("k_proj", h_BTD)
    v_BTKH = project("v_proj", h_BTD)
    if cfg.attention_bias:
        q_BTNH, k_BTKH, v_BTKH = q_BTNH + p["q_bias"], k_BTKH + p["k_bias"], v_BTKH + p["v_bias"]
    if cfg.qk_norm:
        q_BTNH = rms_norm(q_BTNH, p["q_norm"], cfg.rms_norm_eps)
        k_BTKH = rms_norm(k_BTKH, p["k_norm"], cfg.rms_norm_eps)
    q_BTNH = apply_rope(q_BTNH, cos_BTH, sin_BTH)
    k_BTKH = apply_rope(k_BTKH, cos_BTH, sin_BTH)
    k_BSKH, v_BSKH = k_BTKH, v_BTKH
    if kv is not None:
        # write this step's keys at slots [index, index+T), then attend to all slots
        k_cache, v_cache, index = kv
        k_cache, k_BSKH = _cache_write(k_cache, k_BTKH, index)
        v_cache, v_BSKH = _cache_write(v_cache, v_BTKH, index)
        kv = (k_cache, v_cache, index)
    k_BSKH, v_BSKH = k_BSKH.astype(q_BTNH.dtype), v_BSKH.astype(q_BTNH.dtype)
    out_BTNH = attend(q_BTNH, k_BSKH, v_BSKH, mask_BTS, cached=kv is not None)
    x_BTD = x_BTD + project("o_proj", out_BTNH)
    h_BTD = rms_norm(x_BTD, p["post_attention_norm"], cfg.rms_norm_eps)
    gate_BTF = jax.nn.silu(project("gate_proj", h_BTD))
    up_BTF = project("up_proj", h_BTD)
    x_BTD = x_BTD + project("down_proj", gate_BTF * up_BTF)
    return x_BTD, kv


def _cache_write(cache_BKSH, new_BTKH, index):
    """Writes T new slots at `index` into one layer's buffer; returns (buffer, its slots as a
    [B, S, K, H] view: XLA folds that transpose into the attention dots, so the slots are read
    in place)."""
    zero = jnp.zeros((), jnp.int32)
    new_BKTH = jnp.swapaxes(new_BTKH, 1, 2).astype(cache_BKSH.dtype)
    cache_BKSH = jax.lax.dynamic_update_slice(cache_BKSH, new_BKTH, (zero, zero, index, zero))
    return cache_BKSH, jnp.swapaxes(cache_BKSH, 1, 2)


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

    def __call__(self, input_ids, attention_mask=None, *, positions_BT=None, segment_ids_BT=None,
                 dropout_keys_B=None):
        """input_ids [B, T] (+ attention_mask [B, T], 1 = token, left padding honoured) ->
        float32 logits [B, T, V]. Keyword names are the ecosystem's (DESIGN.md contract)."""
        x_BTD = self.hidden_states(input_ids, attention_mask, positions_BT=positions_BT,
                                   segment_ids_BT=segment_ids_BT, dropout_keys_B=dropout_keys_B)
        return self.logits(x_BTD)

    def hidden_states(self, input_ids, attention_mask=None, *, positions_BT=None, segment_ids_BT=None,
                      dropout_keys_B=None):
        """Final normed activations x_BTD; pair with `logits` for chunked losses."""
        x_BTD, _ = self.forward_with_cache(input_ids, None, attention_mask=attention_mask,
                                           positions_BT=positions_BT, segment_ids_BT=segment_ids_BT,
                                           dropout_keys_B=dropout_keys_B)
        return x_BTD

    def logits(self, x_BTD, head_DV=None):
        """x_BTD -> float32 logits_BTV (tied embeddings reuse the embedding table). A decode
        loop may pass `head_DV` (the table transposed once per call): XLA:CPU reads [D, V]
        faster than [V, D] for a few rows. A 2-D matmul over flattened (batch, length) rows,
        models/matmul.dense, as in lora.project."""
        x_MD = x_BTD.astype(self.dtype).reshape(-1, x_BTD.shape[-1])
        if head_DV is not None:
            transposed, head = False, head_DV
        elif self.config.tie_word_embeddings:  # contract against the table as stored: no transpose copy
            transposed, head = True, parallel.on_device(self.embed[...]).astype(self.dtype)
        else:
            transposed, head = False, parallel.on_device(self.lm_head[...]).astype(self.dtype)
        logits_MV = dense(x_MD, head, transposed=transposed, out_dtype=jnp.float32)
        return logits_MV.reshape(*x_BTD.shape[:-1], logits_MV.shape[-1])

    def forward_with_cache(self, input_ids, cache: Optional[KVCache], *, attention_mask=None,
                           positions_BT=None, segment_ids_BT=None, layer_params=None, dropout_keys_B=None):
        """Runs the stack; with a cache, writes T new slots at cache.index and advances it.

        Returns (final normed x_BTD, cache). Tokens attend to earlier slots/tokens of the same
        segment only (segment 0 = padding). Packed rows must pass positions_BT explicitly.
        With a cache the layers run unrolled (one cache buffer each, see KVCache); passing
        `layer_params` (from `self.layers.unstacked()`) runs them on weights sliced once by the
        caller: decode loops pass them so no step copies a layer's weights.
        `dropout_keys_B` (one PRNG key per row; training updates only) turns on LoRA dropout
        (models/lora.py); without it the forward is deterministic.
        """
        cfg = self.config
        input_ids_BT, attention_mask_BT = input_ids, attention_mask
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

        x_BTD = parallel.on_device(self.embed[...]).astype(self.dtype)[input_ids_BT]
        x_BTD, cache = self.layers(cfg, x_BTD, cos_BTH, sin_BTH, mask_BTS, cache, layer_params, dropout_keys_B)
        if cache is not None:
            cache = dataclasses.replace(cache, index=cache.index + T)
        return rms_norm(x_BTD, parallel.on_device(self.final_norm[...]), cfg.rms_norm_eps), cache
