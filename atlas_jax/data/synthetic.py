"""Built-in synthetic math: arithmetic word problems, teaching traces and RL prompts.

Every recipe must run offline, so this module stands in for Arc-ATLAS-Teach and gsm8k.
Example `i` of seed `s` depends only on (s, i) — a run with 100 examples sees the first
100 of a run with 2000. Difficulty grows from one operation (1) to three steps with
multiplication and division (4). Texts are short and templated on purpose: a 1M-parameter
model has to learn the format within ~100 SFT steps on a CPU.

Teaching records follow the Arc-ATLAS-Teach SFT schema (`problem_text`, `student_approach`,
`teacher_diagnosis`, `teacher_teaching`); student answers end in `\\boxed{N}`.
"""

from __future__ import annotations

import dataclasses
import random

NAMES = ("Ana", "Ben", "Cara", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jun", "Kim", "Leo")
ITEMS = ("apples", "pens", "stickers", "marbles", "cards", "shells", "books", "coins", "eggs", "beads")
DIFFICULTIES = (1, 2, 3, 4)

# Share of students who already get it right; the rest make one of the mistakes below.
P_STUDENT_CORRECT = 0.3


@dataclasses.dataclass(frozen=True)
class Problem:
    """One word problem: its text, the integer answer, and the worked steps."""

    text: str
    answer: int
    difficulty: int
    steps: tuple[str, ...]  # e.g. ("7 + 5 = 12",), the correct computation in order
    wrong_answer: int  # what a typical mistake gives
    mistake: str  # the diagnosis of that mistake
    hint: str  # the guidance that fixes it


def _rng(seed: int, index: int) -> random.Random:
    # Integer seeding of random.Random is stable across Python versions and platforms.
    return random.Random(seed * 1_000_003 + index)


def _one_step(r: random.Random, name: str, item: str) -> Problem:
    a, b = r.randint(2, 30), r.randint(2, 20)
    if r.random() < 0.5:
        return Problem(
            f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?",
            a + b, 1, (f"{a} + {b} = {a + b}",), a - b if a > b else b - a,
            "The student subtracted, but getting more makes the count go up.",
            f"Getting more means adding: start from {a} and add {b}.",
        )
    a = a + b  # keep the result positive
    return Problem(
        f"{name} has {a} {item} and gives away {b}. How many {item} are left?",
        a - b, 1, (f"{a} - {b} = {a - b}",), a + b,
        "The student added, but giving away makes the count go down.",
        f"Giving away means subtracting: take {b} from {a}.",
    )


def _two_step(r: random.Random, name: str, item: str) -> Problem:
    a, b, c = r.randint(5, 40), r.randint(2, 20), r.randint(1, 10)
    total = a + b
    return Problem(
        f"{name} has {a} {item}, buys {b} more, then loses {c}. How many {item} are left?",
        total - c, 2, (f"{a} + {b} = {total}", f"{total} - {c} = {total - c}"), total,
        f"The student stopped after the first step and forgot to take away the {c} lost {item}.",
        f"There are two steps: first add {a} and {b}, then subtract the {c} that were lost.",
    )


def _multiply(r: random.Random, name: str, item: str) -> Problem:
    boxes, per_box, loose = r.randint(2, 9), r.randint(3, 12), r.randint(1, 9)  # 2 x 2 = 2 + 2
    inside = boxes * per_box
    return Problem(
        f"{name} has {boxes} boxes with {per_box} {item} in each box and {loose} loose {item}. "
        f"How many {item} does {name} have in total?",
        inside + loose, 3, (f"{boxes} * {per_box} = {inside}", f"{inside} + {loose} = {inside + loose}"),
        boxes + per_box + loose,
        "The student added the number of boxes to the items per box instead of multiplying.",
        f"Equal groups mean multiplying: {boxes} boxes times {per_box} each, then add the {loose} loose ones.",
    )


def _divide(r: random.Random, name: str, item: str) -> Problem:
    friends, each, eaten = r.randint(2, 8), r.randint(3, 12), r.randint(1, 2)
    total = friends * each
    return Problem(
        f"{name} shares {total} {item} equally among {friends} friends. Each friend then uses {eaten}. "
        f"How many {item} does each friend have left?",
        each - eaten, 4, (f"{total} / {friends} = {each}", f"{each} - {eaten} = {each - eaten}"),
        total - friends * eaten,
        "The student worked with the whole pile instead of one friend's share.",
        f"First find one share: divide {total} by {friends}. Then subtract the {eaten} used from that share.",
    )


_BUILDERS = {1: _one_step, 2: _two_step, 3: _multiply, 4: _divide}


def problem(index: int, seed: int = 0) -> Problem:
    """The index-th problem of a seed; difficulty cycles 1..4 so every slice is graded."""
    r = _rng(seed, index)
    difficulty = DIFFICULTIES[index % len(DIFFICULTIES)]
    return _BUILDERS[difficulty](r, r.choice(NAMES), r.choice(ITEMS))


def _student_approach(p: Problem, correct: bool) -> str:
    if correct:
        return " ".join(f"{s}." for s in p.steps) + f" \\boxed{{{p.answer}}}"
    return f"I think the answer is {p.wrong_answer}. \\boxed{{{p.wrong_answer}}}"


def sft_record(index: int, seed: int = 0) -> dict:
    """One teaching trace in the Arc-ATLAS-Teach SFT schema (plus answer and difficulty)."""
    p = problem(index, seed)
    correct = _rng(seed + 7919, index).random() < P_STUDENT_CORRECT
    if correct:
        diagnosis = "The student's method and answer are correct."
        teaching = "Your steps are right. Keep the same method."
    else:
        diagnosis, teaching = p.mistake, p.hint
    return {
        "problem_text": p.text,
        "student_approach": _student_approach(p, correct),
        "teacher_diagnosis": diagnosis,
        "teacher_teaching": teaching,
        "ground_truth": str(p.answer),
        "difficulty": p.difficulty,
    }


def rl_record(index: int, seed: int = 0) -> dict:
    """One RL prompt with its integer ground truth (as text, like the hub datasets)."""
    p = problem(index, seed)
    return {"prompt": p.text, "ground_truth": str(p.answer), "difficulty": p.difficulty}


def sft_records(n: int, seed: int = 0) -> list[dict]:
    return [sft_record(i, seed) for i in range(n)]


def rl_records(n: int, seed: int = 0) -> list[dict]:
    return [rl_record(i, seed) for i in range(n)]
