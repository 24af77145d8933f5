"""Tiny random transformers checkpoints (one per family), written once per session."""

import numpy as np
import pytest

ROPE_LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
# every family with GQA (K < N); tied and untied embeddings; llama3 rope scaling
FAMILIES = {
    "llama": dict(rope_scaling=ROPE_LLAMA3, rope_theta=500000.0, tie_word_embeddings=False),
    "qwen2": dict(tie_word_embeddings=True),
    "qwen3": dict(tie_word_embeddings=False),
}


def make_hf_model(family: str, path, *, seed: int = 0, **overrides):
    """A random transformers model saved as safetensors; weights perturbed so norms/biases matter."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

    config_cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[family]
    kw = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, vocab_size=128, max_position_embeddings=128)
    kw.update(FAMILIES[family])
    kw.update(overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config_cls(**kw)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(path, safe_serialization=True)
    return model


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory):
    """family -> (torch model, checkpoint dir)."""
    out = {}
    for family in FAMILIES:
        path = tmp_path_factory.mktemp(family)
        out[family] = (make_hf_model(family, path), str(path))
    return out


@pytest.fixture(scope="session")
def left_padded_batch():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 128, size=(3, 9)).astype(np.int32)
    mask = np.ones((3, 9), np.int32)
    mask[1, :4] = 0
    mask[2, :7] = 0
    ids[mask == 0] = 0
    return ids, mask
