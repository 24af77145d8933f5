"""The one batch type SFT and RL share, and its host -> global-array assembly."""

from __future__ import annotations

from typing import Sequence

import flax.struct
import jax
import numpy as np
from jax.sharding import Mesh

from atlas_jax.parallel import batch_sharding


@flax.struct.dataclass
class Batch:
    """Token rows, possibly packed with several examples each.

    tokens       int32   [B, T]
    positions    int32   [B, T]  restart at 0 for every packed example
    segment_ids  int32   [B, T]  0 = padding, 1..n = the examples packed in the row
    loss_mask    float32 [B, T]  1 where token t is a target (predicted from t-1); never
                                 the first token of a segment, never padding
    Fields are numpy on the host (what pipelines yield) or jax.Arrays after `to_global`.
    """

    tokens: np.ndarray
    positions: np.ndarray
    segment_ids: np.ndarray
    loss_mask: np.ndarray


def empty_rows(num_rows: int, length: int, pad_id: int) -> Batch:
    """All-padding rows: they carry no loss, so they can fill a short final batch."""
    zeros_BT = np.zeros((num_rows, length), np.int32)
    return Batch(
        tokens=np.full((num_rows, length), pad_id, np.int32),
        positions=zeros_BT,
        segment_ids=zeros_BT.copy(),
        loss_mask=np.zeros((num_rows, length), np.float32),
    )


def single_example_row(tokens_T: np.ndarray, mask_T: np.ndarray, length: int, pad_id: int) -> Batch:
    """One unpacked example right-padded to `length`, as a [1, length] Batch."""
    row = empty_rows(1, length, pad_id)
    n = len(tokens_T)
    row.tokens[0, :n] = tokens_T
    row.positions[0, :n] = np.arange(n, dtype=np.int32)
    row.segment_ids[0, :n] = 1
    row.loss_mask[0, :n] = mask_T
    return row


def stack(rows: Sequence[Batch], num_rows: int, length: int, pad_id: int) -> Batch:
    """Concatenates rows and pads with empty rows up to `num_rows` (static batch shape)."""
    rows = list(rows)
    if len(rows) < num_rows:
        rows.append(empty_rows(num_rows - len(rows), length, pad_id))
    return jax.tree.map(lambda *xs: np.concatenate(xs, axis=0), *rows)


def to_global(batch_np: Batch, mesh: Mesh) -> Batch:
    """Process-local numpy rows -> global jax.Arrays sharded over the data axes.

    Each process passes only its own share (from a pipeline built with its process index);
    the global batch is the concatenation over processes in process order.
    """
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch_np)
