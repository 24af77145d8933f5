"""The teaching world (data/synthetic.py): its traces say what the world promises, and a
student trained on them by the framework is helped by the right hint and misled by a wrong one."""

from __future__ import annotations

import collections
import pathlib
import random

import numpy as np
import pytest

from atlas_jax.config import compose
from atlas_jax.data import synthetic
from atlas_jax.data.formatting import TEACHING_USER_TEMPLATE
from atlas_jax.models import from_pretrained, load_tokenizer
from atlas_jax.rl import rollout
from atlas_jax.rl.answers import score_responses
from tests import cli

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_the_rollout_prompts_are_the_ones_the_traces_use():
    reward = compose(["+run=teacher_rcl", "+quickstart=rcl"]).reward
    assert reward.probe_template == synthetic.WORLD_PROBE
    assert reward.student_baseline_template == synthetic.WORLD_BASELINE
    assert reward.student_with_teaching_template == synthetic.WORLD_WITH_TEACHING
    assert reward.teacher_template == TEACHING_USER_TEMPLATE  # what teacher SFT formats


def test_student_traces_add_alone_and_follow_the_named_operation():
    rows = synthetic.world_student_records(200, seed=5)
    problems = [synthetic.world_problem(i, 5) for i in range(200)]
    for i, p in enumerate(problems):
        plan, alone, *guided = rows[4 * i: 4 * i + 4]
        assert plan["completion"] == f"I will add {p.a} and {p.b}."
        assert alone["completion"].endswith(f"\\boxed{{{p.a + p.b}}}")
        for row in guided:
            hint = row["prompt"].split("\nHint: ")[1]
            assert row["completion"].endswith(f"\\boxed{{{p.result(synthetic.world_student_op(hint))}}}")
    # the world's answer is the operation the wording names
    assert {p.op: p.answer == p.result(p.op) for p in problems} == {op: True for op in synthetic.WORLD_OPS}


def test_teacher_traces_mix_hint_kinds_per_operation_as_configured():
    rows = synthetic.world_teacher_records(3000, seed=1)
    kinds = collections.defaultdict(collections.Counter)
    for i, row in enumerate(rows):
        p = synthetic.world_problem(i, 1)
        hint = row["teacher_teaching"]
        named = synthetic.world_student_op(hint) if any(op in hint.lower() for op in synthetic.WORLD_OPS) else None
        kind = ("vague" if named is None and hint != "Your plan is right." else
                "right_plan" if named is None else "wrong" if named != p.op else
                "long" if hint.startswith("The words") else "short")
        kinds[p.op][kind] += 1
    for op, table in synthetic.WORLD_TEACHER_HINTS.items():
        total = sum(kinds[op].values())
        for kind, share in table:
            assert abs(kinds[op][kind] / total - share) < 0.06, (op, kind, kinds[op])
    # the imperfection RL is there to fix: on multiplying problems vague hints lead
    assert kinds["multiply"].most_common(1)[0][0] == "vague"


@pytest.fixture(scope="module")
def trained_student(tmp_path_factory):
    """The quickstart's student, trained by the framework's SFT on the world's traces
    (configs/quickstart/student.yaml as it is), run as a user runs it. With 200 steps its
    arithmetic was so rough that whether the right hint's gain reached 0.25 depended on float
    rounding. A `python main.py` child (tests/cli.py run_main), so its 300 steps compile with
    XLA's defaults (tests/cli.py)."""
    out = tmp_path_factory.mktemp("student")
    overrides = ["+run=teacher_sft", "+quickstart=student", "trainer.report_to=[]", f"output_dir={out}"]
    done = cli.run_main(overrides, cwd=ROOT, env_extra={"XLA_FLAGS": cli.xla_flags(1, long_run=True)}, timeout=1200)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return from_pretrained(str(out / "hf")), load_tokenizer(compose(overrides).model)


def test_the_right_hint_helps_the_student_and_a_wrong_one_misleads_it(trained_student):
    model, tokenizer = trained_student
    problems = [synthetic.world_problem(i, seed=9) for i in range(48)]  # a seed no trace came from
    truth = [str(p.answer) for p in problems]
    r = random.Random(0)

    def accuracy(prompts):
        out = rollout.sample(model, tokenizer, prompts, max_prompt_length=128, max_new_tokens=24)
        return score_responses(out.texts, truth)

    alone = accuracy([synthetic.WORLD_BASELINE.format(problem=p.text) for p in problems])
    with_hint = {kind: accuracy([synthetic.WORLD_WITH_TEACHING.format(problem=p.text,
                                                                       teaching=synthetic.world_hint(p, kind, r))
                                 for p in problems]) for kind in ("short", "vague", "wrong")}
    adds = np.asarray([p.op == "add" for p in problems])
    assert alone[~adds].mean() < 0.2 < 0.45 < alone[adds].mean()  # right alone on the adding minority
    assert with_hint["short"].mean() >= alone.mean() + 0.25
    assert abs(with_hint["vague"].mean() - alone.mean()) <= 0.1  # a vague hint changes nothing
    assert with_hint["wrong"][adds].mean() <= alone[adds].mean() - 0.4  # led astray
