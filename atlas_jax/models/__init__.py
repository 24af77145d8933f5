"""One generic decoder (Llama 3, Qwen2/2.5, Qwen3), HF checkpoints in and out, tokenizers."""

from __future__ import annotations

from typing import Optional

from jax.sharding import Mesh

from atlas_jax.config import ModelConfig
from atlas_jax.models.build import init_model, param_count, param_shardings
from atlas_jax.models.decoder import Decoder, KVCache
from atlas_jax.models.hf import config_from_hf, config_to_hf, from_pretrained, save_pretrained
from atlas_jax.models.tokenizer import load_tokenizer, render_chat


def load_model(cfg: ModelConfig, *, mesh: Optional[Mesh] = None, seed: int = 0) -> Decoder:
    """Random init when cfg.model_name_or_path is None, else the checkpoint it names."""
    if cfg.model_name_or_path is None:
        return init_model(cfg, mesh=mesh, seed=seed)
    return from_pretrained(cfg.model_name_or_path, dtype=cfg.dtype, mesh=mesh, config=cfg)


__all__ = ["Decoder", "KVCache", "init_model", "from_pretrained", "load_model", "save_pretrained",
           "load_tokenizer", "render_chat", "param_count", "param_shardings", "config_from_hf",
           "config_to_hf"]
