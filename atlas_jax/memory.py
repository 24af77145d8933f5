"""Memory from the compiled programs: what a run needs, what it has, and what would help.

Where the devices are present, the training recipes compile the update step (and for RL
the generation program) on ShapeDtypeStructs of the run's real shapes and shardings before
any weight is loaded; `report` prints XLA's memory analysis per device beside the formula
(plan.py) and refuses, in one line with the knobs that would help, a run whose compiled
figure exceeds the device's memory. The run then calls that same jitted step, so the
compile is not paid twice. `memory_advice` orders the knobs by their effect on this run
(also used for an out-of-memory error that still happens at run time, in main.py).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Optional

import jax
from jax.sharding import Mesh

from atlas_jax.config import TrainConfig, UsageError
from atlas_jax.plan import RL_RUNS, Plan, make_plan, placeholder_mesh

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
    if cfg.run in RL_RUNS:
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
              f"{t.max_completion_length})" if cfg.run in RL_RUNS else f"data.max_length (is {cfg.data.max_length})")
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
