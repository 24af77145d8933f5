"""README's commands, run as a user runs them: `python main.py` children (forked, imports done
once: tests/cli.py run_main) from a working directory of their own, so `results/...` paths
land there as they would in a fresh clone.

Every command in README's fenced blocks must be listed in CASES below, with how the suite
runs it: verbatim, verbatim plus the small overrides a test can afford (stated next to it),
as a dry run (plan only) on 8 simulated devices when it needs hardware or hub downloads
this machine lacks, or not at all, with the reason.
"""

from __future__ import annotations

import json
import pathlib
import re
import shlex

import numpy as np
import pytest

from tests import cli, test_multihost

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SMOKE = 'phase_overrides=["trainer.max_steps=2"]'  # the quickstart's training phases, 2 steps each
CPU_RCL = ["batch=quickstart", "trainer.num_generations=4", "trainer.max_prompt_length=128",
           "trainer.max_completion_length=8", "reward.max_probe_tokens=8", "data.max_eval_samples=4",
           "batch.eval_batch_size=4", "trainer.max_steps=1"]  # the recipe's sizes take 10 min

# command (as README writes it, continuations joined, comment dropped) -> how it is tested
CASES = {
    "pip install -e '.[test]'": "skip: .ci/run runs it on a fresh machine",
    "python -m pytest -q": "skip: this suite",
    "python main.py +run=quickstart": ["run", SMOKE],
    "python main.py +run=teacher_sft model=qwen3_8b mesh=8gpu": "dry",
    "python main.py +run=teacher_rcl mesh=8gpu model.model_name_or_path=results/teacher_sft/hf": "dry",
    "python main.py +run=evaluate checkpoint=results/teacher_rcl/checkpoints": "dry",
    "python main.py +run=export checkpoint=results/teacher_rcl/checkpoints export_dir=teacher_hf": "dry",
    "python main.py +run=evaluate checkpoint=results/quickstart/rcl/checkpoints": ["after_quickstart"],
    "python main.py +run=export checkpoint=results/quickstart/rcl/checkpoints export_dir=teacher_hf":
        ["after_quickstart"],
    "python main.py +run=teacher_rcl --cfg job": ["run"],
    "python main.py +run=teacher_rcl mesh=8gpu dry_run=true": ["run"],
    "python main.py +run=teacher_rcl model=tiny trainer.student_model=tiny data=synthetic_math_rl "
    "trainer.max_steps=2": ["run", *CPU_RCL],
    "python main.py +run=teacher_sft trainer.learning_rate=2e-5 batch.micro_batch_size=2 model=llama3_8b": "dry",
    "launchers/local_multiprocess.sh 2 4 +run=teacher_sft model=tiny data=synthetic_math_sft "
    "data.max_length=256 mesh=cpu batch=quickstart trainer.max_steps=3 output_dir=results/mp":
        "skip: tests/test_multihost.py runs it (test_launcher_command_is_the_one_multihost_runs)",
    "sbatch launchers/slurm.sbatch +run=teacher_rcl mesh=2x8gpu": "skip: needs a SLURM cluster",
    "launchers/tpu_pod.sh my-v5p-64 us-east5-a +run=teacher_rcl mesh=tpu_v5p_64 output_dir=gs://bucket/rcl":
        "skip: needs a TPU pod",
}


def readme_commands() -> list[str]:
    """Commands in README's fenced blocks (`python`, `launchers/`, `sbatch`, `pip`, `bash`)."""
    blocks = re.findall(r"```[a-z]*\n(.*?)```", README.read_text(), re.S)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            line = re.sub(r"\s+", " ", line)
            if line.startswith(("python ", "launchers/", "sbatch ", "pip ", "bash ")):
                commands.append(line)
    return commands


def _is_bench(command: str) -> bool:
    return command.startswith(("python bench/", "bash bench/"))


def test_every_readme_command_is_tested_or_says_why_not():
    listed = [c for c in readme_commands() if not _is_bench(c)]
    assert listed, "README has no commands?"
    missing = [c for c in listed if c not in CASES]
    assert not missing, f"README commands with no entry in tests/test_readme.py CASES: {missing}"


def test_launcher_command_is_the_one_multihost_runs():
    command = next(c for c in readme_commands() if c.startswith("launchers/local_multiprocess.sh"))
    overrides = [a for a in shlex.split(command)[3:] if not a.startswith("output_dir=")]
    assert overrides == test_multihost.SFT[: len(overrides)]


def _run(command: str, cwd: pathlib.Path, *extra: str, devices: int = 1, timeout: int = 420):
    args = shlex.split(command)
    assert args[:2] == ["python", "main.py"], command
    # forked from the suite's fork server (tests/cli.py run_main; tests/test_forkserver.py: the
    # same exit status and output as a fresh `python main.py`), with the session's compilation
    # cache: a program these commands share with other tests is compiled once
    result = cli.run_main([*args[2:], *extra], cwd=cwd, devices=devices, timeout=timeout)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{command} {' '.join(extra)} exited {result.returncode}:\n{output[-3000:]}"
    assert "Traceback" not in output, output[-3000:]
    return result.stdout


