"""Multi-host with JAX's own runtime, simulated on one machine.

Two processes x 2 CPU devices (launchers/local_multiprocess.sh, jax.distributed on
127.0.0.1) run 3 SFT steps; one process with 4 devices runs the same command (README's
example uses 2 x 4: half the simulated devices cross the same process boundary and cost the
suite's 2 cores less). Both see the same global batches, so the losses per step and the
parameters agree, and the checkpoint the two processes wrote jointly restores in this
(single) process.
The same holds for RCL: two processes x 1 device drive one global rollout and update exactly as
one process with 2 devices (one step: the rollout is what differs from SFT).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from atlas_jax import parallel
from atlas_jax.config import compose
from atlas_jax.recipes.evaluate import restore_teacher
from tests import cli

ROOT = pathlib.Path(__file__).resolve().parents[1]
# README's launcher command, then the small overrides a test can afford
SFT = ["+run=teacher_sft", "model=tiny", "data=synthetic_math_sft", "data.max_length=256", "mesh=cpu",
       "batch=quickstart", "trainer.max_steps=3", "data.num_synthetic_examples=200",
       "trainer.eval_steps=1000", "trainer.report_to=[]"]
RCL = ["+run=teacher_rcl", "model=tiny", "trainer.student_model=tiny", "data=synthetic_math_rl", "mesh=cpu",
       "trainer.max_steps=1", "batch=quickstart", "trainer.num_generations=4", "trainer.max_prompt_length=128",
       "trainer.max_completion_length=8", "reward.max_probe_tokens=8", "data.max_eval_samples=4",
       "batch.eval_batch_size=4", "trainer.eval_steps=100", "trainer.report_to=[]",
       "trainer.save_completions_probability=1.0"]
TIMEOUT_S = 240  # each run takes ~30-60 s on 2 cores; a hung collective must not hang the suite


def _free_port() -> int:
    with socket.socket() as s:  # the OS picks an unused port; it stays free for the few seconds we need
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    # the session's compilation cache comes along; it also keeps the runs from writing the
    # user's default one (main.py: compilation_cache_dir)
    return {**cli.env(devices), "PYTHON": sys.executable, "PORT": str(_free_port())}


def _start(cmd: list[str], devices: int, log: pathlib.Path) -> subprocess.Popen:
    # Own session: on failure the whole group (launcher and its python children) is killed.
    return subprocess.Popen(cmd, cwd=ROOT, env=_env(devices), stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _finish(proc: subprocess.Popen, log: pathlib.Path, deadline_s: float) -> None:
    try:
        proc.wait(timeout=deadline_s)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{proc.args[:2]} timed out after {deadline_s} s; log:\n{log.read_text()[-3000:]}")
    assert proc.returncode == 0, f"{proc.args[:2]} exited {proc.returncode}; log:\n{log.read_text()[-3000:]}"


def _side_by_side(tmp: pathlib.Path, overrides: list[str], devices: int) -> tuple[pathlib.Path, pathlib.Path]:
    """Output dirs of a 1 x `devices` run and a 2 x `devices / 2` run, started side by side."""
    one, two = tmp / "one_process", tmp / "two_processes"
    half = str(devices // 2)
    procs = [
        (_start([sys.executable, "main.py", *overrides, f"output_dir={one}"], devices, tmp / "one.log"),
         tmp / "one.log"),
        (_start(["bash", "launchers/local_multiprocess.sh", "2", half, *overrides, f"output_dir={two}"],
                devices // 2, tmp / "two.log"), tmp / "two.log"),
    ]
    try:
        for proc, log in procs:
            _finish(proc, log, TIMEOUT_S)
    finally:
        for proc, _ in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return one, two


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return _side_by_side(tmp_path_factory.mktemp("multihost_sft"), SFT, 4)


def _train_metrics(run_dir: pathlib.Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]


def test_two_processes_match_one(runs):
    one, two = runs
    m1, m2 = _train_metrics(one), _train_metrics(two)
    assert [r["step"] for r in m1] == [r["step"] for r in m2] == [1, 2, 3]
    for a, b in zip(m1, m2):
        assert a["loss_tokens"] == b["loss_tokens"]  # the same examples in every global batch
        np.testing.assert_allclose(b["loss"], a["loss"], rtol=1e-5)
        np.testing.assert_allclose(b["grad_norm"], a["grad_norm"], rtol=1e-5)
    # The HF export gathers the parameters from both processes; process 0 writes it.
    w1, w2 = load_file(one / "hf" / "model.safetensors"), load_file(two / "hf" / "model.safetensors")
    assert w1.keys() == w2.keys()
    for name in w1:
        np.testing.assert_allclose(w2[name], w1[name], atol=1e-5, err_msg=name)


def test_two_process_checkpoint_restores_in_one_process(runs):
    one, two = runs
    # Written once, jointly: one step directory with both processes' shards committed.
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["3"]
    assert (two / "checkpoints" / "3" / "commit_success.txt").exists()
    cfg = compose(SFT)
    mesh = parallel.make_mesh(cfg.mesh, jax.devices()[:1])
    restored = {}
    for run_dir in (one, two):
        model, step = restore_teacher(dataclasses.replace(cfg, checkpoint=str(run_dir / "checkpoints")), mesh)
        assert step == 3
        restored[run_dir] = jax.tree.leaves(jax.device_get(nnx.state(model, nnx.Param)))
    assert len(restored[one]) == len(restored[two]) > 0
    for a, b in zip(restored[one], restored[two]):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5)


def test_two_process_rcl_rollout_matches_one(tmp_path):
    """Both processes drive one global rollout: it must equal the single-process one token for
    token. (A random tiny student is never right, so rewards and the update are ~0 here; the
    update step is the SFT one, whose multi-process equality the test above checks.)"""
    one, two = _side_by_side(tmp_path, RCL, 2)
    m1, m2 = _train_metrics(one), _train_metrics(two)
    assert [r["step"] for r in m1] == [r["step"] for r in m2] == [1]
    for a, b in zip(m1, m2):
        for exact in ("reward", "student_accuracy", "baseline_accuracy", "teaching_length_mean",
                      "teaching_length_std", "student_approach_length", "num_tokens"):
            assert a[exact] == b[exact], exact
    samples = [(run / "completions.jsonl").read_text() for run in (one, two)]
    assert samples[0] == samples[1]  # every guidance, approach and solution text, as written
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["1"]
