"""The run plan printed before every run (and alone with dry_run=true).

Batch arithmetic (global = micro x data-parallel ways x accumulation), the parameter
count of the model preset, and an estimate of bytes per device for parameters,
gradients, optimizer state and activations in the run's mode: full fine-tuning, LoRA
(only adapters have gradients and Adam moments) or QLoRA (the frozen projections in NF4),
and with trainer.offload on GPU/TPU (CPU ignores it): offloaded Adam moments are on the
device only for the update, after the backward pass has freed the activations, so they
count as max(optimizer, activations) (assuming XLA does not start fetching them before
the backward pass ends); an offloaded LoRA base counts as two layers in flight plus the
embedding and head tables, and implies remat save_all_matmuls where remat is none.
The estimate is analytic (no compilation), so it is instant for an 8B preset on a laptop
and stands for meshes that are not present (mesh=8gpu on a laptop).

Where the devices are present, the training recipes compile the update step (and for RL
the generation program) on ShapeDtypeStructs of the run's real shapes and shardings before
any weight is loaded, print XLA's memory analysis per device beside the estimate, and
refuse, in one line with the knobs that would help, a run whose compiled figure exceeds
the device's memory (`report`); the run then calls that same jitted step, so the compile
is not paid twice.
"""

from __future__ import annotations

import dataclasses
import os
import time
import types
from typing import Any, Optional

import jax
import numpy as np
from jax.sharding import Mesh

from atlas_jax.config import ModelConfig, TrainConfig, UsageError, accumulation_steps
from atlas_jax.models import param_count, quant
from atlas_jax.train.logprobs import CHUNK_T
from atlas_jax.parallel import MESH_AXES, data_parallel_size

_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_RL_RUNS = ("teacher_rcl", "grpo")
_INFERENCE_RUNS = ("evaluate", "export")


def _activation_elements_per_token(m: ModelConfig, tensor: int) -> tuple[float, float]:
    """(elements saved per token per layer for backward, one layer's working set)."""
    H, D, F = m.resolved_head_dim, m.hidden_size, m.intermediate_size
    N, K = m.num_attention_heads / tensor, m.num_key_value_heads / tensor
    f = F / tensor
    working = 4 * D + 2 * N * H + 2 * K * H + 4 * f  # every intermediate of one layer
    saved = {
        "none": working,
        "save_weight_matmuls": N * H + 2 * K * H + 2 * f + 2 * D,  # x @ W outputs only
        "save_all_matmuls": N * H + 2 * K * H + 2 * f + 2 * D,
        "save_layer_inputs": D,  # the layer input only; the rest is recomputed
    }[m.remat]
    return saved, working


def lora_param_count(m: ModelConfig) -> int:
    """Adapter parameters: r x (fan_in + fan_out) per target projection and layer."""
    D, F = m.hidden_size, m.intermediate_size
    N, K, H = m.num_attention_heads, m.num_key_value_heads, m.resolved_head_dim
    io = {"q_proj": (D, N * H), "k_proj": (D, K * H), "v_proj": (D, K * H), "o_proj": (N * H, D),
          "gate_proj": (D, F), "up_proj": (D, F), "down_proj": (F, D)}
    return m.num_hidden_layers * m.lora.rank * sum(sum(io[t]) for t in m.lora.target_modules)


def projection_shapes(m: ModelConfig) -> dict:
    """Stacked shapes of the seven layer projections (the ones NF4 stores)."""
    L, D, F = m.num_hidden_layers, m.hidden_size, m.intermediate_size
    N, K, H = m.num_attention_heads, m.num_key_value_heads, m.resolved_head_dim
    return {"q_proj": (L, D, N, H), "k_proj": (L, D, K, H), "v_proj": (L, D, K, H), "o_proj": (L, N, H, D),
            "gate_proj": (L, D, F), "up_proj": (L, D, F), "down_proj": (L, F, D)}


def mode_of(m: ModelConfig) -> str:
    return "qlora" if m.load_in_4bit else "lora" if m.lora.rank > 0 else "full"


def weight_bytes(m: ModelConfig) -> tuple[float, int]:
    """(bytes of all parameters, trained parameter count) for the model's mode."""
    n, p_bytes = param_count(m), _BYTES[m.param_dtype]
    if mode_of(m) == "full":
        return n * p_bytes, n
    n_lora = lora_param_count(m)
    base = n * p_bytes
    if m.load_in_4bit:
        for name, shape in projection_shapes(m).items():
            base += quant.quantized_bytes(shape, name) - float(np.prod(shape)) * p_bytes
    return base + n_lora * p_bytes, n_lora


