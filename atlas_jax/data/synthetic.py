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


# --- The teaching world -------------------------------------------------------------
# A world small enough to SEE adaptive teaching work on a CPU (the quickstart). One-step
# problems with single-digit numbers whose operation is told by the wording: "gets more"
# adds, "gives away" subtracts, "bags with N in each" multiplies. Its student (trained on
# `world_student_records`) always plans to add: alone it is right on the adding problems
# only, a minority; given guidance it does the operation the guidance names, so a hint
# that names the right one fixes it and a hint that names a wrong one leads it astray.
# Its teacher's traces (`world_teacher_records`) are imperfect on purpose: vague, wrong
# and long-winded hints are mixed in, most of all on the multiplying problems, so a
# teacher trained on them helps less than it could and RL has something to find.
# Prompt texts are the ones configs/reward/teaching_world.yaml gives the rollout.

WORLD_OPS = ("add", "subtract", "multiply")
WORLD_OP_SHARES = (0.3, 0.35, 0.35)  # the student alone is right on adding problems: ~30%
WORLD_PROBE = "How will you solve this? {problem}"
WORLD_BASELINE = "Solve: {problem}"
WORLD_WITH_TEACHING = "Solve: {problem}\nHint: {teaching}"
_SYMBOL = {"add": "+", "subtract": "-", "multiply": "*"}
_VAGUE = "Read the problem again and think about what it asks."
_RIGHT_PLAN = "Your plan is right."
# Hint kinds of the teacher's traces per operation: (kind, share); "wrong" names another op.
WORLD_TEACHER_HINTS = {
    "add": (("right_plan", 0.5), ("vague", 0.2), ("long", 0.15), ("wrong", 0.15)),
    "subtract": (("short", 0.45), ("vague", 0.25), ("long", 0.15), ("wrong", 0.15)),
    "multiply": (("vague", 0.45), ("short", 0.25), ("long", 0.15), ("wrong", 0.15)),
}
# Hints a student's traces pair problems with: each kind on every operation.
WORLD_STUDENT_HINTS = (("short", 0.3), ("right_plan", 0.1), ("vague", 0.15), ("wrong", 0.3), ("long", 0.15))


@dataclasses.dataclass(frozen=True)
class WorldProblem:
    text: str
    op: str
    a: int
    b: int

    def result(self, op: str) -> int:
        """What doing `op` on the two numbers gives (subtracting the smaller from the larger)."""
        hi, lo = max(self.a, self.b), min(self.a, self.b)
        return {"add": self.a + self.b, "subtract": hi - lo, "multiply": self.a * self.b}[op]

    @property
    def answer(self) -> int:
        return self.result(self.op)


def world_problem(index: int, seed: int = 0) -> WorldProblem:
    r = _rng(seed + 104_729, index)
    name, item = r.choice(NAMES), r.choice(ITEMS)
    op = r.choices(WORLD_OPS, WORLD_OP_SHARES)[0]
    # numbers 2..7 whatever the operation: 108 facts (3 ops x 36 pairs) for a student of
    # 1M parameters to learn in minutes, whichever operation a hint names
    if op == "add":
        a, b = r.randint(2, 7), r.randint(2, 7)
        text = f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?"
    elif op == "subtract":
        a = r.randint(3, 7)
        b = r.randint(2, a - 1)
        text = f"{name} has {a} {item} and gives away {b}. How many {item} are left?"
    else:
        a, b = r.randint(2, 7), r.randint(2, 7)
        text = f"{name} has {a} bags with {b} {item} in each bag. How many {item} does {name} have?"
    return WorldProblem(text, op, a, b)


def _op_hint(p: WorldProblem, op: str) -> str:
    hi, lo = max(p.a, p.b), min(p.a, p.b)
    return {"add": f"Add {p.a} and {p.b}.", "subtract": f"Subtract {lo} from {hi}.",
            "multiply": f"Multiply {p.a} by {p.b}."}[op]


def world_hint(p: WorldProblem, kind: str, r: random.Random) -> str:
    """A hint of one kind: short (names the right op), right_plan, vague, long (the right op
    at length) or wrong (names another op)."""
    if kind == "short":
        return _op_hint(p, p.op)
    if kind == "right_plan":
        return _RIGHT_PLAN if p.op == "add" else _op_hint(p, p.op)
    if kind == "vague":
        return _VAGUE
    if kind == "long":
        return f"The words tell you which operation to use. {_op_hint(p, p.op)} Then check the result."
    return _op_hint(p, r.choice([op for op in WORLD_OPS if op != p.op]))


def _kind(r: random.Random, table) -> str:
    kinds, shares = zip(*table)
    return r.choices(kinds, shares)[0]


def world_student_op(hint: str) -> str:
    """The operation the world's student does: the first one the hint names, else adding."""
    words = hint.lower()
    named = [(words.find(op), op) for op in WORLD_OPS if op in words]
    return min(named)[1] if named else "add"


def _solution(p: WorldProblem, op: str) -> str:
    hi, lo = (max(p.a, p.b), min(p.a, p.b)) if op == "subtract" else (p.a, p.b)
    value = p.result(op)
    return f"{hi} {_SYMBOL[op]} {lo} = {value}. \\boxed{{{value}}}"


def world_student_plan(p: WorldProblem) -> str:
    return f"I will add {p.a} and {p.b}."


def world_student_records(n: int, seed: int = 0) -> list[dict]:
    """Prompt/completion traces of the world's student, four per problem: its plan, its
    solution alone, and two solutions following a hint."""
    rows = []
    for i in range(n):
        p, r = world_problem(i, seed), _rng(seed + 15_485_863, i)
        rows.append({"prompt": WORLD_PROBE.format(problem=p.text), "completion": world_student_plan(p)})
        rows.append({"prompt": WORLD_BASELINE.format(problem=p.text), "completion": _solution(p, "add")})
        for _ in range(2):
            hint = world_hint(p, _kind(r, WORLD_STUDENT_HINTS), r)
            rows.append({"prompt": WORLD_WITH_TEACHING.format(problem=p.text, teaching=hint),
                         "completion": _solution(p, world_student_op(hint))})
    return rows


def world_teacher_records(n: int, seed: int = 0) -> list[dict]:
    """Teaching traces (the Arc-ATLAS-Teach schema) with the imperfect hint mix."""
    rows = []
    for i in range(n):
        p, r = world_problem(i, seed), _rng(seed + 32_452_843, i)
        rows.append({"problem_text": p.text, "student_approach": world_student_plan(p), "teacher_diagnosis": "",
                     "teacher_teaching": world_hint(p, _kind(r, WORLD_TEACHER_HINTS[p.op]), r),
                     "ground_truth": str(p.answer)})
    return rows


def world_rl_records(n: int, seed: int = 0) -> list[dict]:
    return [{"prompt": p.text, "ground_truth": str(p.answer), "op": p.op}
            for p in (world_problem(i, seed) for i in range(n))]
