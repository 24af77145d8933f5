"""SFT pipeline: rows -> chat-rendered token ids with loss masks -> (packed) Batch rows.

All rows are tokenized once up front (and cached per config, tokenizer and split): it
gives exact truncation/drop counts, an exact examples-per-epoch figure for the trainer,
and a Grain pipeline whose state is a few integers. The Grain part only shuffles, shards,
packs and stacks, which is cheap next to a training step (see bench/data.py).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Optional

import grain
import grain.experimental as grain_exp
import numpy as np

from atlas_jax.config import DataConfig
from atlas_jax.data import batch as batch_lib
from atlas_jax.data import formatting, sources
from atlas_jax.data.shards import EMPTY, READ_OPTIONS, example_dataset, local_batch_size, process_share
from atlas_jax.data.batch import Batch

log = logging.getLogger(__name__)

# Packing feature names; Grain adds `<name>_segment_ids` / `<name>_positions` for each.
_TOKENS, _MASK = "tokens", "loss_mask"


@dataclasses.dataclass(frozen=True)
class SFTExamples:
    """Tokenized examples of one split: lists of tokens [T_i] int32 and loss_mask [T_i] float32."""

    tokens: list
    loss_mask: list
    report: sources.RowReport

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def num_tokens(self) -> int:
        return int(sum(len(t) for t in self.tokens))


def row_length(cfg: DataConfig) -> int:
    """T of an unpacked row: max_length rounded up to pad_to_multiple_of (packed rows: max_length)."""
    if cfg.packing:
        return cfg.max_length
    m = cfg.pad_to_multiple_of
    return -(-cfg.max_length // m) * m


def _tokenize(texts: list[str], tokenizer) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []


@functools.lru_cache(maxsize=8)
def prepare(cfg: DataConfig, tokenizer, split: str) -> SFTExamples:
    """Loads, renders, tokenizes and length-fits every example of a split (all processes alike)."""
    render = functools.partial(formatting.render, cfg=cfg, tokenizer=tokenizer)
    pairs, report = sources.load(cfg, split, lambda row: render(row), (formatting.BadRecord,))
    prompt_ids = _tokenize([p for p, _ in pairs], tokenizer)
    completion_ids = _tokenize([c for _, c in pairs], tokenizer)
    tokens, masks = [], []
    for p_ids, c_ids in zip(prompt_ids, completion_ids):
        tokens_T, mask_T = formatting.encode(
            p_ids, c_ids, eos_id=tokenizer.eos_token_id, completion_only=cfg.completion_only_loss
        )
        fitted = formatting.fit_length(tokens_T, mask_T, cfg.max_length, cfg.truncation)
        if fitted is None:
            report.dropped_long += 1
            continue
        report.truncated += len(fitted[0]) < len(tokens_T)
        tokens.append(fitted[0])
        masks.append(fitted[1])
    log.info(report.summary(f"{cfg.name}/{split}", len(tokens)))
    return SFTExamples(tokens, masks, report)


def sft_num_examples(cfg: DataConfig, tokenizer, *, split: str) -> int:
    """Examples per epoch over all processes, after bad rows and length drops."""
    return len(prepare(cfg, tokenizer, split))


def _pack_row(packed: dict) -> Batch:
    return Batch(
        tokens=packed[_TOKENS][None].astype(np.int32),
        positions=packed[f"{_TOKENS}_positions"][None].astype(np.int32),
        segment_ids=packed[f"{_TOKENS}_segment_ids"][None].astype(np.int32),
        loss_mask=packed[_MASK][None].astype(np.float32),
    )


def sft_batches(
    cfg: DataConfig,
    tokenizer,
    *,
    split: str,
    batch_size: int,
    seed: int,
    num_epochs: Optional[int] = None,
    process_index: Optional[int] = None,
    process_count: Optional[int] = None,
) -> grain.DatasetIterator:
    """Grain iterator of process-local `Batch` [batch_size // process_count, T] (numpy).

    num_epochs None repeats forever (batches then span epoch boundaries). With a finite
    number of epochs the last batch is filled with all-padding rows, so shapes stay static.
    `get_state()` / `set_state()` resume exactly.
    """
    examples = prepare(cfg, tokenizer, split)
    if not len(examples):
        raise sources.DataError(f"data {cfg.name}/{split}: no examples left from {examples.report.origin}")
    index, count = process_share(process_index, process_count)
    rows_per_batch = local_batch_size(batch_size, count)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    length = row_length(cfg)
    ids = example_dataset(
        len(examples), shuffle=cfg.shuffle, seed=seed, num_epochs=num_epochs, process_index=index, process_count=count
    )
    stack = functools.partial(batch_lib.stack, num_rows=rows_per_batch, length=length, pad_id=pad_id)
    if not cfg.packing:
        # An EMPTY slot (finite epochs, several processes) becomes an all-padding row.
        rows = ids.map(
            lambda i: batch_lib.empty_rows(1, length, pad_id) if i == EMPTY
            else batch_lib.single_example_row(examples.tokens[i], examples.loss_mask[i], length, pad_id)
        )
        return iter(rows.batch(rows_per_batch, batch_fn=stack).to_iter_dataset(READ_OPTIONS))
    # Packed rows per process differ with the data anyway, so EMPTY slots are just skipped.
    features = ids.to_iter_dataset(READ_OPTIONS).filter(lambda i: i != EMPTY)
    features = features.map(lambda i: {_TOKENS: examples.tokens[i], _MASK: examples.loss_mask[i]})
    packer = {"first_fit": grain_exp.FirstFitPackIterDataset, "best_fit": grain_exp.BestFitPackIterDataset}[
        cfg.packing_strategy
    ]
    packed = packer(
        features,
        length_struct={_TOKENS: length, _MASK: length},
        num_packing_bins=cfg.packing_bins,
        seed=seed,
        shuffle_bins=cfg.shuffle,
        padding_struct={_TOKENS: pad_id, _MASK: 0.0},
    )
    return iter(packed.map(_pack_row).batch(rows_per_batch, batch_fn=stack))
