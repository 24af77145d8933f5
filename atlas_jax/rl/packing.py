"""Padding-free GRPO updates: a rollout's prompt + completion rows packed into fewer rows.

A rollout's training rows (`rollout.training_batch`) are as wide as the longest prompt plus
the whole completion budget, so when completions end early most of each row is padding and
the update's FLOPs follow the budget, not the tokens. `pack_rollout` moves every row's real
tokens (its prompt and its sampled tokens) into packed rows, several sequences a row, as
SFT's packer does: the same `Batch` type, segment ids 1..n per row and positions restarting
at 0 for each sequence, so attention never crosses a sequence.

Packed rows are twice the unpacked width (`packed_layout`). At the same width two sequences
share a row only when both are under half of it, which a rollout rarely has: its prompts are
padded to the longest and a completion that uses half its budget already fills half the
row. At twice the width any two sequences fit, so at most half the rows remain, and with
half the rows at twice the width the update never holds more tokens than unpacked; it pays
for that in attention, whose scores per token double, so where the packed rows would hold
as many tokens as the unpacked ones (every completion near its budget) the rows are left as
they are, with one advantage a row.

What the GRPO loss needs of each sequence travels per token, aligned like the packed rows
(R rows of width W):
  advantages       [R, W]  the advantage of the sequence the token belongs to
  sequence_tokens  [R, W]  that sequence's loss tokens (>= 1), for the "grpo" loss type's
                           per-sequence mean
  sequences        [R]     completions packed in the row, so the step's totals count the
                           rollout's completions (num_sequences) exactly as unpacked rows do
With those, `grpo_loss` gives the same loss, gradients and metrics as on the unpacked rows
(tests/rl/test_packing.py), and the old/reference log-probs are computed on the packed rows.

Row counts are bucketed: a whole number of `row_multiple` rows (accumulation steps x data
shards, so every micro-batch on every shard has the same rows), that number one of four
steps an octave past eight, capped at `packed_layout`'s rows, so a run compiles a handful
of update programs, each no larger than the unpacked one.
"""

from __future__ import annotations

import numpy as np

from atlas_jax.data.batch import Batch, empty_rows


def pack_groups(lengths: np.ndarray, width: int) -> list[list[int]]:
    """First-fit decreasing: the sequence indices of each packed row (each length <= width)."""
    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    rows, room = [], []
    for i in order:
        n = int(lengths[i])
        slot = next((r for r, left in enumerate(room) if left >= n), None)
        if slot is None:
            rows.append([i])
            room.append(width - n)
        else:
            rows[slot].append(i)
            room[slot] -= n
    return rows


def bucketed_rows(needed: int, most: int, row_multiple: int) -> int:
    """Rows to allocate: `needed` rounded up to row_multiple x (1..8, then four steps an
    octave: 10, 12, 14, 16, 20, 24, ...), at most `most`: a handful of programs, and at most
    a ninth of the rows empty past the first eight."""
    units = -(-needed // row_multiple)
    step = max(1 << max(units - 1, 0).bit_length(), 8) // 8  # 1 up to 8, 2 up to 16, 4 up to 32, ...
    return min(-(-units // step) * step * row_multiple, most)


def packed_layout(rows: int, width: int, row_multiple: int = 1) -> tuple[int, int]:
    """(most rows, row width) of the packed rows for B unpacked rows of width T: (B / 2, 2T)
    where B / 2 is a whole number of row_multiple, else (B, T). The update and its memory
    plan (recipes.teacher_rcl.prepare) are compiled at these shapes; no packing is larger."""
    if rows % row_multiple:
        raise ValueError(f"{rows} rows cannot be split into groups of {row_multiple} (accumulation x data shards)")
    if rows % (2 * row_multiple) == 0:
        return rows // 2, 2 * width
    return rows, width


def pack_rollout(batch: Batch, advantages_B: np.ndarray, *, row_multiple: int = 1, pad_id: int = 0
                 ) -> tuple[Batch, dict[str, np.ndarray]]:
    """(packed batch, per-token extras) from a rollout's host rows (one completion each).

    batch: `rollout.training_batch`'s rows (segment id 1 on real tokens, 0 on padding);
    advantages_B: one per row. The packed rows are at most `packed_layout(B, T, row_multiple)`
    (that many, that wide); where they would hold as many tokens as the B rows, the batch and
    {"advantages": advantages_B} come back unchanged.
    """
    B, T = batch.tokens.shape
    most_rows, W = packed_layout(B, T, row_multiple)
    present_BT = np.asarray(batch.segment_ids) > 0
    lengths_B = present_BT.sum(axis=1)
    loss_tokens_B = np.asarray(batch.loss_mask, np.float32).sum(axis=1)
    groups = pack_groups(lengths_B, W)  # <= most_rows: at width 2T every row but the last holds two or more
    R = bucketed_rows(len(groups), most_rows, row_multiple)
    if R * W >= B * T:  # nothing saved (every completion near its budget): the rows as they are
        return batch, {"advantages": advantages_B}
    out = empty_rows(R, W, pad_id)
    advantages_RT = np.zeros((R, W), np.float32)
    sequence_tokens_RT = np.ones((R, W), np.float32)
    sequences_R = np.zeros((R,), np.float32)
    for r, members in enumerate(groups):
        start = 0
        for segment, b in enumerate(sorted(members), start=1):  # row order inside a packed row
            keep = present_BT[b]
            n = int(lengths_B[b])
            span = slice(start, start + n)
            out.tokens[r, span] = batch.tokens[b][keep]
            out.positions[r, span] = np.arange(n, dtype=np.int32)
            out.segment_ids[r, span] = segment
            out.loss_mask[r, span] = batch.loss_mask[b][keep]
            advantages_RT[r, span] = advantages_B[b]
            sequence_tokens_RT[r, span] = max(loss_tokens_B[b], 1.0)
            start += n
        sequences_R[r] = len(members)
    return out, {"advantages": advantages_RT, "sequence_tokens": sequence_tokens_RT, "sequences": sequences_R}
