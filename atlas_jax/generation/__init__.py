"""Jitted, sharded KV-cache sampler over the models' decoder."""

from atlas_jax.generation.sampler import GenerateOutput, bucket, generate
from atlas_jax.generation.sampling import filtered_logits, sample_tokens

__all__ = ["GenerateOutput", "generate", "bucket", "filtered_logits", "sample_tokens"]
