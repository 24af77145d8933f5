"""Typed configuration: one frozen dataclass per Hydra group, plus the root.

Every default lives here exactly once; YAML files only select and override. The root
schema is registered in Hydra's ConfigStore as `train_schema` and is the first entry
of `configs/train.yaml`'s defaults, so every group file is merged into (and checked
against) its dataclass: an unknown key or a wrong type fails at composition.
Cross-field rules that need more than one value live in `validate`.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Optional, Sequence, Union

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf


class UsageError(ValueError):
    """A problem with what the user asked for (config, data file, checkpoint): main.py
    prints its message as one line and exits 2, without a traceback."""


class ConfigError(UsageError):
    """A configuration problem; its message is one line naming the key and value."""


@dataclasses.dataclass(frozen=True)
class RopeScalingConfig:
    """Llama 3 style frequency-dependent RoPE scaling (HF `rope_scaling`); "none" = off."""

    rope_type: str = "none"  # none | llama3
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters; rank 0 means full fine-tuning."""

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0  # on the adapters' input, in training updates only (models/lora.py)
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture (as in the HF config.json of the family) and numerics."""

    # name, model_name_or_path and tokenizer say where the weights and tokens come from, not
    # what the model computes: equality leaves them out, so checkpoints of one architecture
    # share compiled programs (a model's config is part of each program's cache key)
    name: str = dataclasses.field(default="tiny", compare=False)
    family: str = "qwen3"  # llama | qwen2 | qwen3 — selects the checkpoint key table
    # HF dir or hub id; None = random init
    model_name_or_path: Optional[str] = dataclasses.field(default=None, compare=False)
    # None = the model's own, or the built-in one
    tokenizer: Optional[str] = dataclasses.field(default=None, compare=False)
    vocab_size: int = 1024
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: Optional[int] = None  # None = hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    # Not Optional: a nested frozen node created by a YAML merge would be read-only.
    rope_scaling: RopeScalingConfig = dataclasses.field(default_factory=RopeScalingConfig)
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = True
    attention_bias: bool = False  # q/k/v projection biases (Qwen2, Qwen2.5)
    qk_norm: bool = False  # per-head RMSNorm on q and k (Qwen3)
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    remat: str = "none"
    scan_layers: bool = True
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
    load_in_4bit: bool = False

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where examples come from and how they become token batches."""

    name: str = "synthetic_math_sft"
    kind: str = "sft"  # sft | rl
    dataset_id_or_path: str = "synthetic_math"  # built-in, HF hub id, or local file
    data_files: Optional[str] = None  # file inside a hub dataset, e.g. training/sft.jsonl
    dataset_config: Optional[str] = None  # hub config name, e.g. "main" for openai/gsm8k
    split: str = "train"
    eval_split: Optional[str] = None  # a named source split for eval; None = carve eval_split_ratio
    split_seed: int = 0  # the train/eval carve; apart from the run seed so eval stays fixed
    synthetic_seed: int = 0  # which synthetic problems (the built-in source only)
    format: str = "teaching"  # teaching | prompt_completion (SFT)
    problem_field: str = "problem_text"
    approach_field: str = "student_approach"
    diagnosis_field: str = "teacher_diagnosis"
    teaching_field: str = "teacher_teaching"
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    answer_field: str = "ground_truth"
    answer_format: str = "plain"  # plain | gsm8k (final number after '####')
    system_prompt: Optional[str] = None  # teaching: None = the built-in prompt; prompt_completion: None = none
    completion_only_loss: bool = True
    num_synthetic_examples: int = 2000
    max_length: int = 2048
    truncation: str = "truncate"  # truncate | drop
    packing: bool = False
    packing_strategy: str = "first_fit"  # first_fit | best_fit
    packing_bins: int = 16  # rows packed at once; more bins = less padding, more cross-epoch mixing
    pad_to_multiple_of: int = 64
    max_train_samples: Optional[int] = None
    max_eval_samples: Optional[int] = None
    eval_split_ratio: float = 0.05
    shuffle: bool = True
    max_bad_fraction: float = 0.05


