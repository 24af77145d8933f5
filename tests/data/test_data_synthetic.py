"""The built-in synthetic generator: deterministic, correct answers, graded, short, tagged."""

import re

from atlas_jax.config import DataConfig
from atlas_jax.data import synthetic
from atlas_jax.data.formatting import render


def _evaluate(step: str) -> tuple[int, int]:
    lhs, rhs = step.split(" = ")
    a, op, b = lhs.split(" ")
    a, b = int(a), int(b)
    value = {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op]
    assert op != "/" or a % b == 0, step
    return value, int(rhs)


def test_deterministic_by_seed_and_prefix_stable():
    assert synthetic.sft_records(20, seed=3) == synthetic.sft_records(20, seed=3)
    assert synthetic.sft_records(10, seed=3) == synthetic.sft_records(20, seed=3)[:10]
    assert synthetic.rl_records(20, seed=3) != synthetic.rl_records(20, seed=4)


def test_answers_follow_from_steps_and_are_graded():
    seen = set()
    for i in range(200):
        p = synthetic.problem(i, seed=1)
        for step in p.steps:
            value, written = _evaluate(step)
            assert value == written, step
        assert int(p.steps[-1].split(" = ")[1]) == p.answer
        assert p.answer >= 0 and p.wrong_answer != p.answer
        assert len(p.steps) == (1 if p.difficulty == 1 else 2)
        seen.add(p.difficulty)
    assert seen == {1, 2, 3, 4}


def test_sft_records_have_schema_tags_and_boxed_answers():
    for i, rec in enumerate(synthetic.sft_records(40, seed=0)):
        assert set(rec) >= {"problem_text", "student_approach", "teacher_diagnosis", "teacher_teaching"}
        boxed = re.findall(r"\\boxed\{(-?\d+)\}", rec["student_approach"])
        assert len(boxed) == 1
        correct = boxed[0] == rec["ground_truth"]
        assert ("correct" in rec["teacher_diagnosis"]) == correct, rec
    rl = synthetic.rl_record(5, seed=0)
    assert rl["ground_truth"] == str(synthetic.problem(5, seed=0).answer)
    assert rl["prompt"] == synthetic.problem(5, seed=0).text


def test_rendered_examples_are_short(tokenizer):
    cfg = DataConfig()
    for rec in synthetic.sft_records(40, seed=0):
        prompt, completion = render(rec, cfg, tokenizer)
        assert "<teaching>" in completion and completion.count("</teaching>") == 1
        n = len(tokenizer(prompt + completion, add_special_tokens=False)["input_ids"])
        assert 100 <= n <= 250, n
