"""Random initialisation: straight onto the mesh, equal to one device; the parameter count."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from atlas_jax.config import MeshConfig
from atlas_jax.models import init_model, load_model, param_count
from atlas_jax.parallel import make_mesh, param_shardings
from tests.tiny import tiny_config


def test_init_on_mesh_is_sharded_and_matches_single_device():
    cfg = tiny_config(vocab_size=96, tie_word_embeddings=False)
    mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
    sharded = init_model(cfg, mesh=mesh, seed=1)
    single = init_model(cfg, seed=1)
    gate = sharded.layers.gate_proj[...]  # [L, D, F] = [2, 32, 64] over (None, fsdp, tensor)
    assert gate.addressable_shards[0].data.shape == (2, 8, 32)
    np.testing.assert_array_equal(np.asarray(gate), np.asarray(single.layers.gate_proj[...]))
    _, params = nnx.split(sharded, nnx.Param)
    shardings = param_shardings(params, mesh)
    assert shardings["layers"]["gate_proj"].get_value().spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    ids = jnp.ones((8, 4), jnp.int32)
    np.testing.assert_allclose(np.asarray(sharded(ids)), np.asarray(single(ids)), atol=1e-5)


def test_param_count_counts_every_parameter():
    cfg = tiny_config(tie_word_embeddings=False, attention_bias=True)
    model = load_model(cfg, seed=3)
    assert sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))) == param_count(cfg)


def test_every_seed_runs_one_compiled_initialisation():
    """The seed is the program's argument, not a constant: a second seed compiles nothing,
    and each seed's weights are those of nnx.Rngs(seed) in one jitted call."""
    from atlas_jax.models import build
    from atlas_jax.models.decoder import Decoder

    cfg = tiny_config(num_hidden_layers=1)
    _, program = build._initializer(cfg, None, None)
    models = {seed: init_model(cfg, seed=seed) for seed in (3, 4)}
    assert program._cache_size() == 1
    for seed, model in models.items():
        direct = jax.jit(lambda s=seed: nnx.state(Decoder(cfg, rngs=nnx.Rngs(s))))()
        for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(direct), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    a, b = (jax.tree.leaves(nnx.state(models[s], nnx.Param))[0] for s in (3, 4))
    assert not np.array_equal(np.asarray(a), np.asarray(b))  # the seed still matters
