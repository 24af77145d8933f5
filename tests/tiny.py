"""The one tiny model the tests build: 2 layers, 32 wide, GQA 4:2, qk-norm (Qwen3's shape).

Tests that need another vocabulary or a feature switched on pass it as an override, so each
test says only what it changes.
"""

import dataclasses

from atlas_jax.config import ModelConfig

TINY = ModelConfig(name="test_tiny", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=8, qk_norm=True,
                   max_position_embeddings=128)


def tiny_config(**overrides) -> ModelConfig:
    """TINY with `overrides` (any ModelConfig field) applied."""
    return dataclasses.replace(TINY, **overrides)
