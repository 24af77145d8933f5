"""atlas_jax: train ATLAS-style teacher models (SFT, then RCL/GRPO) in JAX."""

__version__ = "0.1.0"
