"""Logical axes -> shardings: the rules table, and dims the mesh does not divide."""

import jax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from atlas_jax.config import MeshConfig
from atlas_jax.models import Decoder
from atlas_jax.parallel import logical_to_spec, make_mesh, param_shardings, spec_for
from tests.tiny import TINY


def test_logical_names_map_through_the_one_table():
    assert logical_to_spec(("layers", "embed", "mlp")) == P(None, "fsdp", "tensor")
    with pytest.raises(KeyError, match="no_such_axis"):
        logical_to_spec(("no_such_axis",))


def test_a_dim_the_mesh_does_not_divide_stays_replicated():
    mesh = make_mesh(MeshConfig(data=1, fsdp=2, tensor=4))
    # 2 kv heads on tensor=4: replicated; 32 wide on fsdp=2: split
    assert spec_for(mesh, ("layers", "embed", "kv_heads", "head_dim"), (2, 32, 2, 8)) == P(None, "fsdp", None, None)
    assert spec_for(mesh, ("layers", "embed", "heads", "head_dim"), (2, 32, 4, 8)) == P(None, "fsdp", "tensor", None)


def test_param_shardings_of_an_abstract_model_mirror_its_state():
    mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
    abstract = nnx.state(nnx.eval_shape(lambda: Decoder(TINY, rngs=nnx.Rngs(0))), nnx.Param)
    shardings = param_shardings(abstract, mesh)
    assert jax.tree.structure(shardings) == jax.tree.structure(abstract)
    assert shardings["embed"].get_value().spec == P("tensor", "fsdp")  # [V, D]: vocab, embed
