"""Unknown config keys teach the mapping: ATLAS/TRL names get ours, near misses get a guess."""

from __future__ import annotations

import pathlib
import re

import pytest

from atlas_jax.config import UsageError

from atlas_jax import migration
from atlas_jax.config import compose
from atlas_jax.errors import one_line
from tests.test_config import _cli

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _readme_atlas_names() -> list[str]:
    """The backticked option names in the first column of README's ATLAS mapping table."""
    section = README.read_text().split("## From the original ATLAS configs", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")][2:]  # past header, rule
    names = []
    for row in rows:
        for span in re.findall(r"`([^`]+)`", row.split("|")[1]):
            if re.fullmatch(r"[A-Za-z_]\w*\*?", span):
                names.append(span.replace("*", "gpu_memory_utilization"))
            else:  # `./launch.sh <num_gpus> ...`
                names += re.findall(r"<(\w+)>", span)
    return names


def test_every_atlas_name_in_the_readme_table_has_a_replacement():
    names = _readme_atlas_names()
    assert len(names) >= 40 and "torch_dtype" in names and "num_gpus" in names
    assert [n for n in names if migration.replacement(n) is None] == []


def test_the_table_names_only_keys_that_exist():
    ours = {key for keys in migration.our_keys().values() for key in keys}
    for name, found in {**migration.RENAMED, **migration.PREFIXES}.items():
        assert set(found.keys) <= ours, name
        assert name not in migration.our_keys(), f"{name} is ours already: drop it from RENAMED"


@pytest.mark.parametrize("key, hint", [
    ("model.torch_dtype", "use model.dtype"),
    ("bf16", "use model.dtype=bfloat16"),
    ("trainer.lora_r", "use model.lora.rank"),
    ("model.lora.r", "use model.lora.rank"),
    ("trainer.vllm_gpu_memory_utilization", "none needed"),
    ("model.load_in_4bit_", "did you mean model.load_in_4bit?"),
    ("trainer.learnig_rate", "did you mean trainer.learning_rate?"),
    ("data.learnig_rate", "did you mean trainer.learning_rate?"),  # no near miss in data: any group
    ("model.dataset_id_or_path", "did you mean data.dataset_id_or_path?"),
    ("model.seed", "did you mean seed (top level)?"),
    ("sed", "did you mean seed (top level)?"),
])
def test_hint(key, hint):
    assert migration.hint(key).startswith(hint)


def test_nothing_close_gets_no_hint():
    assert migration.hint("trainer.foo") is None and migration.hint("zzzz") is None


@pytest.mark.parametrize("override, tail", [
    ("model.torch_dtype=bfloat16", r"Key 'torch_dtype' not in 'ModelConfig'; use model\.dtype\b"),
    ("per_device_train_batch_size=2", r"; use batch\.micro_batch_size \(per data-parallel shard"),
    ("trainer.gradient_accumulation_steps=4",
     r"; derived from batch\.global_batch_size / \(batch\.micro_batch_size x data-parallel ways\)"),
    ("trainer.learnig_rate=1e-5", r"^error: trainer\.learnig_rate: .*; did you mean trainer\.learning_rate\?$"),
    ("model.max_seq_length=4096", r"^error: model\.max_seq_length: .*; use data\.max_length$"),
    ("trainer.load_in_4bit=true", r"; did you mean model\.load_in_4bit\?$"),
])
def test_cli_unknown_key_is_one_line_with_the_way_out(override, tail):
    result = _cli("+run=teacher_sft", override)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert re.search(tail, lines[0]), lines[0]


def test_unknown_key_in_a_yaml_file_gets_the_same_hint(tmp_path):
    (tmp_path / "trainer").mkdir()
    (tmp_path / "trainer" / "atlas.yaml").write_text("name: atlas\nper_device_train_batch_size: 3\n")
    with pytest.raises(Exception) as raised:
        compose(["+run=teacher_sft", "trainer=atlas", f"hydra.searchpath=[file://{tmp_path}]"])
    message = one_line(raised.value)
    assert message.startswith("trainer.per_device_train_batch_size: Key 'per_device_train_batch_size' not in")
    assert "(in configs/trainer/atlas.yaml); use batch.micro_batch_size" in message



def test_out_of_memory_is_one_line_with_the_knobs(monkeypatch, capsys):
    """XLA's RESOURCE_EXHAUSTED from inside a recipe becomes one line: the figure and the
    knobs for this run, most effective first. (The SFT issue's 8 x 16k-token command no
    longer runs out: training attention runs in query blocks on CPU, tests/models.)"""
    import main
    from atlas_jax import recipes
    from atlas_jax.config import compose

    def exhausted(cfg, mesh):
        raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 148686641696 bytes.\nmore")

    monkeypatch.setattr(recipes, "run", exhausted)
    cfg = compose(["+run=teacher_sft", "model=tiny", "data=synthetic_math_sft", "batch.global_batch_size=64",
                   "batch.micro_batch_size=8"])
    with pytest.raises(UsageError) as error:
        main._run(cfg)
    message = str(error.value)
    assert "\n" not in message and message.startswith("out of device memory (RESOURCE_EXHAUSTED: Out of memory "
                                                        "allocating 148686641696 bytes.)")
    assert message.index("batch.micro_batch_size=1 (is 8") < message.index("data.max_length (is 16384)")
