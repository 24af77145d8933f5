"""Batch is a pytree; to_global assembles process-local rows into data-sharded arrays."""

import jax
import numpy as np

from atlas_jax.config import MeshConfig
from atlas_jax.data import Batch, to_global
from atlas_jax.data.batch import empty_rows, single_example_row, stack
from atlas_jax.parallel import DATA_AXES, make_mesh


def test_rows_and_stack():
    row = single_example_row(np.arange(1, 6, dtype=np.int32), np.array([0, 0, 1, 1, 1], np.float32), 8, pad_id=0)
    batch = stack([row, row], num_rows=4, length=8, pad_id=0)
    assert batch.tokens.shape == (4, 8)
    np.testing.assert_array_equal(batch.segment_ids[0], [1, 1, 1, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(batch.positions[1], [0, 1, 2, 3, 4, 0, 0, 0])
    assert batch.loss_mask[2:].sum() == 0 and batch.segment_ids[2:].sum() == 0
    assert len(jax.tree.leaves(empty_rows(2, 4, 0))) == 4


def test_to_global_shards_over_data_axes():
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    rows = [single_example_row(np.arange(i + 2, dtype=np.int32), np.ones(i + 2, np.float32), 16, 0) for i in range(8)]
    local = stack(rows, num_rows=8, length=16, pad_id=0)
    out = to_global(local, mesh)
    assert isinstance(out, Batch)
    for name, x in zip(("tokens", "positions", "segment_ids", "loss_mask"), jax.tree.leaves(out)):
        assert x.shape == (8, 16) and x.sharding.spec[0] == DATA_AXES, name
        np.testing.assert_array_equal(np.asarray(x), getattr(local, name))
    assert out.tokens.dtype == np.int32 and out.loss_mask.dtype == np.float32
    # Each of the 4 data shards holds 2 rows.
    assert {s.data.shape for s in out.tokens.addressable_shards} == {(2, 16)}
