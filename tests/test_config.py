"""Config composition, validation and the CLI's one-line errors."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir

from atlas_jax import config as config_lib
from atlas_jax.config import ConfigError, accumulation_steps
from atlas_jax.parallel import data_parallel_size, make_mesh, mesh_shape
from tests import cli

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
RUNS = sorted(p.stem for p in (CONFIGS / "run").glob("*.yaml"))
MESHES = sorted(p.stem for p in (CONFIGS / "mesh").glob("*.yaml"))
# devices each preset is written for (auto/cpu take what is there: 8 here)
DEVICES = {"auto": 8, "cpu": 8, "1gpu": 1, "8gpu": 8, "8gpu_tp2": 8, "2x8gpu": 16,
           "tpu_v5e_8": 8, "tpu_v5p_64": 32}
NEEDS = {"evaluate": ["checkpoint=/tmp/ckpt"], "export": ["checkpoint=/tmp/ckpt", "export_dir=/tmp/hf"]}


def _compose(*overrides: str) -> config_lib.TrainConfig:
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return config_lib.to_config(compose(config_name="train", overrides=list(overrides)))


def test_run_and_mesh_options_are_the_documented_ones():
    assert set(config_lib.RUNS) == set(RUNS)
    assert set(DEVICES) == set(MESHES)


@pytest.mark.parametrize("mesh", MESHES)
@pytest.mark.parametrize("run", RUNS)
def test_every_run_on_every_mesh_composes_and_divides(run, mesh):
    cfg = _compose(f"+run={run}", f"mesh={mesh}", *NEEDS.get(run, []))
    assert cfg.run == run and cfg.mesh.name == mesh
    shape = mesh_shape(cfg.mesh, DEVICES[mesh])
    dp = shape["data"] * shape["fsdp"]
    accum = accumulation_steps(cfg.batch.global_batch_size, cfg.batch.micro_batch_size, dp)
    micro = cfg.batch.micro_batch_size if cfg.batch.micro_batch_size > 0 else cfg.batch.global_batch_size // dp
    assert accum * micro * dp == cfg.batch.global_batch_size


@pytest.mark.parametrize("mesh", [m for m in MESHES if DEVICES[m] <= 8])
def test_meshes_build_on_simulated_devices(mesh):
    import jax

    cfg = _compose("+run=teacher_sft", f"mesh={mesh}")
    built = make_mesh(cfg.mesh, jax.devices()[: DEVICES[mesh]])
    assert built.devices.size == DEVICES[mesh]
    assert data_parallel_size(built) == built.shape["data"] * built.shape["fsdp"]


def test_accumulation_error_names_the_three_numbers():
    with pytest.raises(ConfigError, match=r"global_batch_size=10 .*micro_batch_size=4 .*ways=2"):
        accumulation_steps(10, 4, 2)


def test_too_few_devices_names_both_counts_and_the_way_out():
    cfg = _compose("+run=teacher_sft", "mesh=8gpu")
    with pytest.raises(ConfigError, match=r"needs 8 devices.*but 2 are visible.*mesh=auto.*device_count=8"):
        mesh_shape(cfg.mesh, 2)


@pytest.mark.parametrize("override, pattern", [
    ("trainer.loss_type=ppo", r"trainer.loss_type='ppo' is not one of grpo"),
    ("mesh.fsdp=0", r"mesh.fsdp=0 must be a positive"),
    ("model.num_key_value_heads=3", r"num_attention_heads=4 is not a multiple"),
    ("trainer.warmup_ratio=1.5", r"trainer.warmup_ratio=1.5"),
])
def test_validation_names_the_key(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        _compose("+run=quickstart", override)


def test_missing_run_is_explained():
    with pytest.raises(ConfigError, match=r"add \+run=NAME"):
        _compose()


def _cli(*args: str, devices: int | None = None) -> subprocess.CompletedProcess:
    return cli.run_main(list(args), cwd=ROOT, devices=devices or 1, timeout=300)


@pytest.mark.parametrize("args, culprit", [
    (["+run=quickstart", "trainer.learning_rate=abc"], r"^error: trainer\.learning_rate: .*abc.*Float"),
    (["+run=quickstart", "trainer.foo=1"], r"^error: trainer\.foo: Key 'foo' not in 'TrainerConfig'"),
    (["+run=quickstart", "model=nope"], r"^error: no config 'model/nope'; available model options: .*tiny"),
    (["+run=nope"], r"^error: no config 'run/nope'; available run options: .*quickstart"),
    (["+run=quickstart", "batch.global_batch_size=10", "batch.micro_batch_size=4"],
     r"^error: batch\.global_batch_size=10 is not divisible by batch\.micro_batch_size=4 x data-parallel ways=1"),
    (["+run=teacher_sft", "mesh=8gpu"], r"^error: mesh=8gpu needs 8 devices .* but 1 are visible"),
])
def test_cli_usage_errors_are_one_line(args, culprit):
    result = _cli(*args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert __import__("re").search(culprit, lines[0]), lines[0]


def test_cli_unknown_key_in_a_yaml_file_names_key_and_file(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "broken.yaml").write_text("name: broken\nhidden_sizee: 3\n")
    result = _cli("+run=quickstart", "model=broken", f"hydra.searchpath=[file://{tmp_path}]")
    assert result.returncode == 2
    assert "model.hidden_sizee" in result.stderr and "model/broken" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_cli_cfg_job_prints_the_composed_config():
    result = _cli("+run=teacher_rcl", "mesh=8gpu", "--cfg", "job")
    assert result.returncode == 0, result.stderr
    assert "fsdp: 8" in result.stdout and "run: teacher_rcl" in result.stdout


def test_cli_dry_run_prints_the_plan_on_8_devices():
    result = _cli("+run=teacher_rcl", "mesh=8gpu", "dry_run=true", devices=8)
    assert result.returncode == 0, result.stderr
    assert "fsdp=8" in result.stdout and "accumulation 8" in result.stdout
    assert "parameters     8,190,735,360" in result.stdout  # Qwen3-8B


def test_cli_builds_16_device_mesh():
    result = _cli("+run=teacher_sft", "mesh=2x8gpu", "dry_run=true", devices=16)
    assert result.returncode == 0, result.stderr
    assert "data=2 x fsdp=8 x tensor=1" in result.stdout


def test_cli_keeps_compiled_programs_in_compilation_cache_dir(tmp_path):
    """With no JAX_COMPILATION_CACHE_DIR in the environment, compilation_cache_dir is JAX's
    persistent cache: the dry run's compiled update step lands there; null writes nothing."""
    # the session's JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 stays: every program is kept
    env = cli.env(1, compilation_cache=False)
    args = ["+run=teacher_sft", "model=tiny", "data=synthetic_math_sft", "data.max_length=64", "dry_run=true"]
    for name, value in (("on", str(tmp_path / "on")), ("off", "null")):
        result = subprocess.run([sys.executable, "main.py", *args, f"compilation_cache_dir={value}"], cwd=ROOT,
                                env={**env, "HOME": str(tmp_path / f"home_{name}")}, capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
    assert any((tmp_path / "on").iterdir())
    assert not (tmp_path / "home_off").exists()  # nothing under ~/.cache either