@dataclasses.dataclass(frozen=True)
class TrainerConfig:
    """Optimisation, logging and checkpointing; GRPO fields are ignored by SFT."""

    name: str = "sft"
    max_steps: int = -1  # > 0 overrides num_train_epochs
    num_train_epochs: float = 1.0
    learning_rate: float = 1e-5
    lr_scheduler_type: str = "cosine"
    warmup_ratio: float = 0.0
    warmup_steps: int = 0  # > 0 overrides warmup_ratio
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    logging_steps: int = 10
    # Any step may be saved, also inside an RL rollout: the updates left of that rollout are
    # saved with it (rl/updates.py), so a resume (or SIGTERM's save) continues exactly.
    save_steps: int = 500
    save_total_limit: int = 2  # newest checkpoints kept (<= 0: all), plus the best one
    eval_steps: int = 500
    save_final_model: bool = False  # write <output_dir>/hf at the end of the run
    # The best checkpoint, as in HF Trainer: an eval metric ("eval/loss", "eval/accuracy_with_guidance";
    # the eval/ prefix may be left out), None = off. Kept out of save_total_limit's rotation and
    # recorded in checkpoints/best.json; checkpoint_step=best picks it. Needs eval data and
    # save_steps a multiple of eval_steps (every checkpoint is ranked).
    metric_for_best_model: Optional[str] = None
    greater_is_better: Optional[bool] = None  # None: False for names ending in 'loss', else True
    load_best_model_at_end: bool = False  # save_final_model exports the best checkpoint, not the last
    report_to: tuple[str, ...] = ("tensorboard",)
    peak_flops_per_device: Optional[float] = None  # None = table lookup (CPU: unknown)
    offload: str = "none"  # none | optimizer | optimizer_and_frozen
    # Memory one device may use, in GiB; None = the device's own (GPU/TPU: bytes_limit less what
    # is in use; CPU: MemAvailable shared by the local devices). A run whose compiled update step
    # (or generation program) needs more is refused before anything is loaded (atlas_jax/memory.py).
    memory_limit_gb: Optional[float] = None
    # GRPO / RCL
    num_generations: int = 8
    beta: float = 0.04
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    epsilon: float = 0.2
    epsilon_high: Optional[float] = None  # None = epsilon
    loss_type: str = "grpo"
    scale_rewards: str = "group"
    num_iterations: int = 1
    mask_truncated_completions: bool = False
    # Pack the rollout's prompt + completion rows for the update (atlas_jax/rl/packing.py): the
    # update and the old/reference log-prob passes follow the tokens sampled, not the budget.
    padding_free: bool = False  # opt-in until the recipes' runs are re-measured with it
    student_model: Optional[str] = None  # model preset name or HF path; None = reference teacher
    max_prompt_length: int = 512
    max_completion_length: int = 256
    sync_ref_model: bool = False
    ref_model_mixup_alpha: float = 0.9
    ref_model_sync_steps: int = 64
    generation_aggregation_steps: int = 1
    save_completions_probability: float = 0.0


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    """Reward selection, its weights, and the RCL prompt templates."""

    name: str = "adaptive_teaching"  # a name registered in atlas_jax.rl.rewards
    efficiency_weight: float = 1.0  # w: weight of the short-guidance bonus 100 / (100 + tokens)
    baseline_threshold: float = 0.5  # tau: accuracy with guidance needed for a positive reward
    degradation_penalty_multiplier: float = 2.0  # m: penalty per unit of accuracy lost
    max_probe_tokens: int = 500  # budget of the student's diagnostic of its approach
    # str.format templates, text in configs/reward/*.yaml; placeholders in braces.
    probe_template: str = ""  # {problem}
    teacher_template: str = ""  # {problem} {approach}; guidance inside <teaching></teaching>
    student_with_teaching_template: str = ""  # {problem} {teaching}; answer in \boxed{}
    student_baseline_template: str = ""  # {problem}; answer in \boxed{}


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device layout. -1 on one axis means all remaining devices."""

    name: str = "auto"
    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    platform: str = "any"  # the accelerator the preset is written for: any | cpu | gpu | tpu
    num_processes: int = 1  # hosts the preset expects


@dataclasses.dataclass(frozen=True)
class BatchConfig:
    """Global batch (never depends on devices) and the per-shard micro-batch."""

    name: str = "default"
    global_batch_size: int = 8  # sequences (SFT) or completions (RL) per optimizer step
    micro_batch_size: int = 1  # per data-parallel shard per accumulation step; -1 = no accumulation
    eval_batch_size: int = 8


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """Multi-host runtime; left empty, SLURM/TPU environments are detected."""

    coordinator_address: Optional[str] = None
    num_processes: Optional[int] = None
    process_id: Optional[int] = None
    initialization_timeout: int = 300


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The root: one run."""

    run: Optional[str] = None  # set by +run=NAME
    output_dir: str = "results/${run}"
    seed: int = 0
    resume_from: Optional[str] = None
    checkpoint: Optional[str] = None
    checkpoint_step: Optional[Union[int, str]] = None  # a step, "best" (checkpoints/best.json), None = latest
    export_dir: Optional[str] = None
    dry_run: bool = False
    # JAX's persistent compilation cache: a second run of the same shapes (a resume, the
    # quickstart again, evaluate after training) loads its programs instead of compiling
    # them; null turns it off. The JAX_COMPILATION_CACHE_DIR environment variable wins.
    compilation_cache_dir: Optional[str] = "~/.cache/atlas_jax/xla"
    # Host memory in transparent huge pages for glibc's large blocks (atlas_jax/hostmem.py):
    # main.py re-executes itself once with GLIBC_TUNABLES=glibc.malloc.hugetlb=1. On by
    # default for SFT (run/teacher_sft.yaml), where XLA:CPU's per-step temporaries are refaulted.
    huge_pages: bool = False
    # +run=quickstart only: overrides added to each of its phases, e.g. a smoke run's
    # 'phase_overrides=["trainer.max_steps=3"]'
    phase_overrides: tuple[str, ...] = ()
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    trainer: TrainerConfig = dataclasses.field(default_factory=TrainerConfig)
    reward: RewardConfig = dataclasses.field(default_factory=RewardConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    batch: BatchConfig = dataclasses.field(default_factory=BatchConfig)
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)


