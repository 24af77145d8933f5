"""Bytes per device from the dry-run plan: full fine-tuning vs LoRA vs QLoRA.

    PYTHONPATH=. python bench/memory.py          # Qwen3-8B preset on mesh=8gpu (fsdp=8)
    PYTHONPATH=. python bench/memory.py model=qwen3_1_7b mesh=1gpu remat=save_layer_inputs

The figures are the analytic plan (atlas_jax/plan.py), which tests/test_plan.py holds to
within 25% of XLA's compiled memory analysis on a mid-size model (without offload: CPU
memory analysis does not tell host from device bytes, so the offload rows are unmeasured). The mesh is laid out
on placeholder devices, so no GPU is needed to print the table.
"""

from __future__ import annotations

import dataclasses
import sys

import numpy as np

from atlas_jax import plan
from atlas_jax.config import LoraConfig, compose

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


if __name__ == "__main__":
    main(sys.argv[1:])
