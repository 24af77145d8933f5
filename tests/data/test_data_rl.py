"""RL prompt pipeline: field mapping, gsm8k answers, bad rows, batching, resume, shares."""

import dataclasses

import pytest

from atlas_jax.config import DataConfig
from atlas_jax.data import DataError, rl_batches, rl_num_examples
from atlas_jax.data.rl import prepare
from atlas_jax.data.sources import final_answer


def test_synthetic_records_and_batches(rl_cfg):
    it = rl_batches(rl_cfg, split="train", batch_size=8, seed=0)
    batch = next(it)
    assert isinstance(batch, list) and len(batch) == 8
    for rec in batch:
        assert rec["prompt"].endswith("?") and int(rec["ground_truth"]) >= 0
    assert rl_num_examples(rl_cfg, split="train") == 40 and rl_num_examples(rl_cfg, split="eval") == 10


def test_train_drops_short_batch_eval_keeps_it(rl_cfg):
    train = list(rl_batches(rl_cfg, split="train", batch_size=16, seed=0, num_epochs=1))
    assert [len(b) for b in train] == [16, 16]
    evals = list(rl_batches(rl_cfg, split="eval", batch_size=4, seed=0, num_epochs=1))
    assert [len(b) for b in evals] == [4, 4, 2]
    assert len({r["prompt"] for b in evals for r in b}) == 10


def test_resume_and_determinism(rl_cfg):
    make = lambda: rl_batches(rl_cfg, split="train", batch_size=4, seed=3)  # noqa: E731
    reference = next(make())
    it = make()
    first = [next(it) for _ in range(15)]  # crosses the epoch boundary (10 batches/epoch)
    assert first[0] == reference
    it2 = make()
    for _ in range(7):
        next(it2)
    state = it2.get_state()
    resumed = make()
    resumed.set_state(state)
    assert [next(resumed) for _ in range(8)] == first[7:15]
    epoch0 = [r["prompt"] for b in first[:10] for r in b]
    epoch1 = [r["prompt"] for b in first[10:15] for r in b]
    assert sorted(epoch0) == sorted(r["prompt"] for r in prepare(rl_cfg, "train")[0])
    assert epoch1 != epoch0[: len(epoch1)], "every epoch should be reshuffled"


def test_process_shares_are_disjoint_cover_and_end_together(rl_cfg):
    batches = [
        list(rl_batches(rl_cfg, split="eval", batch_size=3, seed=0, num_epochs=1, process_index=p, process_count=3))
        for p in range(3)
    ]
    assert [len(b) for b in batches] == [4, 4, 4]  # 10 prompts: shares of 4, 3, 3
    shares = [[r["prompt"] for batch in per_process for r in batch] for per_process in batches]
    assert sum(len(s) for s in shares) == len(set().union(*shares)) == 10
    assert set().union(*shares) == {r["prompt"] for r in prepare(rl_cfg, "eval")[0]}


@pytest.mark.parametrize(
    "raw, expected",
    [("She has 3 + 4 = 7 left.\n#### 7", "7"), ("... #### 1,234", "1234"), ("#### -5", "-5"), ("x\n#### $12", "12")],
)
def test_gsm8k_final_answer(raw, expected):
    assert final_answer(raw, "gsm8k", "answer") == expected


def test_gsm8k_style_local_file_with_bad_rows(tmp_path, write_jsonl):
    rows = [{"question": f"What is {i} times 2?", "answer": f"{i} * 2 = {2 * i}\n#### {2 * i}"} for i in range(30)]
    rows += [
        {"question": "No marker?", "answer": "just words"},
        {"question": "Empty answer?", "answer": "#### "},
        {"question": "", "answer": "#### 3"},
        {"question": "Wrong type?", "answer": ["3"]},
        "{broken",
    ]
    path = write_jsonl(tmp_path / "gsm.jsonl", rows)
    cfg = DataConfig(
        name="gsm8k_rl", kind="rl", dataset_id_or_path=str(path), prompt_field="question", answer_field="answer",
        answer_format="gsm8k", eval_split_ratio=0.0, max_bad_fraction=0.2,
    )
    records, report = prepare(cfg, "train")
    assert len(records) == 30 and report.num_bad == 5
    assert records[4]["prompt"] == "What is 4 times 2?" and records[4]["ground_truth"] == "8"
    with pytest.raises(DataError, match=r"gsm\.jsonl: 14\.3% of rows are bad"):
        prepare(dataclasses.replace(cfg, max_bad_fraction=0.1), "train")


def test_numeric_ground_truth_and_extra_fields_kept(tmp_path, rl_cfg, write_jsonl):
    path = write_jsonl(tmp_path / "rl.jsonl", [{"prompt": "Two plus two?", "ground_truth": 4, "id": "a1"}])
    cfg = dataclasses.replace(rl_cfg, dataset_id_or_path=str(path), eval_split_ratio=0.0)
    assert prepare(cfg, "train")[0] == [{"id": "a1", "prompt": "Two plus two?", "ground_truth": "4"}]


def test_named_eval_split_and_offline_hub_error(monkeypatch, rl_cfg):
    import datasets

    splits = []

    def fake_load(path, name=None, data_files=None, split=None):
        splits.append((name, split))
        if split == "test":
            return [{"question": "1 + 1?", "answer": "#### 2"}]
        raise ConnectionError("offline\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    cfg = dataclasses.replace(rl_cfg, name="gsm8k_rl", dataset_id_or_path="openai/gsm8k", dataset_config="main",
                              eval_split="test", prompt_field="question", answer_field="answer",
                              answer_format="gsm8k")
    assert prepare(cfg, "eval")[0][0]["ground_truth"] == "2"
    with pytest.raises(DataError, match=r"^data.dataset_id_or_path='openai/gsm8k' .*ConnectionError: offline$"):
        prepare(cfg, "train")
    assert splits == [("main", "test"), ("main", "train")]