RUNS = ("teacher_sft", "teacher_rcl", "grpo", "evaluate", "export", "quickstart")
DTYPES = ("float32", "bfloat16", "float16")
# What the backward pass keeps from each layer's forward; the rest is recomputed
# (models/decoder.py maps each name to a jax.checkpoint policy).
REMAT_POLICIES = ("none", "save_weight_matmuls", "save_all_matmuls", "save_layer_inputs")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SCHEDULES = ("constant", "cosine", "linear")
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALE_REWARDS = ("group", "batch", "none")
OFFLOAD = ("none", "optimizer", "optimizer_and_frozen")

_GROUPS = {
    "model": ModelConfig,
    "data": DataConfig,
    "trainer": TrainerConfig,
    "reward": RewardConfig,
    "mesh": MeshConfig,
    "batch": BatchConfig,
}


def _writable(node: DictConfig) -> DictConfig:
    # Frozen dataclasses become read-only OmegaConf nodes, which Hydra could not merge
    # group files into. The freeze is restored when `to_config` builds the dataclasses.
    node._set_flag("readonly", None)
    for key in node.keys():
        child = node._get_node(key)
        if isinstance(child, DictConfig):
            _writable(child)
    return node


def register() -> None:
    """Registers the schemas in Hydra's ConfigStore (idempotent)."""
    store = ConfigStore.instance()
    store.store(name="train_schema", node=_writable(OmegaConf.structured(TrainConfig)))
    for group, schema in _GROUPS.items():
        store.store(group=f"schema/{group}", name=group, node=_writable(OmegaConf.structured(schema)))


register()


def _hashable(value: Any) -> Any:
    """OmegaConf returns lists for tuple fields; configs are static jit arguments, so they
    must hash: lists become tuples, nested dataclasses are rebuilt the same way."""
    if dataclasses.is_dataclass(value):
        return dataclasses.replace(value, **{f.name: _hashable(getattr(value, f.name))
                                             for f in dataclasses.fields(value)})
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(v) for v in value)
    return value


def to_config(raw: DictConfig, overrides: Sequence[str] = ()) -> TrainConfig:
    """Composed Hydra config -> validated, frozen, hashable TrainConfig.

    `overrides` are the command line's (Hydra's task overrides): evaluate and export take
    what the command line does not set from the training run's saved config.yaml.
    """
    raw = inherit_training_config(raw, overrides)
    _reject_unknown_keys(raw, TrainConfig)
    cfg = _hashable(OmegaConf.to_object(raw))
    if not isinstance(cfg, TrainConfig):
        raise ConfigError(f"config root is {type(cfg).__name__}, expected TrainConfig (is 'train_schema' first in defaults?)")
    validate(cfg)
    return cfg


