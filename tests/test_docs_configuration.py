"""docs/configuration.md's commands, run the way its text says they are.

Every `python main.py ...` line in the guide's fenced blocks is in CASES (run as written, as
a dry run on simulated devices, or with the overrides the guide states beside it, and its
quoted output checked) or in PRODUCTION_ONLY with the reason. The guide's YAML blocks marked
`# configs/<group>/<name>.yaml` are written to a search-path directory for the commands that
use them. Each row of the error table is provoked and the first words of the line it prints
are compared with the row. The commands run from working directories of their own, two at a
time (the suite's budget is two cores), forked by tests/cli.py's `run_main`, and the tiny
SFT run trains for real, twice.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
import shlex
import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests import cli

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "configuration.md"
TEXT = DOC.read_text()


@dataclasses.dataclass(frozen=True)
class Case:
    devices: int = 1  # simulated CPU devices (XLA_FLAGS) when > 1
    dry: bool = False  # dry_run=true appended: the plan only, no model or data loaded
    extra: tuple = ()  # overrides appended; the guide states them beside the command
    configs: bool = False  # the guide's YAML blocks on hydra.searchpath
    expect: tuple = ()  # output the guide quotes: each must be in the output and in the guide


S1 = "python main.py +run=teacher_rcl mesh=8gpu"
LORA = "model.lora.rank=16 model.lora.alpha=32"
PHASE1 = ("python main.py +run=teacher_sft model=qwen3_8b mesh=8gpu trainer.save_steps=100 trainer.eval_steps=100 "
          "trainer.save_total_limit=3 'trainer.report_to=[tensorboard,wandb]' trainer.save_final_model=true")
TINY_SFT = ("model=tiny", "data=synthetic_math_sft", "data.max_length=256", "data.max_eval_samples=16",
            "trainer.max_steps=1")
DRY8 = dict(devices=8, dry=True)

CASES = {
    # Walkthrough
    "python main.py +run=teacher_rcl --info defaults-tree": Case(expect=("model: qwen3_8b", "batch: rcl",
                                                                          "run: teacher_rcl")),
    "python main.py +run=teacher_rcl --cfg job": Case(expect=(
        "dataset_id_or_path: Arc-Intelligence/Arc-ATLAS-Teach-v0", "student_model: qwen3_4b",
        "global_batch_size: 128", "remat: save_layer_inputs")),
    "python main.py +run=teacher_rcl --cfg job --package trainer": Case(expect=("num_generations: 32",
                                                                                 "sync_ref_model: true")),
    "python main.py +run=teacher_rcl --cfg job --package model": Case(expect=("param_dtype: float32",)),
    "python main.py +run=teacher_rcl --cfg job --package data": Case(expect=("data_files: training/rl.jsonl",)),
    "python main.py +run=teacher_rcl --cfg job --package reward": Case(expect=("max_probe_tokens: 500",)),
    # Pattern 1
    "python main.py +run=teacher_rcl trainer.learning_rate=5e-7 trainer.num_generations=16 --cfg job "
    "--package trainer": Case(expect=("learning_rate: 5.0e-07", "num_generations: 16")),
    "python main.py +run=teacher_rcl model=qwen3_4b trainer.student_model=qwen3_1_7b mesh=8gpu dry_run=true":
        Case(**DRY8, expect=("parameters     4,022,468,096 (4.02 B); mode full, trained 4,022,468,096",)),
    # Pattern 2 (the guide's YAML blocks)
    "python main.py +run=teacher_rcl model=qwen3_14b mesh=8gpu dry_run=true": Case(**DRY8, configs=True, expect=(
        "parameters     14,768,307,200 (14.8 B); mode full, trained 14,768,307,200", "total            47.24 GiB")),
    "python main.py +run=teacher_rcl_14b mesh=8gpu dry_run=true": Case(**DRY8, configs=True, expect=(
        "mode lora, trained 83,886,080", "total            19.92 GiB")),
    "python main.py +run=teacher_rcl_14b --cfg job --package data": Case(configs=True, expect=(
        "prompt_field: question", "max_eval_samples: 200")),
    # Pattern 3
    "python main.py +run=teacher_sft mesh=8gpu dry_run=true": Case(**DRY8, expect=(
        "batch          global 16 = micro 1 x data-parallel 8 x accumulation 2; sequence length 16384",)),
    "python main.py +run=teacher_sft mesh=2x8gpu dry_run=true": Case(devices=16, dry=True, expect=(
        "devices        16 x cpu in 1 process(es); mesh data=2 x fsdp=8 x tensor=1",
        "batch          global 16 = micro 1 x data-parallel 16 x accumulation 1; sequence length 16384")),
    "python main.py +run=teacher_rcl mesh=8gpu_tp2 dry_run=true": Case(**DRY8, expect=(
        "batch          global 128 = micro 2 x data-parallel 4 x accumulation 16; sequence length 8192",)),
    # Scenario 1
    f"{S1} dry_run=true": Case(**DRY8, expect=("29.36 GiB",)),
    f"{S1} batch.micro_batch_size=1 dry_run=true": Case(**DRY8, expect=("24.22 GiB",)),
    f"{S1} {LORA} dry_run=true": Case(**DRY8, expect=("14.14 GiB", "trained 15,335,424")),
    f"{S1} {LORA} model.load_in_4bit=true dry_run=true": Case(**DRY8, expect=("11.42 GiB",)),
    f"{S1} model.remat=none dry_run=true": Case(**DRY8, expect=("108.11 GiB",)),
    f"{S1} {LORA} model.load_in_4bit=true trainer.offload=optimizer_and_frozen": Case(**DRY8, expect=("11.42 GiB",)),
    f"python main.py +run=teacher_sft mesh=1gpu batch=low_memory {LORA} model.load_in_4bit=true "
    "trainer.offload=optimizer_and_frozen data.max_length=4096 dry_run=true": Case(expect=(
        "batch          global 16 = micro 1 x data-parallel 1 x accumulation 16; sequence length 4096",
        "parameters     8,190,735,360 (8.19 B); mode qlora, trained 15,335,424", "total            12.52 GiB")),
    # Scenario 2
    f"{S1} trainer.student_model=qwen3_1_7b data.max_train_samples=256 trainer.num_generations=8 "
    "batch.global_batch_size=32 trainer.max_prompt_length=1024 trainer.max_completion_length=1024 "
    "trainer.max_steps=50": Case(**DRY8, expect=(
        "batch          global 32 = micro 2 x data-parallel 8 x accumulation 2; sequence length 2048", "5.18 GiB")),
    "python main.py +run=teacher_sft model=qwen3_1_7b mesh=8gpu data.max_train_samples=2000 data.max_length=4096 "
    "trainer.max_steps=100": Case(**DRY8, expect=("sequence length 4096",)),
    "python main.py +run=teacher_rcl model=tiny trainer.student_model=tiny data=synthetic_math_rl "
    "data.max_train_samples=64 data.max_eval_samples=4 trainer.num_generations=4 trainer.max_prompt_length=128 "
    "trainer.max_completion_length=8 reward.max_probe_tokens=8 batch.global_batch_size=16 batch.micro_batch_size=-1 "
    "batch.eval_batch_size=4 trainer.max_steps=1": Case(dry=True, expect=(
        "batch          global 16 = micro 16 x data-parallel 1 x accumulation 1; sequence length 136",)),
    # Scenario 3 (phase 1 is trained for real: see test_production_training_trains_and_resumes)
    PHASE1: Case(devices=8, extra=TINY_SFT),
    "python main.py +run=teacher_rcl mesh=8gpu model.model_name_or_path=results/teacher_sft/hf trainer.save_steps=20 "
    "trainer.eval_steps=20 trainer.save_total_limit=5 'trainer.report_to=[tensorboard,wandb]'": Case(**DRY8),
    "python main.py +run=teacher_sft model=qwen3_8b mesh=8gpu output_dir=results/teacher_sft_2 "
    "resume_from=results/teacher_sft/checkpoints trainer.num_train_epochs=2": Case(**DRY8),
    # Debugging
    "python main.py +run=teacher_rcl --cfg job --resolve": Case(expect=("output_dir: results/teacher_rcl",)),
    "python main.py --help": Case(),
}

# Fenced commands the suite does not run, with the reason (none at present: every command
# above runs, as a dry run where it needs hardware or downloads this machine lacks).
PRODUCTION_ONLY: dict[str, str] = {}

# Error-table rows that need more than their command.
ERROR_SETUP = {
    "Could not override '/model' (in a run file)": dict(files={
        "run/my_recipe.yaml": "# @package _global_\ndefaults:\n  - override /modle: tiny\nrun: teacher_sft\n"}),
    "Batch does not divide": dict(devices=8),
    "Checkpoint of another model": dict(checkpoint="shared"),
    "Checkpoint of another model (resuming)": dict(checkpoint="copy"),
    "Pickle checkpoint": dict(torch_model=True),
}
NOT_PROVOKED = {"Memory overflow": "needs a device to exhaust; on CPU a request that large swaps or is blocked "
                                   "(tests/test_errors.py tests the translation in-process)"}
# Rows whose output is not one line yet (the guide says so): the traceback is still checked.
TRACEBACKS: set[str] = set()

# Pattern 2's schema checks: (file, text in the guide's block, replacement, command).
SCHEMA_CHECKS = [
    ("model/qwen3_14b.yaml", "num_hidden_layers: 40", "num_hidden_layer: 40",
     "+run=teacher_rcl model=qwen3_14b --cfg job"),
    ("data/algebra_rl.yaml", "prompt_field: question", "prompt_feild: question", "+run=teacher_rcl_14b --cfg job"),
    ("model/qwen3_14b.yaml", "hidden_size: 5120\n", "hidden_size: 5120.5\n",
     "+run=teacher_rcl model=qwen3_14b --cfg job"),
    ("run/teacher_rcl_14b.yaml", "  student_model:", "  student:", "+run=teacher_rcl_14b --cfg job"),
    ("run/teacher_rcl_14b.yaml", "# @package _global_\n# configs/run/teacher_rcl_14b.yaml\n",
     "# configs/run/teacher_rcl_14b.yaml\n# @package _global_\n", "+run=teacher_rcl_14b --cfg job"),
]

ATLAS_SECTIONS = [
    "Philosophy: Why Hydra?", "The Configuration Hierarchy", "Layer Breakdown",
    "Walkthrough: Composing teacher_rcl.yaml", "Base Configuration Structure", "trainer: teacher_grpo",
    "model: qwen3_8b", "data: arc_atlas_rl", "reward: adaptive_teaching", "Customization Patterns",
    "Pattern 1: Command-Line Overrides", "Pattern 2: Creating New Configurations", "1. Choose the Right Layer",
    "2. Copy a Similar Config", "3. Modify Key Parameters", "4. Reference in Run Config",
    "Pattern 3: Multi-GPU Scaling", "Common Configuration Scenarios", "Scenario 1: Memory Optimization",
    "Scenario 2: Faster Experimentation", "Scenario 3: Production Training", "Debugging Configuration Issues",
    "Viewing Composed Configuration", "Common Errors and Solutions", "Best Practices",
]
ATLAS_ERRORS = ["Override not found", "Could not override '/model'", "Type mismatch", "Memory overflow"]


def doc_commands() -> list[str]:
    """`python main.py` lines of the guide's fenced blocks (trailing comments dropped)."""
    commands = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", TEXT, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+", " ", re.sub(r"\s+#.*$", "", line)).strip()
            if line.startswith("python main.py") and line not in commands:
                commands.append(line)
    return commands


