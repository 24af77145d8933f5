"""Random initialisation straight onto shardings (parallel.param_shardings), parameter count."""

from __future__ import annotations

import functools
from typing import Optional

import jax
from flax import nnx
from jax.sharding import Mesh

from atlas_jax import parallel
from atlas_jax.config import ModelConfig
from atlas_jax.models.decoder import Decoder


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def _shardings(abstract_state, mesh: Optional[Mesh]):
    if mesh is not None:
        return parallel.param_shardings(abstract_state, mesh)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda v: v.replace(device), abstract_state, is_leaf=_is_var)


def init_model(cfg: ModelConfig, *, mesh: Optional[Mesh] = None, seed: int = 0) -> Decoder:
    """Random init from `seed`; with a mesh every parameter is created on its sharding."""
    graphdef, init = _initializer(cfg, mesh, None)
    return nnx.merge(graphdef, init(jax.random.key(seed)))


def init_variables(cfg: ModelConfig, variable_type, *, mesh: Optional[Mesh] = None, seed: int = 0):
    """Fresh values of only the variables of `variable_type` (e.g. LoRA adapters), on their
    shardings; XLA drops the rest of the initialisation, so no other weight is materialised."""
    _, init = _initializer(cfg, mesh, variable_type)
    return init(jax.random.key(seed))


@functools.lru_cache(maxsize=32)
def _initializer(cfg: ModelConfig, mesh: Optional[Mesh], variable_type):
    """(graphdef, jitted key -> state) of one architecture's initialisation on one mesh. The
    key is an argument, not a constant, so every seed runs the same program: XLA:CPU takes
    about 2 s to compile the random draws even for a tiny model, once per architecture now
    (the values equal those of nnx.Rngs(seed))."""
    def state(key):
        model = Decoder(cfg, rngs=nnx.Rngs(key))
        return nnx.state(model) if variable_type is None else nnx.state(model, variable_type)

    shapes = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
    abstract = nnx.state(shapes) if variable_type is None else nnx.state(shapes, variable_type)
    return nnx.graphdef(shapes), jax.jit(state, out_shardings=_shardings(abstract, mesh))


def param_count(cfg: ModelConfig) -> int:
    """Parameters of the architecture, counted from the config (tied embeddings once)."""
    D, F, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    N, K, H = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.resolved_head_dim
    attn = D * N * H + 2 * D * K * H + N * H * D
    if cfg.attention_bias:
        attn += N * H + 2 * K * H
    if cfg.qk_norm:
        attn += 2 * H
    layer = attn + 3 * D * F + 2 * D
    head = 0 if cfg.tie_word_embeddings else D * V
    return V * D + cfg.num_hidden_layers * layer + D + head
