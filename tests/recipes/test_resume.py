"""Exact resume of RCL and plain GRPO at any aggregation x iterations step.

One rollout serves generation_aggregation_steps x num_iterations updates; a checkpoint that
falls inside it carries the updates left (rl/updates.py). Each case resumes, in a new
output_dir, the straight run's own checkpoint from inside a rollout and compares the steps
it makes with the straight run's: every logged step's loss, grad norm, KL, rewards, and the
whole saved state (params, optimizer, reference, RNG) at the end.
A real SIGTERM mid-rollout and a SIGKILL after a save (`python main.py` in a subprocess, on
the 8 simulated devices the test session has: XLA:CPU's numerics depend on how many devices
the process sees, so the reference run is made on the same 8) must resume to the same
numbers too.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from atlas_jax import parallel
from atlas_jax.config import compose
from atlas_jax.recipes import teacher_rcl

ROOT = pathlib.Path(__file__).resolve().parents[2]
DEVICES = 8  # tests/conftest.py's simulated devices: what `python main.py` children see too
TINY = ["model=tiny", "data=synthetic_math_rl", "trainer.num_generations=4", "batch.micro_batch_size=-1",
        "trainer.max_prompt_length=128", "trainer.max_completion_length=8",
        "reward.max_probe_tokens=8", "data.eval_split_ratio=0", "trainer.save_steps=1", "trainer.save_total_limit=0",
        "trainer.logging_steps=1", "trainer.learning_rate=1e-2", "trainer.report_to=[]",
        "trainer.save_completions_probability=1.0"]
RUNS = {"rcl": ["+run=teacher_rcl", "trainer.student_model=tiny", "trainer.ref_model_sync_steps=1"],
        "grpo": ["+run=grpo"]}
COMPARED = ("loss", "grad_norm", "kl", "reward", "reward_std", "learning_rate", "frac_reward_zero_std",
            "clip_ratio/region", "entropy", "num_tokens", "student_accuracy", "accuracy")
# Every (run, aggregation, iterations) corner, stopped mid-rollout in-process (on the
# rollout's end when it serves one update). The signal test below adds SIGTERM and SIGKILL
# for plain GRPO 2 x 2: its rollouts differ from RCL's while its updates are the same code.
CASES = [(run, agg, iters) for run in ("rcl", "grpo") for agg in (1, 2) for iters in (1, 2)]


def _overrides(run: str, agg: int, iters: int, out, steps: int, batch: int = 0) -> list[str]:
    """batch 0: 8 completions per rollout (2 prompts x G=4) whatever the aggregation, so every
    case samples with the same shapes and compiles them once."""
    return [*RUNS[run], *TINY, f"batch.global_batch_size={batch or 8 // agg}",
            f"trainer.generation_aggregation_steps={agg}", f"trainer.num_iterations={iters}",
            f"trainer.max_steps={steps}", f"output_dir={out}"]


def _plan(agg: int, iters: int) -> tuple[int, int]:
    """(k, N): stop one update before the first rollout's end (on it when it has one update),
    then run into the second rollout."""
    per_rollout = agg * iters
    return max(per_rollout - 1, 1), per_rollout + 1


def _mesh(devices: int = 1):
    return parallel.make_mesh(compose(["+run=grpo"]).mesh, jax.devices()[:devices])


def _rows(out: pathlib.Path) -> dict[int, dict]:
    """metrics.jsonl's train rows by step; a step logged twice (before a SIGKILL and again
    after the resume) keeps the resumed run's row."""
    rows = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "loss" in row:
            rows[row["step"]] = row
    return rows


def _saved_state(out: pathlib.Path, step: int):
    with ocp.PyTreeCheckpointer() as reader:
        return reader.restore(str(out / "checkpoints" / str(step) / "state"))


