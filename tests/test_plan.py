"""The dry-run memory plan against XLA's compiled memory analysis of the real SFT step."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from atlas_jax import parallel, plan
from atlas_jax.config import (BatchConfig, DataConfig, LoraConfig, MeshConfig, ModelConfig, TrainConfig,
                              TrainerConfig, accumulation_steps)
from atlas_jax.data import Batch
from atlas_jax.models import load_model, lora
from atlas_jax.train import optim, sft, state as state_lib, step as step_lib

# mid-size: big enough that weights, optimizer and activations all matter (~40M params)
MID = ModelConfig(name="mid", vocab_size=8192, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                  num_attention_heads=8, num_key_value_heads=4, head_dim=64, qk_norm=True,
                  tie_word_embeddings=False, remat="save_layer_inputs")
MODES = {
    "full": MID,
    "lora": dataclasses.replace(MID, lora=LoraConfig(rank=16, target_modules=("q_proj", "v_proj", "o_proj"))),
    "qlora": dataclasses.replace(MID, lora=LoraConfig(rank=16), load_in_4bit=True, dtype="bfloat16"),
}


def measured_bytes(cfg: TrainConfig, mesh) -> float:
    """Peak bytes of the compiled step: live arguments + outputs not aliased to them + temps."""
    model = nnx.eval_shape(lambda: load_model(cfg.model, mesh=mesh))
    graphdef, params, frozen = lora.split_trainable(model)
    sharded = lambda tree: jax.tree.map(  # noqa: E731
        lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=parallel.replicated(mesh)), tree)
    params, frozen = sharded(params), (None if frozen is None else sharded(frozen))
    tx = optim.make_optimizer(cfg.trainer, 10)
    shardings = state_lib.state_shardings(jax.tree.map(lambda x: x.sharding, params), tx, params, mesh)
    state = jax.eval_shape(lambda p: state_lib.TrainState(p, tx.init(p), jnp.zeros((), jnp.int32),
                                                          jnp.zeros((2,), jnp.uint32)), params)
    accum = accumulation_steps(cfg.batch.global_batch_size, cfg.batch.micro_batch_size, 1)
    step = step_lib.make_train_step(sft.make_sft_loss(graphdef), tx, accum_steps=accum, mesh=mesh,
                                    state_shardings=shardings, frozen=frozen, combine=lora.combine)
    B, T = cfg.batch.global_batch_size, cfg.data.max_length
    batch = Batch(*(jax.ShapeDtypeStruct((B, T), d) for d in (jnp.int32, jnp.int32, jnp.int32, jnp.float32)))
    stats = step.jitted.lower(state, batch, None, frozen).compile().memory_analysis()
    return (stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes
            + stats.temp_size_in_bytes)


@pytest.mark.parametrize("mode", list(MODES))
def test_plan_within_25_percent_of_compiled_memory(mode):
    mesh = parallel.make_mesh(MeshConfig(fsdp=1), jax.devices()[:1])
    cfg = TrainConfig(run="teacher_sft", model=MODES[mode], data=DataConfig(max_length=512),
                      trainer=TrainerConfig(max_steps=10), batch=BatchConfig(global_batch_size=4, micro_batch_size=2))
    estimate = plan.make_plan(cfg, mesh)
    assert estimate.mode == mode
    measured = measured_bytes(cfg, mesh)
    assert abs(estimate.bytes_total - measured) / measured < 0.25, (estimate.render(), measured / 2**20)


def test_rl_plan_sequence_is_clamped_to_the_model_window():
    """Rollouts keep prompt + completion inside max_position_embeddings (rl/rollout.py), so
    the plan sizes the update's rows the same way, not at the configured 4096 + 4096."""
    mesh = parallel.make_mesh(MeshConfig(fsdp=1), jax.devices()[:1])
    trainer = TrainerConfig(max_steps=1, max_prompt_length=4096, max_completion_length=4096)
    batch = BatchConfig(global_batch_size=4, micro_batch_size=2)
    for window, seq in ((2048, 2048), (32768, 8192)):
        cfg = TrainConfig(run="teacher_rcl", model=dataclasses.replace(MID, max_position_embeddings=window),
                          trainer=trainer, batch=batch)
        assert plan.make_plan(cfg, mesh).seq_len == seq


def test_offload_counts_on_gpu_and_is_ignored_on_cpu():
    """What the recipes run: CPU ignores trainer.offload (train/offload.py), a full
    fine-tune has no frozen base to offload, and an offloaded LoRA base leaves the device."""
    cfg = TrainConfig(run="teacher_sft", model=MODES["lora"], data=DataConfig(max_length=512),
                      trainer=TrainerConfig(max_steps=10, offload="optimizer_and_frozen"),
                      batch=BatchConfig(global_batch_size=4, micro_batch_size=2))
    cpu = parallel.make_mesh(MeshConfig(fsdp=1), jax.devices()[:1])
    assert plan.make_plan(cfg, cpu).offload == "none"
    gpu = plan.placeholder_mesh({"data": 1, "fsdp": 1, "tensor": 1})
    on_device = plan.make_plan(dataclasses.replace(cfg, trainer=TrainerConfig(max_steps=10)), gpu)
    offloaded = plan.make_plan(cfg, gpu)
    assert offloaded.offload == "optimizer_and_frozen"
    assert offloaded.bytes_params < on_device.bytes_params / 2
    assert offloaded.bytes_total < on_device.bytes_total
    full = dataclasses.replace(cfg, model=MODES["full"])
    offloaded_full = plan.make_plan(full, gpu)
    assert offloaded_full.offload == "optimizer"  # no frozen base: the optimizer alone moves
    assert offloaded_full.bytes_total < plan.make_plan(dataclasses.replace(full, trainer=TrainerConfig(max_steps=10)),
                                                       gpu).bytes_total
