"""QLoRA's frozen base: decoder projections stored as 4-bit NormalFloat (NF4) codes.

The numerics come from qwix (Google's JAX quantisation library): `qwix.quantize(w, "nf4",
...)` picks the nearest of the 16 NF4 levels (normal-distribution quantiles, as in the
QLoRA paper) after scaling each group by its absmax (times a clipping factor: we keep,
per group, the factor of CLIP_FACTORS with the least squared error), and stores codes as
`uint4`, which XLA packs two per byte. We use qwix for the array numerics only; its model
interception (rewriting nnx.Linear calls) does not fit a decoder whose projections are stacked
[L, ...] arrays consumed inside one `lax.scan`, so dequantisation happens here, one layer
at a time inside the scan: only one layer's weights ever exist in compute dtype.

Layout: the projection variable keeps its name and shape and holds the uint4 codes
(`NF4Codes`); `<name>_nf4_scale` (`NF4Scale`) holds one bf16 absmax per group of GROUP
consecutive elements of the projection's last input axis, for every other index.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import qwix
from flax import nnx
from jax.sharding import NamedSharding, SingleDeviceSharding

from atlas_jax import parallel
from atlas_jax.config import ConfigError
from atlas_jax.models.projections import INPUT_AXES

GROUP = 64  # elements per scale (QLoRA's block size); smaller when the axis is smaller
# Each group's scale is its absmax times the factor here that minimises the group's squared
# error (1.0 first: plain absmax, as bitsandbytes). Clipping a group's rare extreme value
# buys finer levels for the rest: -6.5% weight error on Gaussian weights (9.2% -> 8.6%).
CLIP_FACTORS = (1.0, 0.975, 0.95, 0.925, 0.9, 0.875, 0.85, 0.825, 0.8, 0.775, 0.75, 0.725, 0.7)
SCALE_SUFFIX = "_nf4_scale"
SCALE_DTYPE = jnp.bfloat16  # rounding the scale adds ~0.4% error, small beside NF4's own


class NF4Codes(nnx.Param):
    """Frozen 4-bit codes of a projection (never trained: QLoRA trains adapters only)."""


class NF4Scale(nnx.Param):
    """Per-group absmax scales of an NF4Codes variable."""


def _tile_axis(name: str) -> int:
    return INPUT_AXES[name]  # the last input axis: axis 0 is the stacked layer axis


def group_size(dim: int) -> int:
    return min(GROUP, dim)


def quantize(w, name: str, factors: tuple[float, ...] = CLIP_FACTORS) -> tuple[jax.Array, jax.Array]:
    """Stacked weight [L, ...] -> (uint4 codes, same shape; bf16 scales, one per group).

    Each group keeps the clipping factor (of `factors`) with its least squared error;
    factors=(1.0,) is plain absmax."""
    axis = _tile_axis(name)
    tile = axis - 1  # the same axis within one layer
    g = group_size(w.shape[axis])
    if w.shape[axis] % g:
        raise ConfigError(f"model.load_in_4bit: {name} axis {axis} of size {w.shape[axis]} "
                          f"is not a multiple of the group size {g}")
    others = tuple(a for a in range(w.ndim - 1) if a != tile)  # per-layer axes (layer dim removed)

    def group_sums(x):  # [..., n * g, ...] -> [..., n, ...]: one value per scale
        return x.reshape(x.shape[:tile] + (x.shape[tile] // g, g) + x.shape[tile + 1:]).sum(tile + 1)

    def candidate(w_layer, factor):  # (per-group squared error, codes, float32 scales)
        q = qwix.quantize(w_layer, "nf4", channelwise_axes=others, tiled_axes={tile: g},
                          calibration_method=f"absmax,{factor}", scale_dtype=jnp.float32)
        return group_sums(jnp.square(qwix.dequantize(q) - w_layer)), q.qvalue, q.scale

    def one_layer(w_layer):  # lax.map over layers bounds qwix's [elements x 16] search buffer
        err, codes, scale = candidate(w_layer, factors[0])
        for factor in factors[1:]:
            new_err, new_codes, new_scale = candidate(w_layer, factor)
            better = new_err < err
            codes = jnp.where(jnp.repeat(better, g, axis=tile), new_codes, codes)
            err, scale = jnp.minimum(new_err, err), jnp.where(better, new_scale, scale)
        return codes, scale.astype(SCALE_DTYPE)

    return jax.lax.map(one_layer, w.astype(jnp.float32))


def dequantize(codes, scale, dtype) -> jax.Array:
    """Codes and scales (any leading dims, e.g. one layer's slice) -> weight in `dtype`."""
    q = qwix.QArray(codes, scale.astype(jnp.float32), None, "nf4")
    return qwix.dequantize(q).astype(dtype)


def layer_weights(p: dict, dtype) -> dict:
    """One layer's raw variables -> compute-dtype weights, dequantising NF4 projections."""
    out = {}
    for k, v in p.items():
        if k.endswith(SCALE_SUFFIX):
            continue
        scale = p.get(k + SCALE_SUFFIX)
        out[k] = v.astype(dtype) if scale is None else dequantize(v, scale, dtype)
    return out


def _sharding_like(var: nnx.Variable, shape):
    """The sharding `var` would have at `shape` (scales are shorter on the tiled axis)."""
    sharding = getattr(var[...], "sharding", None)  # None while traced (eval_shape)
    if not isinstance(sharding, NamedSharding):
        return sharding if isinstance(sharding, SingleDeviceSharding) else None
    return NamedSharding(sharding.mesh, parallel.spec_for(sharding.mesh, var.get_metadata("out_sharding"), shape))


def quantize_model(model) -> None:
    """Replaces every layer projection of `model` by NF4 codes + scales, in place."""
    layers = model.layers
    for name in INPUT_AXES:
        var = getattr(layers, name)
        axes = var.get_metadata("out_sharding")
        codes_shape = var.shape
        scale_shape = list(var.shape)
        scale_shape[_tile_axis(name)] //= group_size(var.shape[_tile_axis(name)])
        out = (_sharding_like(var, codes_shape), _sharding_like(var, tuple(scale_shape)))
        codes, scale = jax.jit(quantize, static_argnums=1, out_shardings=out)(var[...], name)
        setattr(layers, name, NF4Codes(codes, out_sharding=axes, eager_sharding=False))
        setattr(layers, name + SCALE_SUFFIX, NF4Scale(scale, out_sharding=axes, eager_sharding=False))


def is_quantized(model) -> bool:
    return isinstance(getattr(model.layers, "q_proj"), NF4Codes)


def quantized_bytes(shape, name: str) -> float:
    """Bytes of one stacked projection in NF4: half a byte per code plus its scales."""
    n = 1
    for d in shape:
        n *= d
    g = group_size(shape[_tile_axis(name)])
    return n / 2 + n / g * jnp.dtype(SCALE_DTYPE).itemsize
