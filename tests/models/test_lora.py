"""LoRA / QLoRA: adapters train alone, the base never moves, merge and resume are exact."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from atlas_jax import parallel
from atlas_jax.config import ConfigError, LoraConfig, TrainerConfig, accumulation_steps
from atlas_jax.models import from_pretrained, load_model, lora, quant, save_pretrained
from atlas_jax.train import optim, sft, state as state_lib, step as step_lib
from atlas_jax.train.checkpoint import Checkpointer
from tests.tiny import TINY, tiny_config
from tests.train import helpers

LORA = tiny_config(lora=LoraConfig(rank=4, alpha=8.0, target_modules=(
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")))
TRAINER = TrainerConfig(learning_rate=3e-2, lr_scheduler_type="constant", max_grad_norm=1.0, max_steps=8)


def _logits(model, batch):
    return model(batch.tokens, positions_BT=batch.positions, segment_ids_BT=batch.segment_ids)


def _train(cfg, mesh, steps=8):
    """LoRA SFT on one repeated batch: (losses, initial frozen, state, graphdef, frozen, opt leaves)."""
    model = load_model(cfg, mesh=mesh)
    graphdef, params, frozen = lora.split_trainable(model)
    frozen_before = jax.device_get(frozen)
    tx = optim.make_optimizer(TRAINER, steps)
    state, shardings = state_lib.create_train_state(params, tx, mesh, seed=0)
    accum = accumulation_steps(8, 1, parallel.data_parallel_size(mesh))
    train_step = step_lib.make_train_step(sft.make_sft_loss(graphdef), tx, accum_steps=accum, mesh=mesh,
                                          state_shardings=shardings, frozen=frozen, combine=lora.combine)
    batch = helpers.to_mesh(helpers.synthetic_batch(0), mesh)
    losses = []
    for _ in range(steps):
        state, metrics = train_step(state, batch)
        losses.append(float(metrics["loss"]))
    return losses, frozen_before, state, graphdef, frozen


def test_fresh_adapters_leave_the_model_unchanged_and_disabled_adapters_are_the_base():
    batch = helpers.synthetic_batch(1)
    base = load_model(TINY)
    adapted = load_model(LORA)
    np.testing.assert_allclose(_logits(adapted, batch), _logits(base, batch), atol=1e-6)
    graphdef, adapters, frozen = lora.split(adapted)
    moved = jax.tree.map(lambda a: a + 0.05, adapters)
    assert not np.allclose(_logits(nnx.merge(graphdef, lora.combine(moved, frozen)), batch), _logits(base, batch))
    off = nnx.merge(graphdef, lora.combine(lora.disabled(moved), frozen))
    np.testing.assert_array_equal(_logits(off, batch), _logits(nnx.merge(graphdef, lora.combine(adapters, frozen)), batch))


def test_unknown_target_module_is_a_one_line_error():
    bad = tiny_config(lora=LoraConfig(rank=2, target_modules=("qkv_proj",)))
    with pytest.raises(ConfigError, match="qkv_proj") as err:
        load_model(bad)
    assert "\n" not in str(err.value)


def test_lora_sft_trains_adapters_only_merges_exactly_and_resumes(tmp_path):
    mesh = helpers.mesh_of(8)
    losses, frozen_before, state, graphdef, frozen = _train(LORA, mesh)
    assert losses[-1] < losses[0] - 0.2, losses
    # the base is bit-identical; optimizer moments exist for adapter leaves only
    for a, b in zip(jax.tree.leaves(frozen_before), jax.tree.leaves(jax.device_get(frozen)), strict=True):
        np.testing.assert_array_equal(a, b)
    adapter_shapes = sorted(x.shape for x in jax.tree.leaves(state.params))
    moment_shapes = sorted(x.shape for x in jax.tree.leaves(state.opt_state) if x.ndim > 0)
    assert moment_shapes == sorted(adapter_shapes * 2)

    # merged export == adapter forward, through save_pretrained / from_pretrained
    batch = helpers.synthetic_batch(2)
    adapted = nnx.merge(graphdef, lora.combine(state.params, frozen))
    merged = lora.merge_adapters(adapted)
    assert not lora.has_adapters(merged)
    save_pretrained(merged, str(tmp_path / "hf"))
    exported = from_pretrained(str(tmp_path / "hf"))
    np.testing.assert_allclose(_logits(exported, batch), _logits(adapted, batch), atol=1e-4)

    # adapters + optimizer state round-trip through the run's Orbax checkpointer
    ckpt = Checkpointer(str(tmp_path / "ckpt"), save_steps=1, max_to_keep=2, async_save=False)
    ckpt.save(int(state.step), state)
    ckpt.wait()
    restored = ckpt.restore(state_lib.abstract_of(state))["state"]
    ckpt.close()
    for a, b in zip(jax.tree.leaves(jax.device_get(state)), jax.tree.leaves(jax.device_get(restored)), strict=True):
        np.testing.assert_array_equal(a, b)


def test_qlora_forward_close_to_bf16_and_training_lowers_the_loss():
    cfg = dataclasses.replace(LORA, dtype="bfloat16", param_dtype="bfloat16")
    batch = helpers.synthetic_batch(3)
    ref = jax.nn.softmax(_logits(load_model(cfg), batch).astype(jnp.float32))
    q_model = load_model(dataclasses.replace(cfg, load_in_4bit=True))
    assert quant.is_quantized(q_model) and q_model.layers.q_proj[...].dtype == jnp.uint4
    got = jax.nn.softmax(_logits(q_model, batch).astype(jnp.float32))
    # NF4 rounds each weight by ~9% (16 levels); the next-token distribution moves far less
    assert float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref)) < 5e-2

    losses, frozen_before, _, _, frozen = _train(dataclasses.replace(cfg, load_in_4bit=True), helpers.mesh_of(1))
    assert losses[-1] < losses[0] - 0.2, losses
    for a, b in zip(jax.tree.leaves(frozen_before), jax.tree.leaves(jax.device_get(frozen)), strict=True):
        np.testing.assert_array_equal(a, b)


def test_lora_on_a_pretrained_checkpoint_starts_from_its_weights(tmp_path):
    """The common case: adapters on a Hugging Face model. They are not in the checkpoint,
    start fresh (B = 0) on the mesh, and leave the model's output the checkpoint's, to float32
    rounding: XLA may fuse the (zero) adapter term's add into the base matmul's kernel, whose
    summation order differs in the last bit; adapters that were not zero would move the
    logits by ~1e-2."""
    save_pretrained(load_model(TINY, seed=3), str(tmp_path))
    batch = helpers.synthetic_batch(1)
    mesh = helpers.mesh_of(8)
    plain = from_pretrained(str(tmp_path), mesh=mesh)
    adapted = from_pretrained(str(tmp_path), mesh=mesh, config=dataclasses.replace(LORA, model_name_or_path=None))
    assert lora.has_adapters(adapted)
    _, adapters, _ = lora.split_trainable(adapted)
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(adapters))
    np.testing.assert_allclose(np.asarray(_logits(adapted, batch)), np.asarray(_logits(plain, batch)),
                               atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", ["lora", "qlora", "4bit"])
def test_save_pretrained_writes_the_weights_the_model_computes_with(kind, tmp_path):
    """Adapters merged, 4-bit dequantised: before, an adapted model saved its base alone and a
    4-bit one its codes, and both reloaded as another model, silently."""
    cfg = {"lora": LORA, "qlora": dataclasses.replace(LORA, load_in_4bit=True),
           "4bit": dataclasses.replace(TINY, load_in_4bit=True)}[kind]
    model = load_model(cfg, seed=1)
    for _, var in nnx.to_flat_state(nnx.state(model, lora.LoraParam)):
        var.set_value(var[...] + 0.05)  # adapters that change the output (fresh ones are B = 0)
    ids = np.random.default_rng(0).integers(0, TINY.vocab_size, (2, 9))
    save_pretrained(model, str(tmp_path))
    reloaded = from_pretrained(str(tmp_path))
    assert not lora.has_adapters(reloaded) and not quant.is_quantized(reloaded)
    np.testing.assert_allclose(np.asarray(reloaded(ids)), np.asarray(model(ids)), atol=1e-5, rtol=0)
