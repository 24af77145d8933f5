"""Low-rank adapters (LoRA) on the decoder's projections.

For a target projection W (stacked [L, *in, *out]) the layer computes
    y = x W + (alpha / rank) * (x A) B,    A [L, *in, R], B [L, R, *out],
with B initialised to zero, so a fresh adapter leaves the model unchanged. Adapters are
`LoraParam`s (an nnx.Param subclass): `split` separates them from the frozen base, the
train state holds only them (gradients and Adam moments exist for adapters alone), and
the base travels to the step as a separate, non-differentiated argument.

Dropout (model.lora.dropout = p > 0), as in PEFT: the training forward computes
    y = x W + (alpha / rank) * (dropout_p(x) A) B,
the base seeing the undropped x. It is on only when the caller passes per-row keys
(`dropout_keys_B`), which only the training update does: generation, evaluation and
GRPO's log-prob passes run the exact forward above, as does any forward with p = 0.

Letters: R is the adapter rank (the others as in models/decoder.py).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from atlas_jax import parallel
from atlas_jax.config import ConfigError, LoraConfig, ModelConfig
from atlas_jax.models import quant
from atlas_jax.models.matmul import dense
from atlas_jax.models.projections import EINSUMS, INPUT_AXES

A_SUFFIX, B_SUFFIX = "_lora_a", "_lora_b"
PROJECTION_IDS = {name: i for i, name in enumerate(EINSUMS)}  # folded into dropout keys


class LoraParam(nnx.Param):
    """An adapter matrix: the only variables trained when model.lora.rank > 0."""


def scale(cfg: ModelConfig) -> float:
    return cfg.lora.alpha / cfg.lora.rank


def add_adapters(layers: nnx.Module, cfg: ModelConfig, rngs: nnx.Rngs) -> None:
    """Creates A (uniform, as PEFT's kaiming init) and B (zeros) for every target module."""
    R, pd = cfg.lora.rank, jnp.dtype(cfg.param_dtype)
    for name in cfg.lora.target_modules:
        var = getattr(layers, name, None)
        if name not in EINSUMS or not isinstance(var, nnx.Param):
            raise ConfigError(f"model.lora.target_modules: {name!r} is not a decoder projection "
                              f"(one of {', '.join(EINSUMS)})")
        n_in = INPUT_AXES[name]
        axes = var.get_metadata("out_sharding")
        in_shape, out_shape = var.shape[1:1 + n_in], var.shape[1 + n_in:]
        L = var.shape[0]
        bound = 1.0 / math.sqrt(math.prod(in_shape))
        a = jax.random.uniform(rngs.params(), (L, *in_shape, R), jnp.float32, -bound, bound)
        setattr(layers, name + A_SUFFIX, LoraParam(
            a.astype(pd), out_sharding=(axes[0], *axes[1:1 + n_in], "lora_rank"), eager_sharding=False))
        setattr(layers, name + B_SUFFIX, LoraParam(
            jnp.zeros((L, R, *out_shape), pd), out_sharding=(axes[0], "lora_rank", *axes[1 + n_in:]),
            eager_sharding=False))


def fold_in(keys_B, data):
    """Each row's key folded with the same `data` (a layer index, a projection id)."""
    return jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys_B, data)


def dropout(x_B, keys_B, rate: float):
    """Inverted dropout, row b's mask drawn from keys_B[b] alone (so a row's mask does not
    depend on which rows share its micro-batch)."""
    keep_B = jax.vmap(lambda key: jax.random.bernoulli(key, 1.0 - rate, x_B.shape[1:]))(keys_B)
    return jnp.where(keep_B, x_B / (1.0 - rate), 0).astype(x_B.dtype)


