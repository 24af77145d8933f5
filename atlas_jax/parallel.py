"""Device mesh from config, logical-axis rules, parameter shardings, and multi-host initialisation.

Axes: `data` (pure data parallel, replicated params), `fsdp` (data parallel with
params/optimizer sharded), `tensor` (Megatron-style model parallel). Models name
their dimensions logically (`embed`, `mlp`, `heads`, ...); `LOGICAL_AXIS_RULES` is
the one table that maps those names onto mesh axes, and `param_shardings` turns a
model's (or a state's) named variables into the shardings jit takes. They live here,
not in `models/`, because every layer that places arrays needs them: initialisation,
checkpoint loading, 4-bit quantisation, the train state, evaluation.
"""

from __future__ import annotations

import logging
import os
from typing import Optional, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from atlas_jax.config import ConfigError, DistributedConfig, MeshConfig

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")
DATA_AXES = ("data", "fsdp")  # the batch is split over both

# logical name -> mesh axis (or axes, or None = replicated)
LOGICAL_AXIS_RULES: tuple[tuple[str, object], ...] = (
    ("batch", DATA_AXES),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("length", None),
    ("layers", None),
    ("norm", None),
    ("lora_rank", None),
)
_RULES = dict(LOGICAL_AXIS_RULES)


def logical_to_spec(logical_axes: Sequence[Optional[str]]) -> P:
    """('embed', 'mlp') -> P('fsdp', 'tensor'); unknown names are an error, not a guess."""
    axes = []
    for name in logical_axes:
        if name is not None and name not in _RULES:
            raise KeyError(f"logical axis {name!r} has no rule in parallel.LOGICAL_AXIS_RULES")
        axes.append(None if name is None else _RULES[name])
    return P(*axes)


def spec_for(mesh: Mesh, logical_axes, shape) -> P:
    """Logical names -> PartitionSpec; a dim the mesh axes do not divide stays replicated
    (e.g. 2 kv heads on tensor=4), so any checkpoint loads on any mesh."""
    spec = logical_to_spec(logical_axes)
    axes = []
    for dim, axis in zip(shape, spec):
        names = (axis,) if isinstance(axis, str) else (axis or ())
        ways = int(np.prod([mesh.shape[a] for a in names])) if names else 1
        axes.append(axis if ways > 1 and dim % ways == 0 else None)
    return P(*axes)


def variable_sharding(var: nnx.Variable, mesh: Mesh) -> NamedSharding:
    """Where `var` lives on `mesh`, from the logical axes it was created with."""
    axes = var.get_metadata("out_sharding", None) or (None,) * var.ndim
    return NamedSharding(mesh, spec_for(mesh, axes, var.shape))


def param_shardings(model_or_state, mesh: Mesh):
    """NamedShardings for a model's (or a split state's) variables, same tree structure.

    Works on `nnx.split(model, nnx.Param)[1]` and on abstract (eval_shape) states, so the
    result can be passed to `jax.jit(in_shardings=..., out_shardings=...)` directly.
    """
    state = nnx.state(model_or_state) if isinstance(model_or_state, nnx.Module) else model_or_state
    return jax.tree.map(lambda v: v.replace(variable_sharding(v, mesh)), state,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))


