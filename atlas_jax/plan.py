"""The run plan printed before every run (and alone with dry_run=true).

Batch arithmetic (global = micro x data-parallel ways x accumulation), the parameter
count of the model preset, and an estimate of bytes per device for parameters,
gradients, optimizer state and activations. The estimate is deliberately analytic
(no compilation), so it is instant for an 8B preset on a laptop.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import Mesh

from atlas_jax.config import ModelConfig, TrainConfig, accumulation_steps
from atlas_jax.models import param_count
from atlas_jax.parallel import MESH_AXES, data_parallel_size

_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_RL_RUNS = ("teacher_rcl", "grpo")


def _activation_elements_per_token(m: ModelConfig, tensor: int) -> tuple[float, float]:
    """(elements saved per token per layer for backward, one layer's working set)."""
    H, D, F = m.resolved_head_dim, m.hidden_size, m.intermediate_size
    N, K = m.num_attention_heads / tensor, m.num_key_value_heads / tensor
    f = F / tensor
    working = 4 * D + 2 * N * H + 2 * K * H + 4 * f  # every intermediate of one layer
    saved = {
        "none": working,
        "minimal": N * H + 2 * K * H + 2 * f + 2 * D,  # matmul outputs only
        "save_dots": N * H + 2 * K * H + 2 * f + 2 * D,
        "full": D,  # the layer input only; the rest is recomputed
    }[m.remat]
    return saved, working


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
    bytes_params: float
    bytes_grads: float
    bytes_optimizer: float
    bytes_activations: float

    @property
    def bytes_total(self) -> float:
        return self.bytes_params + self.bytes_grads + self.bytes_optimizer + self.bytes_activations

    def render(self) -> str:
        gib = lambda b: f"{b / 2**30:9.2f} GiB"  # noqa: E731
        axes = " x ".join(f"{a}={self.mesh_shape[a]}" for a in MESH_AXES)
        rows = [
            "== atlas_jax run plan",
            f"devices        {self.devices} x {self.platform} in {self.processes} process(es); mesh {axes}",
            f"batch          global {self.global_batch} = micro {self.micro_batch} x data-parallel "
            f"{self.data_parallel} x accumulation {self.accumulation}; sequence length {self.seq_len}",
            f"parameters     {self.params:,} ({self.params / 1e9:.2f} B)",
            "bytes/device   (estimate)",
            f"  params       {gib(self.bytes_params)}",
            f"  gradients    {gib(self.bytes_grads)}",
            f"  optimizer    {gib(self.bytes_optimizer)}",
            f"  activations  {gib(self.bytes_activations)}",
            f"  total        {gib(self.bytes_total)}",
        ]
        return "\n".join(rows)


def make_plan(cfg: TrainConfig, mesh: Mesh) -> Plan:
    """Validates the batch arithmetic against the mesh and estimates memory per device."""
    m, b = cfg.model, cfg.batch
    dp = data_parallel_size(mesh)
    accum = accumulation_steps(b.global_batch_size, b.micro_batch_size, dp)
    micro = b.global_batch_size // (dp * accum)
    model_shards = mesh.shape["fsdp"] * mesh.shape["tensor"]
    n = param_count(m)
    p_bytes = _BYTES[m.param_dtype]
    rl = cfg.run in _RL_RUNS
    seq = (cfg.trainer.max_prompt_length + cfg.trainer.max_completion_length) if rl else cfg.data.max_length
    saved, working = _activation_elements_per_token(m, mesh.shape["tensor"])
    tokens = micro * seq
    act_bytes = _BYTES[m.dtype]
    logits = tokens * m.vocab_size / mesh.shape["tensor"] * 4 * 2  # fp32 logits and their grad
    activations = tokens * act_bytes * (m.num_hidden_layers * saved + working) + logits
    return Plan(
        devices=mesh.devices.size,
        platform=np.asarray(mesh.devices).flat[0].platform,
        mesh_shape=dict(mesh.shape),
        processes=jax.process_count(),
        global_batch=b.global_batch_size,
        micro_batch=micro,
        data_parallel=dp,
        accumulation=accum,
        seq_len=seq,
        params=n,
        bytes_params=n * p_bytes / model_shards,
        bytes_grads=n * p_bytes / model_shards,
        bytes_optimizer=2 * n * p_bytes / model_shards,  # Adam's two moments
        bytes_activations=activations,
    )
