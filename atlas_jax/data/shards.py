"""Which examples a process reads, in which order, and how many rows it batches.

Every process walks the same global stream (a seeded per-epoch shuffle of the split) and
process p of P takes its positions p, p+P, ...: shares are disjoint, cover the split, and
differ in size by at most one. A global batch (the processes' local batches in process
order) therefore holds the same examples whatever P is, only in another row order, so a
run's loss curve does not depend on how many processes feed it.
"""

from __future__ import annotations

from typing import Optional

import grain
import jax

# Elements are slices of in-memory lists, so reader threads only add overhead: Grain's
# default (16 threads, 500-element buffer) cost several times the packing itself in
# bench/data.py.
READ_OPTIONS = grain.ReadOptions(num_threads=0)


def process_share(process_index: Optional[int], process_count: Optional[int]) -> tuple[int, int]:
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if not 0 <= index < count:
        raise ValueError(f"process_index={index} is outside [0, process_count={count})")
    return index, count


def local_batch_size(batch_size: int, process_count: int) -> int:
    if batch_size % process_count:
        raise ValueError(f"batch_size={batch_size} is not divisible by process_count={process_count}")
    return batch_size // process_count


# Index of a slot that holds no example; see `example_dataset`.
EMPTY = -1


def example_dataset(
    num_examples: int, *, shuffle: bool, seed: int, num_epochs: Optional[int], process_index: int, process_count: int
) -> grain.MapDataset:
    """Indices of this process's share: every process_count-th position of the global stream.

    With a finite number of epochs the stream is filled up to a multiple of process_count
    with EMPTY, so all processes yield the same number of batches and none waits forever in
    a collective for a peer that already stopped. Repeating forever needs no filler.
    """
    stream = grain.MapDataset.range(num_examples)
    if shuffle:
        stream = stream.shuffle(seed=seed)
    # repeat() reseeds the shuffle each epoch, so epochs differ but stay reproducible.
    stream = stream.repeat(num_epochs)
    if num_epochs is not None:
        total = len(stream)
        slots = -(-total // process_count) * process_count
        if slots > total:
            examples = stream  # the lambda must not see `stream` rebound
            stream = grain.MapDataset.range(slots).map(lambda k: examples[k] if k < total else EMPTY)
    return stream[process_index::process_count]
