"""Packed rows give each example the logits it gets alone (with the models' decoder)."""

import dataclasses

import numpy as np

from atlas_jax.config import ModelConfig
from atlas_jax.data import sft_batches
from atlas_jax.models.build import init_model


def test_packed_logits_equal_unpacked(sft_cfg, tokenizer):
    cfg = dataclasses.replace(sft_cfg, max_length=512, packing=True, packing_bins=2)
    batch = next(sft_batches(cfg, tokenizer, split="train", batch_size=2, seed=0))
    model = init_model(ModelConfig(), seed=0)
    packed_BTV = np.asarray(model(batch.tokens, positions_BT=batch.positions, segment_ids_BT=batch.segment_ids))
    # Every segment again, alone in its own right-padded row, in calls of the packed
    # batch's shape so nothing recompiles.
    where = [(b, s) for b in range(2) for s in range(1, batch.segment_ids[b].max() + 1)]
    alone_ST = np.zeros((len(where) + len(where) % 2, cfg.max_length), np.int32)
    alone_seg_ST = np.zeros_like(alone_ST)
    for i, (b, s) in enumerate(where):
        tokens = batch.tokens[b][batch.segment_ids[b] == s]
        alone_ST[i, : len(tokens)], alone_seg_ST[i, : len(tokens)] = tokens, 1
    alone_STV = np.concatenate([
        np.asarray(model(alone_ST[i : i + 2], segment_ids_BT=alone_seg_ST[i : i + 2]))
        for i in range(0, len(alone_ST), 2)
    ])
    for i, (b, s) in enumerate(where):
        in_row_T = batch.segment_ids[b] == s
        np.testing.assert_allclose(packed_BTV[b][in_row_T], alone_STV[i, : in_row_T.sum()], atol=2e-5, rtol=2e-5)
    assert len(where) >= 3