@pytest.mark.parametrize("command", [c for c, how in CASES.items() if how == "dry"])
def test_production_commands_compose_and_plan(command, tmp_path):
    """Commands that need 8 GPUs or hub downloads: composed, validated and planned on 8
    simulated CPU devices (dry_run=true stops before any model or data is loaded)."""
    out = _run(command, tmp_path, "dry_run=true", devices=8)
    assert "== atlas_jax run plan" in out and "total" in out


@pytest.mark.parametrize("command", [c for c, how in CASES.items() if isinstance(how, list) and how[0] == "run"
                                     and "quickstart" not in c])
def test_command_runs(command, tmp_path):
    out = _run(command, tmp_path, *CASES[command][1:], devices=8 if "mesh=8gpu" in command else 1)
    if "--cfg job" in command:
        assert "run: teacher_rcl" in out and "student_model: qwen3_4b" in out
    elif "dry_run=true" in command:
        assert "devices        8 x cpu" in out and "accumulation 8" in out
    else:
        assert (tmp_path / "results" / "teacher_rcl" / "checkpoints" / "1").is_dir()


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    """README's main command, 2 steps a phase. (Resuming each phase is the SFT and RCL
    recipes' own resume, tested in tests/train and tests/recipes.)"""
    cwd = tmp_path_factory.mktemp("user")
    return cwd, _run("python main.py +run=quickstart", cwd, SMOKE)


def test_quickstart_writes_the_comparison(quickstart):
    cwd, first = quickstart
    out = cwd / "results" / "quickstart"
    comparison = json.loads((out / "comparison.json").read_text())
    assert set(comparison) == {"sft_teacher", "rcl_teacher"}
    for report in comparison.values():
        assert report["num_scored"] == 100
        for key in ("baseline_accuracy", "accuracy_with_guidance", "non_degradation_rate", "mean_guidance_tokens"):
            assert 0 <= report[key] <= (1 if key != "mean_guidance_tokens" else 1e4)
    assert (out / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    assert "| student accuracy |" in (out / "comparison.md").read_text()
    assert re.search(r"^accuracy on 100 held-out problems: student alone [\d.]+ \| with the SFT teacher "
                     r"[\d.]+ \| with the RCL teacher [\d.]+$", first.strip().splitlines()[-1])
    assert "resumed from" not in first


def test_evaluate_and_export_need_only_the_checkpoint(quickstart):
    cwd, _ = quickstart
    evaluate, export = (c for c, how in CASES.items() if how == ["after_quickstart"])
    out = _run(evaluate, cwd)
    assert "model, trainer, reward, batch, seed, data from" in out
    report = json.loads((cwd / "results" / "evaluate" / "eval" / "report.json").read_text())
    rcl_teacher = json.loads((cwd / "results" / "quickstart" / "comparison.json").read_text())["rcl_teacher"]
    assert report["accuracy_with_guidance"] == rcl_teacher["accuracy_with_guidance"]  # same teacher, student, data

    _run(export, cwd)
    import torch
    from transformers import AutoModelForCausalLM

    from atlas_jax.models import from_pretrained

    theirs = AutoModelForCausalLM.from_pretrained(cwd / "teacher_hf", dtype=torch.float32).eval()
    ours = from_pretrained(str(cwd / "teacher_hf"))
    tokens = np.random.default_rng(0).integers(0, 1024, (2, 12))
    with torch.no_grad():
        expected = theirs(torch.as_tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours(tokens)), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", ["missing", "empty", "other_model", "half_written"])
def test_unusable_checkpoint_is_one_line_and_no_traceback(quickstart, case, tmp_path):
    cwd, _ = quickstart
    good = cwd / "results" / "quickstart" / "rcl" / "checkpoints"
    extra = []
    if case == "missing":
        checkpoint = tmp_path / "nope"
    elif case == "empty":
        checkpoint = tmp_path / "empty"
        checkpoint.mkdir()
    elif case == "other_model":
        checkpoint, extra = good, ["model.hidden_size=64", "model.head_dim=16"]
    else:  # a step whose arrays were never all written (a copy with its state files removed)
        import shutil

        run = tmp_path / "run"
        shutil.copytree(good.parent, run)
        step = next(p for p in (run / "checkpoints").iterdir() if p.name.isdigit())
        for f in (step / "state").rglob("*"):
            if f.is_file() and "metadata" not in f.name:
                f.unlink()
        checkpoint = run / "checkpoints"
    result = cli.run_main(["+run=evaluate", f"checkpoint={checkpoint}", *extra], cwd=tmp_path, devices=8,
                          timeout=300)
    assert result.returncode != 0
    assert "Traceback" not in result.stdout + result.stderr, (result.stdout + result.stderr)[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(checkpoint) in errors[0], result.stderr[-2000:]