def project(cfg: ModelConfig, p: dict, name: str, x, dropout_keys_B=None):
    """The projection `name` of one layer (its einsum in models/projections.py) on x, plus the
    adapter's low-rank term when `name` has one.

    Computed as one 2-D matmul (models/matmul.dense), [rows, inputs] @ [inputs, outputs],
    with the input's leading axes (batch, length) and the weight's input and output axes each
    flattened (free reshapes of contiguous axes): as a 3- or 4-D einsum, XLA:CPU copied a
    transpose of the activations for every projection's weight gradient and still ran it
    on its slow kernels; dense's gradient copies one transpose and runs on the fast ones.
    `dropout_keys_B` (one key per row of x, already folded with the layer) turns on the
    adapter's input dropout; each projection draws its own masks, as PEFT's per-module
    Dropout does."""
    n_in = INPUT_AXES[name]
    w, a = p[name], p.get(name + A_SUFFIX)
    lead, out = x.shape[:-n_in], w.shape[n_in:]
    x_MI = x.reshape(math.prod(lead), -1)
    y = dense(x_MI, w.reshape(x_MI.shape[1], -1)).reshape(*lead, *out)
    if a is None:
        return y
    if dropout_keys_B is not None and cfg.lora.dropout > 0:
        x_MI = dropout(x, fold_in(dropout_keys_B, PROJECTION_IDS[name]), cfg.lora.dropout).reshape(x_MI.shape)
    x_MR = dense(x_MI, a.reshape(x_MI.shape[1], -1))
    b = p[name + B_SUFFIX]
    return y + scale(cfg) * dense(x_MR, b.reshape(b.shape[0], -1)).reshape(*lead, *out)


def split(model) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """(graphdef, adapters, frozen base). `combine(adapters, base)` rebuilds the full state."""
    graphdef, adapters, base = nnx.split(model, LoraParam, ...)
    if not jax.tree.leaves(adapters):
        raise ConfigError("model.lora.rank=0: the model has no adapters to split off")
    return graphdef, adapters, base


def combine(adapters, base):
    """The full parameter state (no copy: the same arrays, one tree)."""
    return nnx.merge_state(adapters, base)


def disabled(adapters):
    """Adapters that add exactly zero (B = 0): with them the model IS the frozen base, so
    GRPO's reference policy needs no second copy of the weights."""
    return jax.tree.map(jnp.zeros_like, adapters)


def has_adapters(model) -> bool:
    return any(isinstance(v, LoraParam) for v in vars(model.layers).values())


def merged_weight(layers, name: str, cfg: ModelConfig):
    """W (dequantised if 4-bit) + (alpha / R) A B, stacked over layers, in float32."""
    codes_or_w = parallel.on_device(getattr(layers, name)[...])  # the base may be offloaded
    scale_var = getattr(layers, name + quant.SCALE_SUFFIX, None)
    w = (codes_or_w.astype(jnp.float32) if scale_var is None
         else jax.vmap(lambda c, s: quant.dequantize(c, s, jnp.float32))(codes_or_w,
                                                                          parallel.on_device(scale_var[...])))
    a = getattr(layers, name + A_SUFFIX, None)
    if a is None:
        return w
    b = getattr(layers, name + B_SUFFIX)[...].astype(jnp.float32)
    a = a[...].astype(jnp.float32)
    n_in = INPUT_AXES[name]
    ins, outs = "ijk"[:n_in], "mno"[:b.ndim - 2]
    return w + scale(cfg) * jnp.einsum(f"l{ins}r,lr{outs}->l{ins}{outs}", a, b)


def merge_adapters(model):
    """A plain decoder (lora.rank 0, full-precision base) whose forward equals the adapted
    one: for export with `save_pretrained`. The input model is left unchanged. The plain
    model is built from `type(model)`, so this module needs no import of the decoder (which
    imports it)."""
    cfg = model.config
    plain = dataclasses.replace(cfg, lora=LoraConfig(), load_in_4bit=False)
    out = nnx.eval_shape(lambda: type(model)(plain, rngs=nnx.Rngs(0)))
    pd = jnp.dtype(plain.param_dtype)
    for path, var in nnx.to_flat_state(nnx.state(out)):
        owner = model
        for key in path[:-1]:
            owner = getattr(owner, key)
        if path[0] == "layers" and path[-1] in EINSUMS:
            value = merged_weight(owner, path[-1], cfg).astype(pd)
        else:
            value = parallel.on_device(getattr(owner, path[-1])[...])
        var.set_value(value)
    return out


def split_trainable(model) -> tuple[nnx.GraphDef, nnx.State, nnx.State | None]:
    """(graphdef, trained params, frozen params or None): adapters vs base with LoRA, else
    every Param trained and nothing frozen."""
    if has_adapters(model):
        return split(model)
    graphdef, params = nnx.split(model, nnx.Param)
    return graphdef, params, None


def full_params(params, frozen):
    """What the forward needs: trained params plus the frozen base when there is one."""
    return params if frozen is None else combine(params, frozen)