@dataclasses.dataclass(frozen=True)
class Plan:
    devices: int
    platform: str
    mesh_shape: dict
    processes: int
    global_batch: int
    micro_batch: int
    data_parallel: int
    accumulation: int
    seq_len: int
    params: int
    mode: str
    trainable: int
    bytes_params: float
    bytes_grads: float
    bytes_optimizer: float
    bytes_activations: float
    offload: str = "none"  # what runs: trainer.offload, or "none" on CPU

    @property
    def bytes_total(self) -> float:
        if self.offload == "none":
            return self.bytes_params + self.bytes_grads + self.bytes_optimizer + self.bytes_activations
        return self.bytes_params + self.bytes_grads + max(self.bytes_optimizer, self.bytes_activations)

    def render(self, compiled: tuple[str, ...] = ()) -> str:
        """The plan as printed; `compiled` rows (report's) go before the formula's estimate."""
        gib = lambda b: f"{b / 2**30:9.2f} GiB"  # noqa: E731
        axes = " x ".join(f"{a}={self.mesh_shape[a]}" for a in MESH_AXES)
        rows = [
            "== atlas_jax run plan",
            f"devices        {self.devices} x {self.platform} in {self.processes} process(es); mesh {axes}",
            f"batch          global {self.global_batch} = micro {self.micro_batch} x data-parallel "
            f"{self.data_parallel} x accumulation {self.accumulation}; sequence length {self.seq_len}",
            f"parameters     {self.params:,} ({_billions(self.params)}); mode {self.mode}, "
            f"trained {self.trainable:,}",
            "bytes/device   (estimate)",
            f"  params       {gib(self.bytes_params)}"
            + ("  (the frozen base in host memory; two layers in flight)"
               if self.offload == "optimizer_and_frozen" else ""),
            f"  gradients    {gib(self.bytes_grads)}",
            f"  optimizer    {gib(self.bytes_optimizer)}"
            + ("" if self.offload == "none" else "  (host memory; on the device for the update only)"),
            f"  activations  {gib(self.bytes_activations)}",
            f"  total        {gib(self.bytes_total)}",
        ]
        at = rows.index("bytes/device   (estimate)")
        return "\n".join([*rows[:at], *compiled, *rows[at:]])


def placeholder_mesh(shape: dict, platform: str = "gpu"):
    """A mesh-like stand-in of `shape` ({axis: ways}) over fake `platform` devices: enough
    for make_plan, so a plan for 8 GPUs needs no GPU."""
    count = int(np.prod(list(shape.values())))
    devices = np.array([types.SimpleNamespace(platform=platform, id=i) for i in range(count)])
    return types.SimpleNamespace(shape=dict(shape), devices=devices.reshape(tuple(shape.values())),
                                 axis_names=tuple(shape))


def _billions(n: int) -> str:
    """918,912 -> "0.000919 B", 8,190,735,360 -> "8.19 B": three significant figures."""
    return f"{n / 1e9:.3g} B"


def make_plan(cfg: TrainConfig, mesh: Mesh) -> Plan:
    """Validates the batch arithmetic against the mesh and estimates memory per device."""
    if cfg.run in _INFERENCE_RUNS:
        return _inference_plan(cfg, mesh)
    m, b = cfg.model, cfg.batch
    dp = data_parallel_size(mesh)
    accum = accumulation_steps(b.global_batch_size, b.micro_batch_size, dp)
    micro = b.global_batch_size // (dp * accum)
    model_shards = mesh.shape["fsdp"] * mesh.shape["tensor"]
    n = param_count(m)
    p_bytes = _BYTES[m.param_dtype]
    all_bytes, trained = weight_bytes(m)
    platform = np.asarray(mesh.devices).flat[0].platform
    offload = "none" if platform == "cpu" else cfg.trainer.offload
    if offload == "optimizer_and_frozen" and mode_of(m) == "full":
        offload = "optimizer"  # no frozen base without LoRA (train/offload.py)
    if offload == "optimizer_and_frozen":
        all_bytes = trained * p_bytes + _offloaded_base_on_device(m)
        if m.remat == "none":  # what the decoder runs with an offloaded base
            m = dataclasses.replace(m, remat="save_all_matmuls")
    rl = cfg.run in _RL_RUNS
    # RL rows are prompt + completion, clamped to the model's window as rollouts clamp them
    seq = (min(cfg.trainer.max_prompt_length + cfg.trainer.max_completion_length, m.max_position_embeddings)
           if rl else cfg.data.max_length)
    saved, working = _activation_elements_per_token(m, mesh.shape["tensor"])
    tokens = micro * seq
    act_bytes = _BYTES[m.dtype]
    # losses build fp32 logits CHUNK_T positions at a time: the chunk's logits, softmax, grad
    logits = micro * min(seq, CHUNK_T) * m.vocab_size / mesh.shape["tensor"] * 4 * 3
    activations = tokens * act_bytes * (m.num_hidden_layers * saved + working) + logits
    if m.load_in_4bit:  # one layer dequantised in compute dtype, forward and backward
        layer = sum(float(np.prod(s[1:])) for s in projection_shapes(m).values())
        activations += 2 * layer * act_bytes / model_shards
    return Plan(
        devices=mesh.devices.size,
        platform=platform,
        mesh_shape=dict(mesh.shape),
        processes=jax.process_count(),
        global_batch=b.global_batch_size,
        micro_batch=micro,
        data_parallel=dp,
        accumulation=accum,
        seq_len=seq,
        params=n,
        mode=mode_of(m),
        trainable=trained,
        bytes_params=all_bytes / model_shards,
        # the accumulated sum plus one micro-batch's gradient, trained params only
        bytes_grads=2 * trained * p_bytes / model_shards,
        bytes_optimizer=2 * trained * p_bytes / model_shards,  # Adam's two moments
        bytes_activations=activations,
        offload=offload,
    )