# What evaluate/export take from the training run: the model as trained (architecture,
# checkpoint path, tokenizer, LoRA/QLoRA, dtype), the student and generation budgets
# (trainer, reward), the eval batch and the seed (a LoRA base at random init is rebuilt
# from it). The data only when it was RL prompts: an SFT run's traces are no eval set.
INHERITED = ("model", "trainer", "reward", "batch", "seed", "data")
_INFERENCE_RUNS = ("evaluate", "export")


def _override_key(override: str) -> str:
    """'+model.lora.rank=4' -> 'model.lora.rank'; 'model=tiny' -> 'model'."""
    return override.split("=", 1)[0].lstrip("+~").strip()


def training_config_path(checkpoint: str) -> pathlib.Path:
    """<run>/config.yaml for '<run>/checkpoints' or '<run>/checkpoints/<step>'."""
    path = pathlib.Path(checkpoint).expanduser().resolve()
    if path.name.isdigit():
        path = path.parent
    return path.parent / "config.yaml"


def inherit_training_config(raw: DictConfig, overrides: Sequence[str]) -> DictConfig:
    """For +run=evaluate/export: the INHERITED sections from the checkpoint's run, with the
    command line's own overrides (`model=...`, `model.dtype=...`) applied on top."""
    if raw.get("run") not in _INFERENCE_RUNS or not raw.get("checkpoint"):
        return raw
    path = training_config_path(raw.checkpoint)
    if not path.is_file():
        print(f"{raw.run}: no config.yaml beside {raw.checkpoint}; the model and student are the "
              "command line's", flush=True)
        return raw
    try:
        saved = OmegaConf.merge(_writable(OmegaConf.structured(TrainConfig)), OmegaConf.load(path))
    except Exception as error:  # noqa: BLE001 - a foreign or damaged file: one line either way
        raise ConfigError(f"{path}: not a training config this version can read "
                          f"({str(error).splitlines()[0] if str(error) else type(error).__name__})") from None
    keys = [_override_key(o) for o in overrides]
    merged = raw.copy()
    taken = []
    for section in INHERITED:
        if section in keys:  # a group or value the command line chose outright
            continue
        if section == "data" and saved.data.kind != "rl":
            continue
        value = saved[section]
        if isinstance(value, DictConfig):
            value = value.copy()
            for key in keys:  # model.dtype=... on the command line wins over the saved model
                if key.startswith(section + "."):
                    OmegaConf.update(value, key[len(section) + 1:], OmegaConf.select(raw, key), merge=False)
        merged[section] = value
        taken.append(section)
    own = [k for k in keys if k.split(".")[0] in INHERITED]
    print(f"{raw.run}: {', '.join(taken)} from {path}"
          + (f"; command line: {', '.join(own)}" if own else ""), flush=True)
    return merged


def _reject_unknown_keys(node: DictConfig, schema, prefix: str = "") -> None:
    """Keys added with `+group.key=...` that the schema lacks: one line (with the ATLAS
    name's replacement or a near miss), not a FrozenInstanceError from the dataclass."""
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key in node.keys():
        full = f"{prefix}{key}"
        if key not in fields:
            if prefix == "" and key == "hydra":
                continue
            from atlas_jax import migration  # it reads this module's dataclasses

            hint = migration.hint(full)
            raise ConfigError(f"{full}: Key '{key}' not in '{schema.__name__}'" + (f"; {hint}" if hint else ""))
        child = node._get_node(key)
        if isinstance(child, DictConfig) and dataclasses.is_dataclass(fields[key].default_factory
                                                                      if callable(fields[key].default_factory)
                                                                      else None):
            _reject_unknown_keys(child, fields[key].default_factory, f"{full}.")


def _choice(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(map(str, allowed))}")


def _positive(key: str, value: float, *, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key}={value} must be {'>= 0' if allow_zero else '> 0'}")


