"""One generic decoder (Llama 3, Qwen2/2.5, Qwen3), HF checkpoints in and out, tokenizers."""

from __future__ import annotations

from typing import Optional

from jax.sharding import Mesh

from atlas_jax.config import ModelConfig
from atlas_jax.models import lora, quant
from atlas_jax.models.build import init_model, param_count
from atlas_jax.models.decoder import Decoder, KVCache
from atlas_jax.models.hf import config_from_hf, config_to_hf, from_pretrained, save_pretrained
from atlas_jax.models.tokenizer import load_tokenizer, render_chat


def load_model(cfg: ModelConfig, *, mesh: Optional[Mesh] = None, seed: int = 0) -> Decoder:
    """Random init when cfg.model_name_or_path is None, else the checkpoint it names;
    with cfg.load_in_4bit the layer projections are then stored as NF4 (models/quant.py)."""
    if cfg.model_name_or_path is None:
        model = init_model(cfg, mesh=mesh, seed=seed)
    else:
        model = from_pretrained(cfg.model_name_or_path, dtype=cfg.dtype, mesh=mesh, config=cfg, seed=seed)
    if cfg.load_in_4bit:
        quant.quantize_model(model)
    return model


__all__ = ["Decoder", "KVCache", "init_model", "from_pretrained", "load_model", "save_pretrained",
           "load_tokenizer", "render_chat", "param_count", "config_from_hf",
           "config_to_hf"]
