"""ATLAS / TRL / HF Trainer option names -> the atlas_jax keys that replace them.

The one table behind README's "From the original ATLAS configs" and behind the hint an
unknown config key gets (atlas_jax/errors.py): `model.torch_dtype=bfloat16` fails with
"...; use model.dtype", `trainer.learnig_rate` with "...; did you mean trainer.learning_rate?".
Names that are already ours under some group (`learning_rate` -> `trainer.learning_rate`)
come from config.py's dataclasses, not from this table, so neither can drift from the other;
tests/test_errors.py checks that every name in the README table resolves here.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
from typing import Optional

from atlas_jax import config as config_lib


@dataclasses.dataclass(frozen=True)
class Replacement:
    """What replaces a foreign option: our keys (dotted from the root; none when nothing is
    needed) and the hint's text, which says more where the mapping is not 1:1."""

    keys: tuple[str, ...]
    text: str


def _shown(keys) -> list[str]:
    return [key if "." in key else f"{key} (top level)" for key in keys]


def _use(*keys: str, note: str = "") -> Replacement:
    return Replacement(keys, f"use {' and '.join(_shown(keys))}" + (f" ({note})" if note else ""))


_DERIVED_ACCUMULATION = Replacement(
    ("batch.global_batch_size", "batch.micro_batch_size"),
    "derived from batch.global_batch_size / (batch.micro_batch_size x data-parallel ways): set those instead")
_NO_VLLM = Replacement((), "none needed: generation is a jitted KV-cache sampler on the training mesh")
_REMAT = _use("model.remat", note=" | ".join(config_lib.REMAT_POLICIES))

# Foreign names that are not ours under any group. Names that are (learning_rate, beta,
# dataset_id_or_path, load_in_4bit, seed, ...) resolve through `our_keys` instead.
RENAMED: dict[str, Replacement] = {
    # launch.sh / DeepSpeed
    "num_gpus": Replacement(("mesh.fsdp",), "use mesh=8gpu (a configs/mesh preset) or mesh.fsdp=N; "
                                            "multi-host: launchers/"),
    "deepspeed": _use("mesh.fsdp", "trainer.offload", note="ZeRO-3-like sharding, host offload"),
    "zero_stage": _use("mesh.fsdp", "trainer.offload", note="ZeRO-3-like sharding, host offload"),
    # batch sizes: the global batch is fixed, accumulation follows from the devices
    "per_device_train_batch_size": _use("batch.micro_batch_size", note="per data-parallel shard; "
                                        "the optimizer step's batch is batch.global_batch_size"),
    "per_device_eval_batch_size": _use("batch.eval_batch_size", note="global, not per device"),
    "train_batch_size": _use("batch.global_batch_size"),
    "gradient_accumulation_steps": _DERIVED_ACCUMULATION,
    "backprop_accumulation_steps": _DERIVED_ACCUMULATION,
    "backprop_accumulation_micro_batch_size": _use("batch.micro_batch_size"),
    # model
    "torch_dtype": _use("model.dtype", note="compute; model.param_dtype for the stored weights"),
    "bf16": Replacement(("model.dtype",), "use model.dtype=bfloat16"),
    "fp16": Replacement(("model.dtype",), "use model.dtype=float16"),
    "gradient_checkpointing": _REMAT,
    "gradient_checkpointing_kwargs": _REMAT,
    "attn_implementation": Replacement((), "none needed: attention is XLA's, a block of queries at a "
                                           "time on long sequences (atlas_jax/models/attention.py)"),
    "use_peft": Replacement(("model.lora.rank",), "LoRA is on when model.lora.rank > 0: set model.lora.rank "
                                                  "(and model.lora.alpha)"),
    "peft_config": _use("model.lora.rank", "model.lora.alpha"),
    "lora_r": _use("model.lora.rank"),
    "r": _use("model.lora.rank"),
    "lora_alpha": _use("model.lora.alpha"),
    "lora_dropout": _use("model.lora.dropout"),
    "lora_target_modules": _use("model.lora.target_modules"),
    "load_in_8bit": _use("model.load_in_4bit", note="the frozen base in NF4; there is no 8-bit mode"),
    # data (TRL's ScriptArguments, SFTConfig)
    "max_seq_length": _use("data.max_length"),
    "dataset_name": _use("data.dataset_id_or_path"),
    "dataset_train_split": _use("data.split"),
    "dataset_test_split": _use("data.eval_split"),
    # checkpoints, evaluation
    "resume_from_checkpoint": _use("resume_from"),
    "eval_strategy": _use("trainer.eval_steps", note="evaluation runs every N steps"),
    "evaluation_strategy": _use("trainer.eval_steps", note="evaluation runs every N steps"),
    "save_strategy": _use("trainer.save_steps", note="checkpoints are written every N steps"),
    "logging_strategy": _use("trainer.logging_steps", note="metrics are logged every N steps"),
    # generation: no separate inference server
    "use_vllm": _NO_VLLM,
    "use_vllm_server": _NO_VLLM,
    "num_vllm_clients": _NO_VLLM,
    "use_ray": _NO_VLLM,
}
PREFIXES: dict[str, Replacement] = {"vllm_": _NO_VLLM, "ray_": _NO_VLLM}


def _fields(schema, prefix: str = ""):
    for field in dataclasses.fields(schema):
        key = f"{prefix}{field.name}"
        yield field.name, key
        default = field.default_factory() if field.default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(default):
            yield from _fields(type(default), f"{key}.")


@functools.cache
def our_keys() -> dict[str, tuple[str, ...]]:
    """Field name -> every dotted key of TrainConfig that ends in it (`name` is in each group)."""
    keys: dict[str, list[str]] = {}
    for name, key in _fields(config_lib.TrainConfig):
        keys.setdefault(name, []).append(key)
    return {name: tuple(found) for name, found in keys.items()}


def _schema(group: str):
    """The dataclass at dotted `group` ("" = the root), or None when there is none."""
    schema = config_lib.TrainConfig
    for part in filter(None, group.split(".")):
        field = {f.name: f for f in dataclasses.fields(schema)}.get(part)
        if field is None or field.default_factory is dataclasses.MISSING:
            return None
        schema = type(field.default_factory())
        if not dataclasses.is_dataclass(schema):
            return None
    return schema


def replacement(name: str) -> Optional[Replacement]:
    """Ours for a foreign option name (ATLAS, TRL, HF Trainer, PEFT), or None if unknown."""
    if name in RENAMED:
        return RENAMED[name]
    for prefix, found in PREFIXES.items():
        if name.startswith(prefix):
            return found
    if name in our_keys():
        keys = our_keys()[name]
        return Replacement(keys, f"did you mean {' or '.join(_shown(keys))}?")
    return None


def hint(full_key: str) -> Optional[str]:
    """The way out for an unknown config key such as `model.torch_dtype`: our key(s) for a
    foreign name or one at the wrong level, else the near misses in its group, else in any
    group; None when nothing is close."""
    group, _, name = full_key.rpartition(".")
    found = replacement(name)
    if found is not None:
        return found.text
    schema = _schema(group)
    if schema is not None:
        close = difflib.get_close_matches(name, [f.name for f in dataclasses.fields(schema)], n=1)
        if close:
            return f"did you mean {_shown([f'{group}.{close[0]}' if group else close[0]])[0]}?"
    close = difflib.get_close_matches(name, list(our_keys()), n=1)
    if close:
        return f"did you mean {' or '.join(_shown(our_keys()[close[0]]))}?"
    return None