def _assert_same_run(out: pathlib.Path, straight: pathlib.Path, steps: int, first: int = 1) -> None:
    """Steps first..steps logged by `out` equal the straight run's, and so does the final state."""
    got, want = _rows(out), _rows(straight)
    assert sorted(got) == list(range(first, steps + 1)) and sorted(want) == list(range(1, steps + 1))
    for step in got:
        for name in COMPARED:
            if name in want[step]:
                assert got[step][name] == want[step][name], (step, name, got[step][name], want[step][name])
    leaves = [jax.tree.leaves(_saved_state(run, steps)) for run in (out, straight)]
    assert len(leaves[0]) == len(leaves[1]) > 0
    for a, b in zip(*leaves, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted run of a case (made once per module, on first use)."""
    made = {}

    def get(run: str, agg: int, iters: int, devices: int = 1, batch: int = 0, steps: int = 0) -> pathlib.Path:
        key = (run, agg, iters, devices, batch, steps)
        if key not in made:
            out = tmp_path_factory.mktemp(f"straight_{run}_{agg}x{iters}_{devices}")
            steps = steps or _plan(agg, iters)[1]
            teacher_rcl.run(compose(_overrides(run, agg, iters, out, steps, batch)), _mesh(devices))
            made[key] = out
        return made[key]
    return get


@pytest.mark.parametrize("run,agg,iters", CASES, ids=[f"{r}-agg{a}-iter{i}" for r, a, i in CASES])
def test_stop_mid_rollout_then_resume_equals_straight(run, agg, iters, straight, tmp_path):
    """The straight run saved every step; its step-k checkpoint, alone in a new output_dir,
    is where a run stopped at k would resume from (the signal test below stops real runs)."""
    k, n = _plan(agg, iters)
    reference = straight(run, agg, iters)
    shutil.copytree(reference / "checkpoints" / str(k), tmp_path / "checkpoints" / str(k))
    # the step's checkpoint carries the updates left of its rollout (its JSON item, Orbax's layout)
    extra = tmp_path / "checkpoints" / str(k) / "extra" / "metadata"
    pending = (json.loads(extra.read_text()) or {}).get("pending_updates") if extra.exists() else None
    if agg * iters > 1:
        assert pending["chunks"] * pending["passes"] - pending["served"] == agg * iters - k > 0
    else:  # one update per rollout: the save falls on the rollout's end and carries none
        assert pending is None, pending
    resumed = teacher_rcl.run(compose(_overrides(run, agg, iters, tmp_path, n)), _mesh())
    assert resumed["steps"] == n and resumed["stopped_by"] == "max_steps"
    _assert_same_run(tmp_path, reference, n, first=k + 1)


def _child(run: str, agg: int, iters: int, out: pathlib.Path, steps: int, batch: int) -> subprocess.Popen:
    """`python main.py ...` with the session's environment as it is (XLA_FLAGS, the compilation
    cache): the same devices and programs; its output goes to <out>.log."""
    assert jax.device_count() == DEVICES
    log = open(f"{out}.log", "w")
    child = subprocess.Popen([sys.executable, "main.py", *_overrides(run, agg, iters, out, steps, batch)], cwd=ROOT,
                             env=dict(os.environ), stdout=log, stderr=subprocess.STDOUT)
    log.close()  # the child holds its own descriptor
    return child


def _log(out: pathlib.Path) -> str:
    return pathlib.Path(f"{out}.log").read_text()


def _wait_for(path: pathlib.Path, child: subprocess.Popen, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not (path.exists() and (path.is_dir() or path.stat().st_size > 0)):
        if child.poll() is not None:
            raise AssertionError(f"the run ended before {path} appeared")
        if time.monotonic() > deadline:
            child.kill()
            raise AssertionError(f"{path} did not appear within {timeout} s")
        time.sleep(0.01)


def test_sigterm_mid_rollout_and_sigkill_after_a_save_resume_exactly(straight, tmp_path):
    """One rollout, four updates (2 x 2); both children start together (their start-up
    overlaps). SIGTERM lands while the rollout's updates are being made: the child saves that
    step with the updates left and exits 0. SIGKILL lands right after the first checkpoint
    committed: nothing more is saved. Each resumes to step 4 from what was saved."""
    run, agg, iters, batch = "grpo", 2, 2, 8  # 8 rows: one per device
    n = agg * iters
    reference = straight(run, agg, iters, DEVICES, batch, n)  # first: the children find its programs compiled
    termed, killed = tmp_path / "sigterm", tmp_path / "sigkill"
    term_child, kill_child = _child(run, agg, iters, termed, n, batch), _child(run, agg, iters, killed, n, batch)
    try:
        _wait_for(termed / "completions.jsonl", term_child)  # the rollout is sampled and scored
        term_child.send_signal(signal.SIGTERM)
        _wait_for(killed / "checkpoints" / "1", kill_child)
        kill_child.send_signal(signal.SIGKILL)
        term_child.wait(timeout=240)
        kill_child.wait(timeout=60)
    finally:
        for child in (term_child, kill_child):
            if child.poll() is None:
                child.kill()
    term_out = _log(termed)
    assert term_child.returncode == 0, term_out[-3000:]
    saved = re.search(r"SIGTERM: saved step (\d+) with the (\d+) updates left of its rollout", term_out)
    assert saved, term_out[-3000:]
    assert int(saved.group(1)) + int(saved.group(2)) == agg * iters  # mid-rollout
    assert kill_child.returncode == -signal.SIGKILL, _log(killed)[-3000:]

    for out in (termed, killed):
        resumed = teacher_rcl.run(compose(_overrides(run, agg, iters, out, n, batch)), _mesh(DEVICES))
        assert resumed["steps"] == n
        _assert_same_run(out, reference, n)