def doc_configs() -> dict[str, str]:
    """The YAML blocks marked `# configs/<group>/<name>.yaml`: {'<group>/<name>.yaml': text}."""
    found = {}
    for block in re.findall(r"```yaml\n(.*?)```", TEXT, re.S):
        for line in block.splitlines()[:2]:
            marker = re.fullmatch(r"# configs/(\w+/\w+\.yaml)", line)
            if marker:
                found[marker.group(1)] = block
    return found


def error_rows() -> dict[str, tuple[str, str]]:
    """The error table: {label: (command cell, prints cell)}."""
    section = TEXT.split("### Common Errors and Solutions", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        if not line.startswith("| ") or line.startswith(("| Error ", "| ---")):
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        rows[cells[0].replace("**", "").replace("`", "")] = (cells[1], cells[2])
    return rows


def _write_configs(directory: pathlib.Path, files: dict[str, str]) -> str:
    for name, text in files.items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_text(text)
    return f"hydra.searchpath=[file://{directory}]"


def _main(args: list[str], cwd: pathlib.Path, *, devices: int = 1, env: dict | None = None):
    """main.py (by absolute path) with `args`, from `cwd`, offline, on `devices` CPU devices
    (forked from the suite's fork server: tests/cli.py `run_main`)."""
    return cli.run_main(args, cwd=cwd, devices=devices, env_extra=env, timeout=400)


def _case_args(command: str, case: Case, configs_dir: pathlib.Path) -> list[str]:
    """The command's arguments with the case's additions; overrides must precede --cfg/--info
    (Hydra's argument parser refuses overrides after them)."""
    args = shlex.split(command)[2:]
    split = next((i for i, a in enumerate(args) if a.startswith("--")), len(args))
    overrides, flags = args[:split] + list(case.extra), args[split:]
    if case.dry and "dry_run=true" not in overrides:
        overrides.append("dry_run=true")
    if case.configs:
        overrides.insert(0, _write_configs(configs_dir, doc_configs()))
    return overrides + flags


def _train_twice(cwd: pathlib.Path):
    """Scenario 3's phase 1 with TINY_SFT on 8 simulated devices, then the same again."""
    args = _case_args(PHASE1, CASES[PHASE1], cwd)
    return _main(args, cwd, devices=8), _main(args, cwd, devices=8)


def _torch_model(directory: pathlib.Path) -> None:
    """A Hugging Face directory whose weights are a pickle (pytorch_model.bin)."""
    directory.mkdir()
    hf = {"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "vocab_size": 1024, "hidden_size": 128,
          "intermediate_size": 384, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
          "head_dim": 32, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 2048,
          "tie_word_embeddings": True}
    (directory / "config.json").write_text(json.dumps(hf))
    for f in (ROOT / "atlas_jax" / "assets" / "tokenizer").iterdir():
        shutil.copy(f, directory / f.name)
    (directory / "pytorch_model.bin").write_bytes(b"")


def _provoke(label: str, command_cell: str, train, train_cwd: pathlib.Path, cwd: pathlib.Path):
    setup = ERROR_SETUP.get(label, {})
    words = shlex.split(re.search(r"`([^`]+)`", command_cell).group(1))
    env = {}
    while "=" in words[0] and not words[0].startswith("python"):
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    assert words[:2] == ["python", "main.py"], command_cell
    args = words[2:]
    if "files" in setup:
        args.insert(0, _write_configs(cwd / "configs", setup["files"]))
    if setup.get("torch_model"):
        _torch_model(cwd / "torch_model")
    if "checkpoint" in setup:
        first, second = train.result()
        assert first.returncode == 0 and second.returncode == 0, (first.stderr + second.stderr)[-3000:]
        if setup["checkpoint"] == "shared":
            cwd = train_cwd
        else:
            shutil.copytree(train_cwd / "results" / "teacher_sft", cwd / "results" / "teacher_sft")
    return _main(args, cwd, devices=setup.get("devices", 1), env=env), cwd


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every command, error row and schema check, two children at a time."""
    new = tmp_path_factory.mktemp
    with ThreadPoolExecutor(max_workers=2) as pool:
        train_cwd = new("train")
        train = pool.submit(_train_twice, train_cwd)
        commands = {}
        for command, case in CASES.items():
            if command != PHASE1:
                cwd = new("cmd")
                commands[command] = pool.submit(_main, _case_args(command, case, cwd / "configs"), cwd,
                                                devices=case.devices)
        schema = []
        for file, old, replacement, command in SCHEMA_CHECKS:
            directory = new("schema")
            files = doc_configs()
            assert old in files[file], (file, old)
            files[file] = files[file].replace(old, replacement)
            schema.append(pool.submit(_main, [_write_configs(directory, files), *command.split()], directory))
        # rows that need the trained checkpoint go last: they wait for it
        rows = sorted(error_rows().items(), key=lambda kv: "checkpoint" in ERROR_SETUP.get(kv[0], {}))
        errors = {label: pool.submit(_provoke, label, command_cell, train, train_cwd, new("err"))
                  for label, (command_cell, _) in rows if label not in NOT_PROVOKED}
        return dict(train=train.result(), train_cwd=train_cwd,
                    commands={c: f.result() for c, f in commands.items()},
                    schema=[f.result() for f in schema], errors={k: f.result() for k, f in errors.items()})


def test_every_fenced_command_is_tested_or_listed():
    commands = doc_commands()
    assert len(commands) >= 25, commands
    missing = [c for c in commands if c not in CASES and c not in PRODUCTION_ONLY]
    assert not missing, f"commands in docs/configuration.md with no entry in CASES or PRODUCTION_ONLY: {missing}"
    stale = [c for c in (*CASES, *PRODUCTION_ONLY) if c not in commands]
    assert not stale, f"CASES / PRODUCTION_ONLY entries the guide no longer has: {stale}"
    assert all(reason.strip() for reason in PRODUCTION_ONLY.values())


def test_the_guide_states_what_the_tests_add_and_quotes_what_they_check():
    for command, case in CASES.items():
        if case.extra:
            assert " ".join(case.extra) in TEXT, f"the guide does not say {command} runs with {case.extra}"
        for quoted in case.expect:
            assert quoted in TEXT, f"{quoted!r} is checked in the output but not quoted in the guide"


def test_the_walkthrough_quotes_the_run_file():
    """Its teacher_rcl.yaml block is the file without its comments."""
    block = TEXT.split("### Base Configuration Structure", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    lines = (ROOT / "configs" / "run" / "teacher_rcl.yaml").read_text().splitlines()
    assert block.splitlines() == [lines[0], *(l for l in lines[1:] if l.strip() and not l.startswith("#"))]


def test_sections_are_atlas_s():
    headings = [h.strip() for h in re.findall(r"^#+ (.+)$", TEXT, re.M)]
    assert [s for s in ATLAS_SECTIONS if s not in headings] == []
    labels = error_rows()
    assert [e for e in ATLAS_ERRORS if e not in labels] == []
    for must in ("Batch does not divide", "Mesh larger than the devices", "Checkpoint of another model",
                 "Pickle checkpoint", "Hub unreachable offline"):
        assert must in labels
    assert "../README.md#from-the-original-atlas-configs" in TEXT


@pytest.mark.parametrize("command", [c for c in CASES if c != PHASE1])
def test_command(runs, command):
    result = runs["commands"][command]
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{command} exited {result.returncode}:\n{output[-3000:]}"
    assert "Traceback" not in output, output[-3000:]
    if CASES[command].dry or "dry_run=true" in command:
        assert "== atlas_jax run plan" in result.stdout
    for quoted in CASES[command].expect:
        assert quoted in result.stdout, f"{command}: {quoted!r} not in\n{result.stdout[-3000:]}"


def test_production_training_trains_and_resumes(runs):
    first, second = runs["train"]
    for result in (first, second):
        assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
        assert "Traceback" not in result.stdout + result.stderr
    out = runs["train_cwd"] / "results" / "teacher_sft"
    assert (out / "checkpoints" / "1").is_dir() and (out / "hf" / "config.json").is_file()
    assert (out / "config.yaml").is_file() and (out / "metrics.jsonl").is_file()
    assert list(out.glob("events.out.tfevents*"))
    assert "resumed from" not in first.stdout
    assert re.search(r"^resumed from \S+/results/teacher_sft/checkpoints at step 1$", second.stdout, re.M)
    try:
        import wandb  # noqa: F401
    except ImportError:
        warning = "report_to has wandb but W&B is unavailable (No module named 'wandb'); continuing without it"
        assert warning in first.stdout + first.stderr and warning in TEXT


def _leading(line: str, n: int = 8) -> list[str]:
    """The first n words, up to the first elided one ('…')."""
    words = []
    for word in line.split()[:n]:
        if "…" in word or "..." in word:
            break
        words.append(word)
    return words


@pytest.mark.parametrize("label", list(error_rows()))
def test_error_row(runs, label):
    command_cell, prints_cell = error_rows()[label]
    if label in NOT_PROVOKED:
        assert "`" not in prints_cell, f"{label}: a quoted line the suite never provokes"
        return
    result, cwd = runs["errors"][label]
    quoted = re.search(r"`([^`]+)`", prints_cell).group(1)
    stderr = result.stderr.replace(str(cwd.resolve()), "$PWD").replace(str(cwd), "$PWD")
    expected = _leading(quoted)
    if label in TRACEBACKS:
        assert result.returncode != 0 and "Traceback" in stderr, stderr[-3000:]
        line = next((l for l in stderr.splitlines() if l.startswith(expected[0])), "")
    else:
        assert result.returncode == 2, f"{label}: exit {result.returncode}\n{result.stdout[-1500:]}{stderr[-1500:]}"
        assert "Traceback" not in stderr, stderr[-3000:]
        lines = [l for l in stderr.splitlines() if l.startswith("error:")]
        assert len(lines) == 1, stderr[-3000:]
        line = lines[0]
    assert line.split()[:len(expected)] == expected, f"{label}: printed\n{line}\nguide says\n{quoted}"


@pytest.mark.parametrize("index", range(len(SCHEMA_CHECKS)))
def test_schema_checks_the_new_files(runs, index):
    result = runs["schema"][index]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert lines[0] in TEXT, f"the guide does not quote: {lines[0]}"