def validate(cfg: TrainConfig) -> None:
    """Cross-field checks that need no devices; raises ConfigError (one line)."""
    if cfg.run is None:
        raise ConfigError(f"no run selected: add +run=NAME with NAME one of {', '.join(RUNS)}")
    _choice("run", cfg.run, RUNS)
    m, t, d, b, r = cfg.model, cfg.trainer, cfg.data, cfg.batch, cfg.reward
    _choice("model.dtype", m.dtype, DTYPES)
    _choice("model.param_dtype", m.param_dtype, DTYPES)
    _choice("model.remat", m.remat, REMAT_POLICIES)
    _choice("model.family", m.family, ("llama", "qwen2", "qwen3"))
    _choice("model.rope_scaling.rope_type", m.rope_scaling.rope_type, ("none", "llama3"))
    if m.num_attention_heads % m.num_key_value_heads:
        raise ConfigError(
            f"model.num_attention_heads={m.num_attention_heads} is not a multiple of "
            f"model.num_key_value_heads={m.num_key_value_heads}"
        )
    _positive("model.lora.rank", m.lora.rank, allow_zero=True)
    for name in m.lora.target_modules:
        _choice("model.lora.target_modules", name, LORA_TARGETS)
    if m.lora.rank and not m.lora.target_modules:
        raise ConfigError("model.lora.target_modules=[] is empty: name the projections to adapt")
    if not 0.0 <= m.lora.dropout < 1.0:
        raise ConfigError(f"model.lora.dropout={m.lora.dropout} must be in [0, 1)")
    if m.lora.dropout > 0 and m.lora.rank == 0:
        raise ConfigError(f"model.lora.dropout={m.lora.dropout} drops adapter inputs: set model.lora.rank > 0")
    if m.load_in_4bit and m.lora.rank == 0:
        raise ConfigError("model.load_in_4bit=true needs adapters to train: set model.lora.rank > 0")
    _choice("data.kind", d.kind, ("sft", "rl"))
    _choice("data.truncation", d.truncation, ("truncate", "drop"))
    _positive("data.max_length", d.max_length)
    _positive("data.pad_to_multiple_of", d.pad_to_multiple_of)
    _choice("data.format", d.format, ("teaching", "prompt_completion"))
    _choice("data.answer_format", d.answer_format, ("plain", "gsm8k"))
    _choice("data.packing_strategy", d.packing_strategy, ("first_fit", "best_fit"))
    _positive("data.packing_bins", d.packing_bins)
    _positive("data.num_synthetic_examples", d.num_synthetic_examples)
    for key in ("max_train_samples", "max_eval_samples"):
        if getattr(d, key) is not None:
            _positive(f"data.{key}", getattr(d, key))
    if not 0.0 <= d.eval_split_ratio < 1.0:
        raise ConfigError(f"data.eval_split_ratio={d.eval_split_ratio} must be in [0, 1)")
    if not 0.0 <= d.max_bad_fraction <= 1.0:
        raise ConfigError(f"data.max_bad_fraction={d.max_bad_fraction} must be in [0, 1]")
    _choice("trainer.lr_scheduler_type", t.lr_scheduler_type, SCHEDULES)
    _choice("trainer.loss_type", t.loss_type, LOSS_TYPES)
    _choice("trainer.scale_rewards", t.scale_rewards, SCALE_REWARDS)
    _choice("trainer.offload", t.offload, OFFLOAD)
    if t.memory_limit_gb is not None:
        _positive("trainer.memory_limit_gb", t.memory_limit_gb)
    _positive("trainer.learning_rate", t.learning_rate, allow_zero=True)
    if not 0.0 <= t.warmup_ratio <= 1.0:
        raise ConfigError(f"trainer.warmup_ratio={t.warmup_ratio} must be in [0, 1]")
    if t.max_steps <= 0 and t.num_train_epochs <= 0:
        raise ConfigError("trainer.max_steps and trainer.num_train_epochs are both <= 0: set one of them")
    for key in ("logging_steps", "save_steps", "eval_steps", "num_generations", "num_iterations",
                "ref_model_sync_steps", "generation_aggregation_steps",
                "max_prompt_length", "max_completion_length"):
        _positive(f"trainer.{key}", getattr(t, key))
    _positive("trainer.temperature", t.temperature, allow_zero=True)
    if t.load_best_model_at_end and t.metric_for_best_model is None:
        raise ConfigError("trainer.load_best_model_at_end=true needs trainer.metric_for_best_model "
                          "(e.g. eval/loss)")
    if t.metric_for_best_model is not None:
        if not t.metric_for_best_model.strip() or t.metric_for_best_model.strip() == "eval/":
            raise ConfigError(f"trainer.metric_for_best_model={t.metric_for_best_model!r} names no metric")
        if cfg.run in ("teacher_sft", "teacher_rcl", "grpo") and d.eval_split is None and d.eval_split_ratio <= 0:
            raise ConfigError(f"trainer.metric_for_best_model={t.metric_for_best_model} needs eval data: set "
                              "data.eval_split or data.eval_split_ratio > 0")
        if t.save_steps % t.eval_steps:
            raise ConfigError(f"trainer.save_steps={t.save_steps} must be a multiple of trainer.eval_steps="
                              f"{t.eval_steps} with trainer.metric_for_best_model (every checkpoint is ranked)")
    if not 0.0 <= t.ref_model_mixup_alpha <= 1.0:
        raise ConfigError(f"trainer.ref_model_mixup_alpha={t.ref_model_mixup_alpha} must be in [0, 1]")
    _positive("batch.global_batch_size", b.global_batch_size)
    if b.micro_batch_size != -1:
        _positive("batch.micro_batch_size", b.micro_batch_size)
    _positive("batch.eval_batch_size", b.eval_batch_size)
    if cfg.run in ("teacher_rcl", "grpo") and b.global_batch_size % t.num_generations:
        raise ConfigError(
            f"batch.global_batch_size={b.global_batch_size} (completions per step) is not a "
            f"multiple of trainer.num_generations={t.num_generations}"
        )
    _positive("reward.max_probe_tokens", r.max_probe_tokens)
    _positive("reward.degradation_penalty_multiplier", r.degradation_penalty_multiplier, allow_zero=True)
    axes = {"mesh.data": cfg.mesh.data, "mesh.fsdp": cfg.mesh.fsdp, "mesh.tensor": cfg.mesh.tensor}
    if sum(v == -1 for v in axes.values()) > 1:
        raise ConfigError("at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1")
    for key, value in axes.items():
        if value == 0 or value < -1:
            raise ConfigError(f"{key}={value} must be a positive device count or -1 (all remaining)")
    _choice("mesh.platform", cfg.mesh.platform, ("any", "cpu", "gpu", "tpu"))
    step = cfg.checkpoint_step
    if step is not None and not (isinstance(step, int) and step >= 0) and step != "best":
        raise ConfigError(f"checkpoint_step={step!r} must be a step number or 'best'")
    if cfg.run in ("evaluate", "export") and not cfg.checkpoint:
        raise ConfigError(f"+run={cfg.run} needs checkpoint=DIR (a run's checkpoints directory)")
    if cfg.run == "export" and not cfg.export_dir:
        raise ConfigError("+run=export needs export_dir=DIR (where the Hugging Face model is written)")


