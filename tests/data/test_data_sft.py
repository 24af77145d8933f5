"""SFT pipeline: masks, lengths, packing, determinism, exact resume, bad rows."""

import dataclasses
import logging

import numpy as np
import pytest

from atlas_jax.data import DataError, sft_batches, sft_num_examples
from atlas_jax.data.formatting import render
from atlas_jax.data.sft import prepare, row_length


def _take(it, n):
    return [next(it) for _ in range(n)]


def _same(a, b):
    return all(np.array_equal(x, y) for x, y in zip(dataclasses.astuple(a), dataclasses.astuple(b)))


def _check_row_invariants(batch, max_length):
    seg_BT, pos_BT, mask_BT = batch.segment_ids, batch.positions, batch.loss_mask
    assert batch.tokens.dtype == np.int32 and pos_BT.dtype == np.int32 and seg_BT.dtype == np.int32
    assert mask_BT.dtype == np.float32
    assert ((seg_BT > 0).sum(axis=1) <= max_length).all()
    assert (mask_BT[seg_BT == 0] == 0).all(), "padding carries loss"
    first_B_T = np.concatenate([np.ones_like(seg_BT[:, :1], bool), seg_BT[:, 1:] != seg_BT[:, :-1]], axis=1)
    assert (mask_BT[first_B_T] == 0).all(), "the first token of a segment carries loss"
    # Positions count up from 0 inside every segment.
    for seg_T, pos_T in zip(seg_BT, pos_BT):
        for s in set(seg_T.tolist()) - {0}:
            np.testing.assert_array_equal(pos_T[seg_T == s], np.arange((seg_T == s).sum()))


def test_mask_covers_exactly_the_assistant_turn(sft_cfg, tokenizer):
    batch = next(sft_batches(sft_cfg, tokenizer, split="train", batch_size=4, seed=0))
    assert batch.tokens.shape == (4, row_length(sft_cfg)) == (4, 256)
    _check_row_invariants(batch, sft_cfg.max_length)
    for tokens_T, mask_T in zip(batch.tokens, batch.loss_mask):
        target = tokenizer.decode(tokens_T[mask_T > 0])
        whole = tokenizer.decode(tokens_T[tokens_T != tokenizer.pad_token_id])
        assistant = whole.split("<|im_start|>assistant\n")[1]
        assert target == assistant.removesuffix("\n")  # trailing template newline is not a target
        assert target.endswith("</teaching><|im_end|>") and "<|im_start|>" not in target


def test_full_sequence_loss_when_not_completion_only(sft_cfg, tokenizer):
    cfg = dataclasses.replace(sft_cfg, completion_only_loss=False)
    ex = prepare(cfg, tokenizer, "train")
    mask_T = ex.loss_mask[0]
    assert mask_T[0] == 0 and mask_T[1:].sum() >= len(mask_T) - 2


def test_length_policies_are_counted(sft_cfg, tokenizer):
    full = prepare(sft_cfg, tokenizer, "train")
    limit = int(np.median([len(t) for t in full.tokens]))
    longer = sum(len(t) > limit for t in full.tokens)
    trunc = prepare(dataclasses.replace(sft_cfg, max_length=limit), tokenizer, "train")
    assert trunc.report.truncated == longer and len(trunc) == len(full)
    assert max(len(t) for t in trunc.tokens) == limit
    dropped = prepare(dataclasses.replace(sft_cfg, max_length=limit, truncation="drop"), tokenizer, "train")
    assert dropped.report.dropped_long == longer and len(dropped) == len(full) - longer
    # A window the prompt alone fills leaves nothing to learn: dropped even when truncating.
    tiny = prepare(dataclasses.replace(sft_cfg, max_length=40), tokenizer, "train")
    assert len(tiny) == 0 and tiny.report.dropped_long == len(full)