def mesh_shape(cfg: MeshConfig, num_devices: int) -> dict[str, int]:
    """Resolves -1 and checks the layout against the device count."""
    sizes = {"data": cfg.data, "fsdp": cfg.fsdp, "tensor": cfg.tensor}
    fixed = int(np.prod([v for v in sizes.values() if v != -1]))
    wanted = fixed if -1 not in sizes.values() else None
    if wanted is None:
        if num_devices % fixed:
            raise ConfigError(
                f"mesh={cfg.name} needs a multiple of {fixed} devices, but {num_devices} are visible; "
                "use mesh=auto or set the mesh.* sizes"
            )
        sizes = {k: (num_devices // fixed if v == -1 else v) for k, v in sizes.items()}
    elif wanted != num_devices:
        raise ConfigError(
            f"mesh={cfg.name} needs {wanted} devices (data={cfg.data} x fsdp={cfg.fsdp} x "
            f"tensor={cfg.tensor}) but {num_devices} are visible; use mesh=auto, or simulate with "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={wanted} on CPU"
        )
    return sizes


def make_mesh(cfg: MeshConfig, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """The mesh a run uses. Fails before any work when the devices do not fit."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = mesh_shape(cfg, len(devices))
    platform = devices[0].platform
    if cfg.platform not in ("any", platform):
        if platform == "cpu":
            log.warning("mesh=%s is written for %s; %d CPU devices stand in for them (simulation)",
                        cfg.name, cfg.platform, len(devices))
        else:
            raise ConfigError(f"mesh={cfg.name} is written for {cfg.platform} but the devices are {platform}")
    if cfg.num_processes != jax.process_count() and platform != "cpu":
        log.warning("mesh=%s expects %d processes, running with %d", cfg.name, cfg.num_processes,
                    jax.process_count())
    shape = tuple(sizes[a] for a in MESH_AXES)
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)


def data_parallel_size(mesh: Mesh) -> int:
    return int(np.prod([mesh.shape[a] for a in DATA_AXES]))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Leading dim over the data axes, the rest replicated."""
    return NamedSharding(mesh, P(DATA_AXES, *([None] * (ndim - 1))))


def shard_rows(x: np.ndarray, mesh: Mesh) -> jax.Array:
    """The same full host array on every process -> one global array, rows over the data axes.

    RL rollouts run as one global program that every process drives with identical inputs
    (same prompts, same seed), so each process holds the full rows and contributes the
    shards its devices own.
    """
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, batch_sharding(mesh, x.ndim), lambda index: x[index])


def to_host(x: jax.Array) -> np.ndarray:
    """The whole array as numpy on this host, gathering other processes' shards when needed."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def in_host_memory(x) -> bool:
    """Whether `x` (an array, or a tracer inside jit) lives in host memory (pinned_host)."""
    return jax.typeof(x).memory_space == jax.memory.Space.Host


def on_device(x):
    """`x` in device memory: a device copy of a host-resident array (trainer.offload keeps the
    frozen base there, and the model fetches each weight where it is used), else `x` itself."""
    return jax.device_put(x, jax.memory.Space.Device) if in_host_memory(x) else x


# XLA options for the model's big programs (update steps, log-prob and eval passes), passed
# to their jax.jit. XLA:CPU's concurrency-optimised scheduler runs independent thunks side by
# side, each a matmul wanting every core: on 2 cores the qwen3_33m SFT step took 4.65-5.09 s
# with it, 4.19-4.58 s without (bench/sft_step.py, 3 interleaved pairs run back to back, so
# not on a quiet machine; 2026-12-07). Other backends do not read xla_cpu_ options.
COMPILER_OPTIONS = {"xla_cpu_enable_concurrency_optimized_scheduler": False}


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def _env_int(name: str) -> Optional[int]:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else None


def initialize_distributed(cfg: DistributedConfig) -> bool:
    """Starts JAX's multi-controller runtime when the config or environment asks.

    Explicit config wins; otherwise a SLURM job with several tasks, or a TPU pod slice,
    is detected and JAX's own cluster detection fills in the coordinator.
    Returns True when the runtime was initialised.
    """
    if jax.distributed.is_initialized():
        return True
    if cfg.coordinator_address:
        jax.distributed.initialize(
            coordinator_address=cfg.coordinator_address,
            num_processes=cfg.num_processes,
            process_id=cfg.process_id,
            initialization_timeout=cfg.initialization_timeout,
        )
        return True
    slurm_tasks = _env_int("SLURM_NTASKS") or 1
    tpu_workers = len([h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h])
    if slurm_tasks > 1 or tpu_workers > 1:
        jax.distributed.initialize(initialization_timeout=cfg.initialization_timeout)
        return True
    return False