def _offloaded_base_on_device(m: ModelConfig) -> float:
    """Bytes of an offloaded base on the device at once: two layers (the one running, the
    next one arriving), the embedding table and the untied head (fetched whole where used)."""
    base, _ = weight_bytes(dataclasses.replace(m, lora=dataclasses.replace(m.lora, rank=0)))
    tables = m.vocab_size * m.hidden_size * (1 if m.tie_word_embeddings else 2) * _BYTES[m.param_dtype]
    return tables + 2 * (base - tables) / m.num_hidden_layers


def _inference_plan(cfg: TrainConfig, mesh: Mesh) -> Plan:
    """Evaluate / export: the weights (LoRA adapters merged or not, as stored), no gradients,
    no optimizer; activations are one greedy generation of the eval batch: the KV cache of
    prompt + completion and one layer's working set over the prompt."""
    m = cfg.model
    model_shards = mesh.shape["fsdp"] * mesh.shape["tensor"]
    dp = data_parallel_size(mesh)
    rows = -(-cfg.batch.eval_batch_size // dp) if cfg.run == "evaluate" else 0
    seq = min(cfg.trainer.max_prompt_length + cfg.trainer.max_completion_length, m.max_position_embeddings)
    act = _BYTES[m.dtype]
    _, working = _activation_elements_per_token(m, mesh.shape["tensor"])
    kv_per_token = 2 * m.num_hidden_layers * m.num_key_value_heads * m.resolved_head_dim / mesh.shape["tensor"]
    logits = m.vocab_size * 4 / mesh.shape["tensor"]
    all_bytes, _ = weight_bytes(m)
    return Plan(
        devices=mesh.devices.size, platform=np.asarray(mesh.devices).flat[0].platform,
        mesh_shape=dict(mesh.shape), processes=jax.process_count(), global_batch=cfg.batch.eval_batch_size,
        micro_batch=rows, data_parallel=dp, accumulation=1, seq_len=seq, params=param_count(m),
        mode=f"{mode_of(m)}, inference", trainable=0, bytes_params=all_bytes / model_shards, bytes_grads=0.0,
        bytes_optimizer=0.0,
        bytes_activations=rows * (seq * kv_per_token * act + cfg.trainer.max_prompt_length * working * act + logits),
    )


# -- the compiled plan -------------------------------------------------------------------------

COMPILED_RUNS = ("teacher_sft", "teacher_rcl", "grpo")  # recipes that compile their programs first


class MemoryPlanError(UsageError):
    """A run whose compiled programs need more memory than its devices have (one line)."""


@dataclasses.dataclass(frozen=True)
class ProgramMemory:
    """XLA's memory analysis of one compiled program, bytes per device (device memory only;
    `host` is what trainer.offload keeps in pinned host memory)."""

    arguments: int
    outputs: int
    aliased: int  # outputs written over donated arguments (the train state)
    temporaries: int
    host: int = 0

    @property
    def peak(self) -> int:
        """Live at once at worst: every argument, the outputs that are not aliased, the temporaries."""
        return self.arguments + self.outputs - self.aliased + self.temporaries

    @classmethod
    def of(cls, compiled) -> Optional["ProgramMemory"]:
        """From a jax `Compiled`; None where the backend reports no analysis."""
        try:
            s = compiled.memory_analysis()
        except NotImplementedError:
            return None
        if s is None:
            return None
        host = (s.host_argument_size_in_bytes + s.host_output_size_in_bytes - s.host_alias_size_in_bytes
                + s.host_temp_size_in_bytes)
        return cls(s.argument_size_in_bytes, s.output_size_in_bytes, s.alias_size_in_bytes, s.temp_size_in_bytes,
                   host)


def compile_memory(programs: dict) -> dict[str, ProgramMemory]:
    """{name: (jitted, args[, static kwargs])} -> {name: ProgramMemory}. `args` are
    ShapeDtypeStructs with the run's shardings, so nothing is allocated; jax keeps the
    executable, and the run's first call of the same jitted function with arrays of those
    shapes runs it without compiling again."""
    out = {}
    for name, (jitted, args, *kwargs) in programs.items():
        memory = ProgramMemory.of(jitted.lower(*args, **(kwargs[0] if kwargs else {})).compile())
        if memory is not None:
            out[name] = memory
    return out


def mesh_is_present(cfg: TrainConfig, mesh) -> bool:
    """Whether the run's devices are the ones the mesh preset is written for (mesh=8gpu on 8
    simulated CPU devices is not: their compiled figures would be the CPU's)."""
    return isinstance(mesh, Mesh) and cfg.mesh.platform in ("any", mesh.devices.flat[0].platform)


def _mem_available() -> Optional[int]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def memory_limit(cfg: TrainConfig, mesh) -> tuple[Optional[float], str]:
    """(bytes one device may use, where that figure comes from); (None, why) when unknown.

    trainer.memory_limit_gb when set; else on GPU/TPU the device's `bytes_limit` less what is
    in use, and on CPU the host's MemAvailable divided among the local (simulated) devices,
    which all live in this one process."""
    if cfg.trainer.memory_limit_gb is not None:
        return cfg.trainer.memory_limit_gb * 2**30, "trainer.memory_limit_gb"
    local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    platform = local[0].platform
    if platform == "cpu":
        available = _mem_available()
        if available is None:
            return None, "no MemAvailable in /proc/meminfo"
        n = len(local)
        return available / n, f"MemAvailable {_gib(available)} shared by {n} CPU device{'s' if n > 1 else ''}"
    free = []
    for d in local:
        stats = d.memory_stats() or {}
        if "bytes_limit" in stats:
            free.append(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    if not free:
        return None, f"the {platform} devices report no bytes_limit"
    return float(min(free)), f"the {platform} device's bytes_limit less what is in use"


def report(cfg: TrainConfig, mesh, programs: dict, *, dry_run: bool = False) -> dict[str, ProgramMemory]:
    """Compiles `programs` (see compile_memory), prints the plan with their memory beside the
    formula's, and raises MemoryPlanError when the largest exceeds the limit; a dry run
    prints that line instead ("would not fit: ...") and returns."""
    estimate = make_plan(cfg, mesh)
    started = time.perf_counter()
    memories = compile_memory(programs)
    seconds = time.perf_counter() - started
    if "update step" in memories:
        _COMPILED[cfg] = memories["update step"]
    limit, source = memory_limit(cfg, mesh)
    print(estimate.render(compiled=_compiled_rows(memories, limit, source, seconds)), flush=True)
    if memories and limit is not None:
        name, worst = max(memories.items(), key=lambda kv: kv[1].peak)
        if worst.peak > limit:
            line = (f"the {name} needs {_gib(worst.peak)} per device (XLA's compiled figure), more than the "
                    f"{_gib(limit)} this run has ({source}); {memory_advice(cfg, mesh)}")
            if not dry_run:
                raise MemoryPlanError(line)
            print(f"would not fit: {line}", flush=True)
    return memories


def _gib(b: float) -> str:
    return f"{b / 2**30:.2f} GiB"


def _compiled_rows(memories: dict, limit: Optional[float], source: str, seconds: float) -> tuple[str, ...]:
    if not memories:
        return ("bytes/device   compiled: this backend reports no memory analysis",)
    unit, scale = ("GiB", 2**30) if max(m.peak for m in memories.values()) >= 2**30 else ("MiB", 2**20)
    cell = lambda b: f"{b / scale:>9.2f} {unit}"  # noqa: E731
    row = lambda label, values: f"  {label:<13}" + "".join(f"{cell(v):>15}" for v in values)  # noqa: E731
    rows = [f"bytes/device   compiled (XLA memory analysis, {seconds:.1f} s)", " " * 15 + "".join(
        f"{name:>15}" for name in memories)]
    for field in ("arguments", "outputs", "aliased", "temporaries", "peak"):
        rows.append(row(field, [getattr(m, field) for m in memories.values()]))
    if any(m.host for m in memories.values()):
        rows.append(row("host memory", [m.host for m in memories.values()]))
    rows.append(f"  limit        {limit / 2**30:>11.2f} GiB  ({source})" if limit is not None else
                f"  limit        unknown ({source})")
    return tuple(rows)


def _halved_lengths(cfg: TrainConfig) -> TrainConfig:
    t = cfg.trainer
    if cfg.run in _RL_RUNS:
        return dataclasses.replace(cfg, trainer=dataclasses.replace(
            t, max_prompt_length=max(1, t.max_prompt_length // 2),
            max_completion_length=max(1, t.max_completion_length // 2)))
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, max_length=max(1, cfg.data.max_length // 2)))


def _knobs(cfg: TrainConfig, mesh) -> list[tuple[str, TrainConfig]]:
    """(advice, the config with it applied) for every knob that is not at its lowest yet and
    acts on `mesh`'s platform."""
    m, t, b = cfg.model, cfg.trainer, cfg.batch
    with_ = lambda **groups: dataclasses.replace(cfg, **groups)  # noqa: E731
    knobs = []
    if b.micro_batch_size != 1:
        knobs.append((f"batch.micro_batch_size=1 (is {b.micro_batch_size}; the global batch stays)",
                      with_(batch=dataclasses.replace(b, micro_batch_size=1))))
    length = (f"trainer.max_prompt_length/max_completion_length (are {t.max_prompt_length}/"
              f"{t.max_completion_length})" if cfg.run in _RL_RUNS else f"data.max_length (is {cfg.data.max_length})")
    knobs.append((f"a shorter {length}", _halved_lengths(cfg)))
    if m.remat != "save_layer_inputs":
        knobs.append((f"model.remat=save_layer_inputs (is {m.remat})",
                      with_(model=dataclasses.replace(m, remat="save_layer_inputs"))))
    if t.offload != "optimizer_and_frozen" and mesh.devices.flat[0].platform != "cpu":
        knobs.append((f"trainer.offload=optimizer_and_frozen (is {t.offload})",
                      with_(trainer=dataclasses.replace(t, offload="optimizer_and_frozen"))))
    lora = dataclasses.replace(m.lora, rank=m.lora.rank or 16)
    if m.lora.rank == 0:
        knobs.append(("model.lora.rank=16 (LoRA: adapters only get gradients and Adam state)",
                      with_(model=dataclasses.replace(m, lora=lora))))
    if not m.load_in_4bit:
        knobs.append(("model.load_in_4bit=true (with LoRA)",
                      with_(model=dataclasses.replace(m, lora=lora, load_in_4bit=True))))
    return knobs


def memory_advice(cfg: TrainConfig, mesh=None) -> str:
    """The knobs that lower this run's memory, with their current values, most effective first;
    more devices on fsdp come last. Each knob's effect is the formula's, on `mesh`, scaled onto
    the compiled update step when `report` compiled one for this config (the formula is good at
    weights, optimizer state and gradients, not at what XLA keeps for attention), and a knob
    that saves nothing there is left out. Without a mesh: GPU order, nothing left out."""
    if mesh is None:
        ordered = [text for text, _ in _knobs(cfg, placeholder_mesh({"data": 1, "fsdp": 1, "tensor": 1}))]
    else:
        before, compiled = make_plan(cfg, mesh), _COMPILED.get(cfg)
        size = (lambda p: p.bytes_total) if compiled is None else (lambda p: _scaled(compiled, before, p))  # noqa: E731
        base = size(before)
        saved = [(base - size(make_plan(changed, mesh)), text) for text, changed in _knobs(cfg, mesh)]
        ordered = [text for saving, text in sorted(saved, key=lambda s: -s[0]) if saving > 0]
    return "to fit, try: " + ", ".join([*ordered, "more devices on mesh.fsdp"])


_COMPILED: dict = {}  # TrainConfig -> its compiled update step's ProgramMemory (report), for memory_advice


def _scaled(compiled: ProgramMemory, before: Plan, after: Plan) -> float:
    """The compiled peak with the formula's changes from `before` to `after` applied: what
    stays resident (state, batch) and the activations scale by the formula's ratios, gradients
    are the formula's own."""
    ratio = lambda a, b: a / b if b else 1.0  # noqa: E731
    held = lambda p: p.bytes_total - p.bytes_grads - p.bytes_activations  # noqa: E731
    activations = max(compiled.temporaries - before.bytes_grads, 0.0)
    return ((compiled.arguments + compiled.outputs - compiled.aliased) * ratio(held(after), held(before))
            + after.bytes_grads + activations * ratio(after.bytes_activations, before.bytes_activations))
