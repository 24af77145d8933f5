"""Bytes per device: the formula's plan for full fine-tuning vs LoRA vs QLoRA, or one real step
measured against the compiled plan.

    PYTHONPATH=. python bench/memory.py          # Qwen3-8B preset on mesh=8gpu (fsdp=8)
    PYTHONPATH=. python bench/memory.py model=qwen3_1_7b mesh=1gpu remat=save_layer_inputs
    PYTHONPATH=. python bench/memory.py --measure +run=teacher_sft model=tiny data=synthetic_math_sft \
        data.max_length=4096 batch.global_batch_size=1 batch.micro_batch_size=1

The table is the analytic plan (atlas_jax/plan.py), which tests/test_plan.py holds to within
25% of XLA's compiled memory analysis on a mid-size model (without offload: CPU memory
analysis does not tell host from device bytes, so the offload rows are unmeasured). The
mesh is laid out on placeholder devices, so no GPU is needed to print the table.

--measure runs the recipe the overrides name for one step on this machine's devices and
prints, per device, the compiled plan (atlas_jax/memory.report, before anything loads), XLA's analysis
of the executable the first step ran, the formula's estimate, and what the step took: the
allocator's peak on GPU/TPU (memory_stats), and on CPU the growth of the process's peak RSS
during the step (VmHWM after the step, reset just before it, less VmRSS before it; all
simulated devices share the process, so it is divided by their number).
"""

from __future__ import annotations

import dataclasses
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # a plain checkout too

from atlas_jax import memory, plan  # noqa: E402
from atlas_jax.config import LoraConfig, compose  # noqa: E402

LORA = LoraConfig(rank=16, alpha=32.0, target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                       "up_proj", "down_proj"))


def preset_mesh_shape(cfg) -> dict:
    """The mesh preset's {axis: ways}, with -1 (the rest of the devices) taken as 8 devices."""
    shape = {"data": cfg.mesh.data, "fsdp": cfg.mesh.fsdp, "tensor": cfg.mesh.tensor}
    count = 8 if -1 in shape.values() else 1
    for axis, ways in shape.items():
        if ways == -1:
            shape[axis] = count // int(np.prod([w for w in shape.values() if w != -1]))
    return shape


def main(argv: list[str]) -> None:
    if argv[:1] == ["--measure"]:
        return measure(argv[1:])
    overrides = {"model": "qwen3_8b", "mesh": "8gpu"}
    extra = []
    for arg in argv:
        key, _, value = arg.partition("=")
        if key in overrides:
            overrides[key] = value
        else:
            extra.append(f"model.{arg}")
    cfg = compose(["+run=teacher_sft", *(f"{k}={v}" for k, v in overrides.items()), *extra])
    mesh = plan.placeholder_mesh(preset_mesh_shape(cfg))
    lora = dataclasses.replace(cfg.model, lora=LORA)
    qlora = dataclasses.replace(lora, load_in_4bit=True)
    modes = {"full": (cfg.model, "none"), "lora r16": (lora, "none"), "qlora r16": (qlora, "none"),
             "full, offload optimizer": (cfg.model, "optimizer"),
             "lora r16, offload optimizer+base": (lora, "optimizer_and_frozen"),
             "qlora r16, offload optimizer+base": (qlora, "optimizer_and_frozen")}
    print(f"model={overrides['model']} mesh={overrides['mesh']} {dict(mesh.shape)}; seq {cfg.data.max_length}, "
          f"micro-batch {cfg.batch.micro_batch_size}, remat {cfg.model.remat}, params {cfg.model.param_dtype}")
    width = max(map(len, modes))
    print(f"{'mode':<{width}} {'trained':>14} {'params GiB':>11} {'grads GiB':>10} {'optim GiB':>10} "
          f"{'activ GiB':>10} {'total GiB':>10}")
    for name, (model, offload) in modes.items():
        run = dataclasses.replace(cfg, model=model, trainer=dataclasses.replace(cfg.trainer, offload=offload))
        p = plan.make_plan(run, mesh)
        gib = [x / 2**30 for x in (p.bytes_params, p.bytes_grads, p.bytes_optimizer, p.bytes_activations,
                                   p.bytes_total)]
        print(f"{name:<{width}} {p.trainable:>14,} " + " ".join(f"{g:>10.2f}" for g in gib))
    print("offloaded optimizer state is in host memory; it counts in the total as max(optimizer, activations): "
          "on the device for the update only")


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def measure(overrides: list[str]) -> None:
    """One step of the run `overrides` compose (see the module docstring)."""
    import tempfile

    import jax

    from atlas_jax import parallel, recipes
    from atlas_jax.train import setup

    out = tempfile.mkdtemp(prefix="atlas_jax_memory_")
    cfg = compose([*overrides, "trainer.max_steps=1", "trainer.save_final_model=false", "trainer.report_to=[]",
                   "data.eval_split_ratio=0", f"output_dir={out}"])
    mesh = parallel.make_mesh(cfg.mesh)
    planned, ran, step_bytes = {}, {}, {}
    report, bind = memory.report, setup.Job.bind

    def recording_report(*args, **kwargs):
        planned.update(report(*args, **kwargs))
        return planned

    def measuring_bind(job, update):
        step = bind(job, update)

        def first_step(state, batch, extras=None):
            if ran:
                return step(state, batch, extras)
            args = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                                (state, batch, extras, job.frozen))
            devices = jax.local_devices()
            before = _status_bytes("VmRSS")
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            result = jax.block_until_ready(step(state, batch, extras))
            step_bytes["rss"] = (_status_bytes("VmHWM") - before) / len(devices)
            stats = devices[0].memory_stats()
            if stats and "peak_bytes_in_use" in stats:
                step_bytes["allocator peak"] = stats["peak_bytes_in_use"]
            ran["update step"] = memory.ProgramMemory.of(update.jitted.lower(*args).compile())
            return result
        return first_step

    memory.report, setup.Job.bind = recording_report, measuring_bind
    try:
        recipes.run(cfg, mesh)
    finally:
        memory.report, setup.Job.bind = report, bind
    estimate = plan.make_plan(cfg, mesh)
    mib = lambda b: f"{b / 2**20:10.1f} MiB"  # noqa: E731
    print(f"\n{' '.join(overrides)}: {jax.local_device_count()} {mesh.devices.flat[0].platform} device(s), "
          f"sequence length {estimate.seq_len}")
    print(f"{'update step, per device':<44} {'peak':>14} {'temporaries':>14}")
    print(f"{'compiled plan (before anything loads)':<44} {mib(planned['update step'].peak):>14} "
          f"{mib(planned['update step'].temporaries):>14}")
    print(f"{'executable the first step ran':<44} {mib(ran['update step'].peak):>14} "
          f"{mib(ran['update step'].temporaries):>14}")
    print(f"{'formula (estimate)':<44} {mib(estimate.bytes_total):>14} {mib(estimate.bytes_activations):>14}"
          "  (activations)")
    for name, value in step_bytes.items():
        label = "peak RSS growth during the first step" if name == "rss" else "allocator peak (memory_stats)"
        print(f"{label:<44} {mib(value):>14}")


if __name__ == "__main__":
    main(sys.argv[1:])
