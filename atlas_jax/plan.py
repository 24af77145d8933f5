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

Where the devices are present, the figure that decides is the compiled one
(atlas_jax/memory.py); `Plan.render` prints it beside this estimate.
"""

from __future__ import annotations

import dataclasses
import types

import jax
import numpy as np
from jax.sharding import Mesh

from atlas_jax.config import ModelConfig, TrainConfig, accumulation_steps
from atlas_jax.models import param_count, quant
from atlas_jax.train.logprobs import CHUNK_T
from atlas_jax.parallel import MESH_AXES, data_parallel_size

_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
RL_RUNS = ("teacher_rcl", "grpo")
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
    rl = cfg.run in RL_RUNS
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