def accumulation_steps(global_batch: int, micro_batch: int, data_parallel: int) -> int:
    """global = micro x data-parallel ways x accumulation; raises when it does not divide.

    micro_batch -1 means the whole per-shard batch in one micro-step (accumulation 1).
    """
    if micro_batch == -1:
        micro_batch = max(global_batch // data_parallel, 1)
    per_step = micro_batch * data_parallel
    if global_batch % per_step:
        raise ConfigError(
            f"batch.global_batch_size={global_batch} is not divisible by "
            f"batch.micro_batch_size={micro_batch} x data-parallel ways={data_parallel} (= {per_step})"
        )
    return global_batch // per_step


CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"


def model_preset(name_or_path: str, *, numerics: ModelConfig) -> ModelConfig:
    """A model preset by name (configs/model/NAME.yaml), or an HF directory / hub id.

    Numerics (dtype, param_dtype, remat, scan) follow `numerics`, e.g. the teacher's, so a
    student on the same mesh computes like the model it is compared with.
    """
    preset = CONFIG_DIR / "model" / f"{name_or_path}.yaml"
    if preset.is_file():
        node = OmegaConf.merge(_writable(OmegaConf.structured(ModelConfig)), OmegaConf.load(preset))
        base = _hashable(OmegaConf.to_object(node))
    else:
        base = dataclasses.replace(ModelConfig(), name=name_or_path, model_name_or_path=name_or_path)
    return dataclasses.replace(base, dtype=numerics.dtype, param_dtype=numerics.param_dtype,
                               remat=numerics.remat, scan_layers=numerics.scan_layers,
                               lora=LoraConfig(), load_in_4bit=False)


def compose(overrides: list[str]) -> TrainConfig:
    """The validated config for command-line style overrides (e.g. a quickstart phase)."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():  # inside main.py's Hydra app
        return to_config(hydra_compose(config_name="train", overrides=overrides), overrides)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return to_config(hydra_compose(config_name="train", overrides=overrides), overrides)


def to_yaml(cfg: TrainConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
