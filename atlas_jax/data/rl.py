"""RL pipeline: rows -> {"prompt", "ground_truth", ...} records, batched as lists of prompts.

Prompts stay text: the rollout renders them into its own templates (teacher guidance,
student probe, ...) and tokenizes there, so this layer knows nothing of the tokenizer.
"""

from __future__ import annotations

import functools
import logging
from typing import Optional

import grain

from atlas_jax.config import DataConfig
from atlas_jax.data import sources
from atlas_jax.data.shards import EMPTY, READ_OPTIONS, example_dataset, local_batch_size, process_share

log = logging.getLogger(__name__)


class _BadPrompt(ValueError):
    pass


def to_record(row: dict, cfg: DataConfig) -> dict:
    """Maps configured field names onto `prompt` / `ground_truth`; other fields are kept."""
    prompt = row.get(cfg.prompt_field)
    if prompt is None:
        raise _BadPrompt(f"missing field '{cfg.prompt_field}'")
    if not isinstance(prompt, str):
        raise _BadPrompt(f"field '{cfg.prompt_field}' is {type(prompt).__name__}, not str")
    if not prompt.strip():
        raise _BadPrompt(f"empty field '{cfg.prompt_field}'")
    if row.get(cfg.answer_field) is None:
        raise _BadPrompt(f"missing field '{cfg.answer_field}'")
    try:
        answer = sources.final_answer(row[cfg.answer_field], cfg.answer_format, cfg.answer_field)
    except ValueError as e:
        raise _BadPrompt(str(e)) from None
    extras = {k: v for k, v in row.items() if k not in (cfg.prompt_field, cfg.answer_field)}
    return {**extras, "prompt": prompt.strip(), "ground_truth": answer}


@functools.lru_cache(maxsize=8)
def prepare(cfg: DataConfig, split: str) -> tuple[list[dict], sources.RowReport]:
    """Every valid record of a split (all processes alike), with its row report."""
    records, report = sources.load(cfg, split, functools.partial(to_record, cfg=cfg), (_BadPrompt,))
    log.info(report.summary(f"{cfg.name}/{split}", len(records)))
    return records, report


def rl_num_examples(cfg: DataConfig, *, split: str) -> int:
    """Prompts per epoch over all processes, after bad rows."""
    return len(prepare(cfg, split)[0])


def rl_batches(
    cfg: DataConfig,
    *,
    split: str,
    batch_size: int,
    seed: int,
    num_epochs: Optional[int] = None,
    process_index: Optional[int] = None,
    process_count: Optional[int] = None,
) -> grain.DatasetIterator:
    """Grain iterator of lists of batch_size // process_count prompt records.

    Training (split "train") drops a short final batch so every step has the same number
    of prompts; evaluation keeps it so every prompt is scored once per epoch. With finite
    epochs all processes yield the same number of batches (shares are filled up evenly).
    """
    records, report = prepare(cfg, split)
    if not records:
        raise sources.DataError(f"data {cfg.name}/{split}: no prompts left from {report.origin}")
    index, count = process_share(process_index, process_count)
    ids = example_dataset(
        len(records), shuffle=cfg.shuffle, seed=seed, num_epochs=num_epochs, process_index=index, process_count=count
    )
    # Copies, so a consumer that annotates a record cannot change later epochs. EMPTY
    # slots (finite epochs, several processes) leave a batch one prompt short instead of
    # leaving a process one batch short.
    prompts = ids.map(lambda i: None if i == EMPTY else dict(records[i]))
    batches = prompts.batch(
        local_batch_size(batch_size, count),
        drop_remainder=split == "train",
        batch_fn=lambda recs: [r for r in recs if r is not None],
    )
    return iter(batches.to_iter_dataset(READ_OPTIONS))