@pytest.mark.parametrize("strategy", ["first_fit", "best_fit"])
def test_packing_rows_hold_whole_examples(sft_cfg, tokenizer, strategy):
    cfg = dataclasses.replace(sft_cfg, max_length=512, packing=True, packing_strategy=strategy, packing_bins=4)
    batches = _take(sft_batches(cfg, tokenizer, split="train", batch_size=4, seed=0), 3)
    assert batches[0].tokens.shape == (4, 512)
    n_segments = 0
    for batch in batches:
        _check_row_invariants(batch, 512)
        n_segments += int(batch.segment_ids.max(axis=1).sum())
    assert n_segments > len(batches) * 4, "packing never put two examples in a row"
    # Each packed segment is exactly one tokenized example.
    ex = prepare(cfg, tokenizer, "train")
    known = {tuple(t.tolist()) for t in ex.tokens}
    seg_T, tok_T = batches[0].segment_ids[0], batches[0].tokens[0]
    for s in range(1, seg_T.max() + 1):
        assert tuple(tok_T[seg_T == s].tolist()) in known


def test_pad_to_multiple_of(sft_cfg, tokenizer):
    cfg = dataclasses.replace(sft_cfg, max_length=200, pad_to_multiple_of=64)
    assert next(sft_batches(cfg, tokenizer, split="train", batch_size=2, seed=0)).tokens.shape == (2, 256)


@pytest.mark.parametrize("packing", [False, True])
def test_same_seed_same_batches_and_exact_resume(sft_cfg, tokenizer, packing):
    cfg = dataclasses.replace(sft_cfg, packing=packing, max_length=512, packing_bins=3)
    make = lambda seed: sft_batches(cfg, tokenizer, split="train", batch_size=4, seed=seed)  # noqa: E731
    a, b = _take(make(0), 5), _take(make(0), 5)
    assert all(_same(x, y) for x, y in zip(a, b))
    assert not _same(a[0], _take(make(1), 1)[0])
    it = make(0)
    _take(it, 2)
    state = it.get_state()
    resumed = make(0)
    resumed.set_state(state)
    assert all(_same(x, y) for x, y in zip(_take(resumed, 3), a[2:5]))


