"""Random initialisation straight onto shardings (parallel.param_shardings), parameter count."""

from __future__ import annotations

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
    def make():
        return Decoder(cfg, rngs=nnx.Rngs(seed))

    graphdef, abstract_state = nnx.split(nnx.eval_shape(make))
    state = jax.jit(lambda: nnx.state(make()), out_shardings=_shardings(abstract_state, mesh))()
    return nnx.merge(graphdef, state)


def init_variables(cfg: ModelConfig, variable_type, *, mesh: Optional[Mesh] = None, seed: int = 0):
    """Fresh values of only the variables of `variable_type` (e.g. LoRA adapters), on their
    shardings; XLA drops the rest of the initialisation, so no other weight is materialised."""
    def chosen():
        return nnx.state(Decoder(cfg, rngs=nnx.Rngs(seed)), variable_type)

    abstract = nnx.eval_shape(chosen)
    return jax.jit(chosen, out_shardings=_shardings(abstract, mesh))()


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
