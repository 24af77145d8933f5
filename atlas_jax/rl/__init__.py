"""atlas_jax.rl"""