def test_finite_epochs_cover_every_example_once(sft_cfg, tokenizer):
    n = sft_num_examples(sft_cfg, tokenizer, split="train")
    batches = list(sft_batches(sft_cfg, tokenizer, split="train", batch_size=5, seed=0, num_epochs=1))
    assert len(batches) == -(-n // 5)
    rows = [tuple(t[s > 0].tolist()) for b in batches for t, s in zip(b.tokens, b.segment_ids) if s.any()]
    assert len(rows) == n == len(set(rows))
    assert batches[-1].tokens.shape == batches[0].tokens.shape  # short final batch padded


def test_eval_split_is_disjoint_seeded_and_sized(sft_cfg, tokenizer):
    train = {tuple(t.tolist()) for t in prepare(sft_cfg, tokenizer, "train").tokens}
    evals = {tuple(t.tolist()) for t in prepare(sft_cfg, tokenizer, "eval").tokens}
    assert len(evals) == 8 and len(train) == 56 and not train & evals
    other = dataclasses.replace(sft_cfg, split_seed=1)
    assert {tuple(t.tolist()) for t in prepare(other, tokenizer, "eval").tokens} != evals
    capped = dataclasses.replace(sft_cfg, max_train_samples=10)
    assert sft_num_examples(capped, tokenizer, split="train") == 10


@pytest.mark.parametrize("packing", [False, True])
def test_process_shares_are_disjoint_and_cover(sft_cfg, tokenizer, packing):
    cfg = dataclasses.replace(sft_cfg, packing=packing, max_length=512)
    seen, num_batches = [], []
    for p in range(3):
        it = sft_batches(cfg, tokenizer, split="train", batch_size=6, seed=0, num_epochs=1,
                         process_index=p, process_count=3)
        rows = []
        batches = list(it)
        num_batches.append(len(batches))
        for batch in batches:
            assert batch.tokens.shape[0] == 2
            for tok_T, seg_T in zip(batch.tokens, batch.segment_ids):
                rows += [tuple(tok_T[seg_T == s].tolist()) for s in range(1, seg_T.max() + 1)]
        seen.append(rows)
    flat = [r for rows in seen for r in rows]
    assert len(flat) == len(set(flat)) == sft_num_examples(cfg, tokenizer, split="train") == 56
    if not packing:  # 56 examples over 3 processes: 19/19/18, yet every process stops together
        assert len(set(num_batches)) == 1
    with pytest.raises(ValueError, match="batch_size=7 is not divisible by process_count=3"):
        sft_batches(cfg, tokenizer, split="train", batch_size=7, seed=0, process_index=0, process_count=3)


def test_local_jsonl_with_malformed_rows(tmp_path, sft_cfg, tokenizer, write_jsonl, caplog):
    from atlas_jax.data import synthetic

    good = synthetic.sft_records(40, seed=5)
    bad = [
        "{not json",
        b"\xff\xfe bytes",
        {"problem_text": "What is 2 + 2?"},  # no teaching
        {**good[0], "teacher_teaching": "  "},
        {**good[1], "problem_text": 7},
        "[1, 2]",
    ]
    path = write_jsonl(tmp_path / "sft.jsonl", good[:20] + bad + good[20:])
    cfg = dataclasses.replace(sft_cfg, dataset_id_or_path=str(path), eval_split_ratio=0.0, max_bad_fraction=0.2)
    with caplog.at_level(logging.INFO, logger="atlas_jax.data"):
        ex = prepare(cfg, tokenizer, "train")
    assert len(ex) == 40 and ex.report.num_bad == 6 and ex.report.total == 46
    assert ex.report.bad["undecodable line"] == 2
    assert ex.report.bad["missing field 'teacher_teaching'"] == 1
    lines = [r.getMessage() for r in caplog.records if "sft.jsonl" in r.getMessage()]
    assert len(lines) == 1 and "skipped 6 bad" in lines[0]
    expected = render(good[0], cfg, tokenizer)
    assert tokenizer.decode(ex.tokens[0]) == "".join(expected)
    assert next(sft_batches(cfg, tokenizer, split="train", batch_size=4, seed=0)).tokens.shape == (4, 256)
    strict = dataclasses.replace(cfg, max_bad_fraction=0.05)
    with pytest.raises(DataError, match=r"sft\.jsonl: 13\.0% of rows are bad \(6/46"):
        prepare(strict, tokenizer, "train")


def test_prompt_completion_schema_from_parquet(tmp_path, sft_cfg, tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = {"question": [f"What is {i} + 1?" for i in range(10)], "reply": [f"\\boxed{{{i + 1}}}" for i in range(10)]}
    pq.write_table(pa.table(rows), tmp_path / "qa.parquet")
    cfg = dataclasses.replace(sft_cfg, dataset_id_or_path=str(tmp_path / "qa.parquet"), format="prompt_completion",
                              prompt_field="question", completion_field="reply", eval_split_ratio=0.0)
    ex = prepare(cfg, tokenizer, "train")
    assert len(ex) == 10
    text = tokenizer.decode(ex.tokens[3])
    assert text.startswith("<|im_start|>user\nWhat is 3 + 1?") and "system" not in text
    assert tokenizer.decode(ex.tokens[3][ex.loss_mask[3] > 0]) == "\\boxed{4}<|im_end|>"


def test_hub_source_goes_through_datasets(monkeypatch, sft_cfg, tokenizer):
    import datasets

    from atlas_jax.data import synthetic

    calls = []

    def fake_load(path, name=None, data_files=None, split=None):
        calls.append((path, name, data_files, split))
        return synthetic.sft_records(12, seed=9)

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    cfg = dataclasses.replace(sft_cfg, name="arc_atlas_sft", dataset_id_or_path="Arc-Intelligence/Arc-ATLAS-Teach-v0",
                              data_files="training/sft.jsonl", eval_split_ratio=0.0)
    assert sft_num_examples(cfg, tokenizer, split="train") == 12
    assert calls == [("Arc-Intelligence/Arc-ATLAS-Teach-v0", None, "training/sft.jsonl", "train")]


def test_missing_local_file_names_it(tmp_path, sft_cfg, tokenizer):
    cfg = dataclasses.replace(sft_cfg, dataset_id_or_path=str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match="nope.jsonl"):
        prepare(cfg, tokenizer, "train")
