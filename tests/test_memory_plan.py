"""The compiled memory plan: it is the step that runs, a run that cannot fit is refused before
it trains, and a resume of another model's checkpoint is refused before anything is written."""

from __future__ import annotations

import pathlib
import time

import jax
import pytest

import main
from atlas_jax import memory, parallel, recipes
from atlas_jax.config import compose
from atlas_jax.generation import sampler
from atlas_jax.train import setup
from tests import cli

FAST = ["data.num_synthetic_examples=32", "data.eval_split_ratio=0", "trainer.max_steps=1",
        "trainer.save_final_model=false", "trainer.report_to=[]"]
SFT = ["+run=teacher_sft", "model=tiny", "data=synthetic_math_sft", "batch.global_batch_size=4",
       "batch.micro_batch_size=2", *FAST]
GRPO = ["+run=grpo", "model=tiny", "data=synthetic_math_rl", "trainer.num_generations=4",
        "trainer.max_completion_length=16", "trainer.beta=0", "batch.global_batch_size=8", "batch.micro_batch_size=4",
        *FAST]
CASES = {
    "sft-256": [*SFT, "data.max_length=256"],
    "sft-512": [*SFT, "data.max_length=512"],
    "lora-256": [*SFT, "data.max_length=256", "model.lora.rank=8"],
    "lora-512": [*SFT, "data.max_length=512", "model.lora.rank=8"],
    "grpo-64": [*GRPO, "trainer.max_prompt_length=64"],
    "grpo-128": [*GRPO, "trainer.max_prompt_length=128"],
}


def _abstract(tree):
    """Arguments as jit sees them: shape, dtype and, for committed arrays, the sharding."""
    def one(x):
        committed = isinstance(x, jax.Array) and x.committed
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding if committed else None)
    return jax.tree.map(one, tree)


class _Recorder:
    """Stands in for a jitted function: lowers like it, and keeps the shapes of its first call."""

    def __init__(self, jitted, static=0):
        self.jitted, self.static, self.first = jitted, static, None

    def lower(self, *args, **kwargs):
        return self.jitted.lower(*args, **kwargs)

    def __call__(self, *args, **kwargs):
        if self.first is None:
            self.first = (*args[:self.static], *_abstract(args[self.static:])), kwargs
        return self.jitted(*args, **kwargs)

    def ran(self) -> memory.ProgramMemory:
        """The analysis of the executable the first call ran (jax's cache hands back that one)."""
        args, kwargs = self.first
        return memory.ProgramMemory.of(self.jitted.lower(*args, **kwargs).compile())


_RUNS: dict = {}  # case -> (output_dir, planned, ran): one run per case, shared by the tests below


def recorded_run(case: str, tmp_path_factory) -> tuple[pathlib.Path, dict, dict]:
    """Runs CASES[case] for one step: (output_dir, what memory.report compiled, what the first
    step ran), each {program: ProgramMemory}."""
    if case in _RUNS:
        return _RUNS[case]
    out = tmp_path_factory.mktemp(case)
    cfg = compose([*CASES[case], f"output_dir={out}"])
    planned, recorders = {}, {"generation": _Recorder(sampler._program, static=1)}
    report, bind = memory.report, setup.Job.bind

    def recording_report(*args, **kwargs):
        planned.update(report(*args, **kwargs))
        return planned

    def recording_bind(job, update):
        recorders["update step"] = _Recorder(update.jitted)
        return lambda state, batch, extras=None: recorders["update step"](state, batch, extras, job.frozen)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(memory, "report", recording_report)
        patch.setattr(setup.Job, "bind", recording_bind)
        patch.setattr(sampler, "_program", recorders["generation"])
        recipes.run(cfg, parallel.make_mesh(cfg.mesh, jax.devices()[:1]))
    ran = {name: r.ran() for name, r in recorders.items() if r.first is not None}
    _RUNS[case] = out, planned, ran
    return _RUNS[case]


@pytest.mark.parametrize("case", list(CASES))
def test_the_compiled_plan_is_what_the_first_step_ran(case, tmp_path_factory):
    """memory.report's figures for the update step (and GRPO's sampling program) are within 10%
    of the memory analysis of the executable the run's first step actually ran (it is that
    executable: the run reuses what the plan compiled)."""
    _, planned, ran = recorded_run(case, tmp_path_factory)
    assert set(planned) == ({"update step", "generation"} if case.startswith("grpo") else {"update step"})
    assert set(ran) == set(planned)
    for name, memory in ran.items():
        assert abs(planned[name].peak - memory.peak) <= 0.1 * memory.peak, (case, name, planned[name], memory)
        assert memory.temporaries > 0 and memory.arguments > 0


def test_a_run_that_cannot_fit_is_refused_before_it_trains(tmp_path):
    """512 rows of 16k tokens need ~430 GiB per device: refused in one line with the figure and
    the knobs, before any checkpoint, whatever this machine's MemAvailable."""
    out = tmp_path / "run"
    started = time.perf_counter()
    result = cli.run_main(["+run=teacher_sft", "model=tiny", "data=synthetic_math_sft", "data.num_synthetic_examples=64",
                           "batch.global_batch_size=512", "batch.micro_batch_size=512", f"output_dir={out}"],
                          cwd=tmp_path, timeout=120)
    seconds = time.perf_counter() - started
    assert result.returncode != 0 and seconds < 60, (result.returncode, seconds)
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: the update step needs ") and "GiB per device" in lines[0]
    assert "MemAvailable" in lines[0] and "batch.micro_batch_size=1 (is 512" in lines[0]
    assert "peak" in result.stdout  # the plan it refused, printed first
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())


def test_a_dry_run_prints_the_compiled_plan_and_what_would_not_fit(tmp_path, capsys, monkeypatch):
    """trainer.memory_limit_gb overrides the device's limit; a dry run reports, returns, loads nothing."""
    make_mesh = parallel.make_mesh
    monkeypatch.setattr(parallel, "make_mesh", lambda cfg: make_mesh(cfg, jax.devices()[:1]))
    cfg = compose([*CASES["sft-256"], "dry_run=true", "trainer.memory_limit_gb=0.001", f"output_dir={tmp_path}"])
    main._run(cfg)
    out = capsys.readouterr().out
    assert "compiled (XLA memory analysis" in out and "(estimate)" in out
    assert "limit" in out and "(trainer.memory_limit_gb)" in out
    assert "would not fit: the update step needs " in out and "a shorter data.max_length (is 256)" in out
    assert not any(tmp_path.iterdir())


def test_resuming_another_model_is_one_line_and_keeps_config_yaml(tmp_path, tmp_path_factory):
    """An output_dir trained with model=tiny, rerun with another hidden size: one line naming
    both shapes and the way out, before anything is loaded; the run's config.yaml untouched."""
    out, _, _ = recorded_run("sft-256", tmp_path_factory)
    saved = (out / "config.yaml").read_bytes()
    steps = sorted(p.name for p in (out / "checkpoints").iterdir())
    result = cli.run_main([*CASES["sft-256"], "model.hidden_size=64", f"output_dir={out}"], cwd=tmp_path, timeout=120)
    assert result.returncode != 0
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: output_dir {out} holds a checkpoint of another model (step 1): ")
    assert "(1024, 128) there, (1024, 64) here" in lines[0] and "another output_dir" in lines[0]
    assert (out / "config.yaml").read_bytes() == saved
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == steps
