"""The accelerator subset (`pytest -m accelerator`): the default device against a float32
CPU reference. Logits in bf16 and f32, greedy generation, one SFT step, one GRPO step and
the offloaded step, all on the tiny preset (configs/model/tiny.yaml), plus a record of
the attention kernel XLA chose. On a CPU-only machine the default device IS the CPU, so
each comparison is trivially exact, but every test still runs and asserts.
bench/accelerator_check.py runs this file on a lent GPU/TPU and reads the figures each
test records (`record_property`) from pytest's JUnit XML.

Every model here is initialised on the CPU and its weights copied to the device: random
normals go through backend-specific erf_inv code, so two devices' own inits may differ in
the last bit, and these tests are about what the device computes, not how it draws.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding

from atlas_jax import parallel
from atlas_jax.config import LoraConfig, MeshConfig, ModelConfig, TrainerConfig, accumulation_steps, model_preset
from atlas_jax.data import Batch
from atlas_jax.generation import generate
from atlas_jax.models import load_model, lora
from atlas_jax.rl import policy
from atlas_jax.train import offload, optim, sft, state as state_lib, step as step_lib

from train import helpers  # tests/train/helpers.py (pytest puts tests/ on sys.path)

pytestmark = pytest.mark.accelerator

TINY = model_preset("tiny", numerics=ModelConfig())  # configs/model/tiny.yaml, float32
# max |device - cpu| / max |cpu| of the logits, per numerics on the device
LOGIT_TOLERANCE = {
    "float32-highest": 1e-4,  # full f32 dots: only the summation order differs
    "float32": 1e-2,  # default precision: GPUs run f32 dots as TF32 (10-bit mantissa)
    "bfloat16": 3e-2,  # bf16 activations; CPU's own bf16 run is 0.8% off its f32 one
}
# The steps run with full f32 dots (TF32 would blur the comparison; the logits test covers
# the dtypes) and lr 1e-4: Adam's first step moves each parameter by about lr, so a wrong
# update shows as ~1e-4 while summation-order noise stays ~1e-6.
STEP_PRECISION = "highest"
PARAM_ATOL = 2e-5
METRIC_RTOL = 1e-4
TRAINER = TrainerConfig(learning_rate=1e-4, warmup_ratio=0.0, lr_scheduler_type="constant", weight_decay=0.0,
                        beta=0.04, temperature=0.7, max_completion_length=8)


def _meshes() -> dict:
    """{"cpu": the reference's one-device mesh, "device": the default device's}."""
    return {"cpu": parallel.make_mesh(MeshConfig(), jax.devices("cpu")[:1]),
            "device": parallel.make_mesh(MeshConfig(), jax.devices()[:1])}


def _model(cfg: ModelConfig, mesh, seed: int = 0):
    """cfg's model on `mesh`, its weights initialised on the CPU (module docstring)."""
    cpu_mesh = _meshes()["cpu"]
    graphdef, state = nnx.split(load_model(cfg, mesh=cpu_mesh, seed=seed))
    state = jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, x.sharding.spec)), state)
    return nnx.merge(graphdef, state)


def _prompts(batch: int = 4, length: int = 12, seed: int = 0):
    """Left-padded prompts [B, T] and their mask (rows of different lengths)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, TINY.vocab_size, (batch, length)).astype(np.int32)
    mask = (np.arange(length)[None] >= rng.integers(0, length // 2, batch)[:, None]).astype(np.int32)
    return np.where(mask == 1, ids, 0), mask


def _batch(seed: int) -> Batch:
    return helpers.synthetic_batch(seed, vocab=TINY.vocab_size)


@pytest.mark.parametrize("numerics", list(LOGIT_TOLERANCE))
def test_logits_match_the_float32_cpu_reference(numerics, record_property):
    dtype, _, precision = numerics.partition("-")
    ids, mask = _prompts()
    meshes = _meshes()
    forward = lambda m, x, a: m(x, a)  # noqa: E731
    reference_BTV = np.asarray(jax.jit(forward)(_model(TINY, meshes["cpu"]), ids, mask))
    with jax.default_matmul_precision(precision or None):
        device_BTV = np.asarray(jax.jit(forward)(_model(dataclasses.replace(TINY, dtype=dtype), meshes["device"]),
                                                 ids, mask))
    error = float(np.abs(device_BTV - reference_BTV).max() / np.abs(reference_BTV).max())
    record_property(f"logits_{numerics}_relative_error", f"{error:.3g}")
    assert np.isfinite(device_BTV).all()
    assert error <= LOGIT_TOLERANCE[numerics], (numerics, error)


def test_greedy_generation_matches_the_cpu(record_property):
    """Greedy tokens are equal, not close: with full f32 dots a flip needs two logits within
    ~1e-6 of each other. 40 tokens cross the 16-token shape bucket's refill and the cache."""
    ids, mask = _prompts()
    tokens = {}
    with jax.default_matmul_precision("highest"):
        for name, mesh in _meshes().items():
            out = generate(_model(TINY, mesh), ids, mask, max_new_tokens=40)
            tokens[name] = np.asarray(out.tokens)
    record_property("generated_tokens_equal", int((tokens["device"] == tokens["cpu"]).sum()))
    assert tokens["cpu"].shape == (4, 40)
    np.testing.assert_array_equal(tokens["device"], tokens["cpu"])


def _assert_same_step(results: dict, record_property, name: str):
    """results: {"cpu"|"device": (metrics, params)} -> within METRIC_RTOL / PARAM_ATOL."""
    (cpu_metrics, cpu_params), (dev_metrics, dev_params) = results["cpu"], results["device"]
    param_error = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                      for a, b in zip(jax.tree.leaves(dev_params), jax.tree.leaves(cpu_params), strict=True))
    record_property(f"{name}_loss_device_cpu", f"{float(dev_metrics['loss']):.6g} {float(cpu_metrics['loss']):.6g}")
    record_property(f"{name}_max_param_error", f"{param_error:.3g}")
    assert np.isfinite(float(dev_metrics["loss"]))
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose(dev_metrics[key], cpu_metrics[key], rtol=METRIC_RTOL, err_msg=key)
    assert param_error <= PARAM_ATOL, param_error


def _sft_step(mesh):
    """(metrics, params) after one SFT step in two micro-batches on `mesh`."""
    tx = optim.make_optimizer(TRAINER, 10)
    graphdef, params = nnx.split(_model(TINY, mesh), nnx.Param)
    state, shardings = state_lib.create_train_state(params, tx, mesh, seed=0)
    step = step_lib.make_train_step(sft.make_sft_loss(graphdef), tx, accum_steps=accumulation_steps(8, 4, 1),
                                    mesh=mesh, state_shardings=shardings)
    with jax.default_matmul_precision(STEP_PRECISION):
        state, metrics = step(state, helpers.to_mesh(_batch(0), mesh))
    return jax.device_get(metrics), jax.device_get(state.params)


def test_sft_step_matches_the_cpu(record_property):
    _assert_same_step({name: _sft_step(mesh) for name, mesh in _meshes().items()}, record_property, "sft")


def _grpo_step(mesh):
    """(metrics, params) after one GRPO step (KL to a reference that differs) on `mesh`."""
    tx = optim.make_optimizer(TRAINER, 10)
    graphdef, params = nnx.split(_model(TINY, mesh), nnx.Param)
    state, shardings = policy.create_rl_state(params, tx, mesh, seed=0, with_ref=True)
    state = state.replace(ref_params=jax.tree.map(lambda x: x * 0.9, state.ref_params))
    batch = helpers.to_mesh(_batch(1), mesh)
    advantages_B = np.random.default_rng(0).normal(size=batch.tokens.shape[0]).astype(np.float32)
    with jax.default_matmul_precision(STEP_PRECISION):
        ref_logp_BT = policy.make_logprob_fn(graphdef, mesh, shardings.params, TRAINER.temperature)(
            state.ref_params, batch)
        extras = {"advantages": jax.device_put(advantages_B, parallel.batch_sharding(mesh, 1)),
                  "ref_logp": ref_logp_BT}
        step = step_lib.make_train_step(policy.make_grpo_loss(graphdef, TRAINER), tx, accum_steps=2, mesh=mesh,
                                        state_shardings=shardings, totals_fn=policy.grpo_totals)
        state, metrics = step(state, batch, extras)
    return jax.device_get(metrics), jax.device_get(state.params)


def test_grpo_step_matches_the_cpu(record_property):
    results = {name: _grpo_step(mesh) for name, mesh in _meshes().items()}
    assert float(results["device"][0]["kl"]) > 0
    np.testing.assert_allclose(results["device"][0]["kl"], results["cpu"][0]["kl"], rtol=1e-3, atol=1e-7)
    _assert_same_step(results, record_property, "grpo")


LORA_TINY = dataclasses.replace(TINY, lora=LoraConfig(rank=4, alpha=8.0))


def _lora_steps(mesh, mode: str, steps: int = 2):
    """(metrics, params) after `steps` LoRA SFT steps with `mode`'s placement on `mesh`.
    An offloaded base runs remat none (which keeps matmul outputs only); on the device its
    equal is save_all_matmuls (tests/train/test_offload.py)."""
    remat = "none" if mode == "optimizer_and_frozen" else "save_all_matmuls"
    tx = optim.make_optimizer(TRAINER, 10)
    graphdef, params, frozen = lora.split_trainable(_model(dataclasses.replace(LORA_TINY, remat=remat), mesh))
    state, shardings = state_lib.create_train_state(params, tx, mesh, seed=0)
    state, shardings, frozen = offload.apply(state, shardings, frozen, mode)
    step = step_lib.make_train_step(sft.make_sft_loss(graphdef), tx, accum_steps=2, mesh=mesh,
                                    state_shardings=shardings, frozen=frozen, combine=lora.combine)
    with jax.default_matmul_precision(STEP_PRECISION):
        for seed in range(steps):  # the second step reads the optimizer state written back to the host
            state, metrics = step(state, helpers.to_mesh(_batch(seed), mesh))
    kinds = {x.sharding.memory_kind for x in jax.tree.leaves((frozen, state.opt_state))}
    assert kinds == ({offload.HOST} if mode != "none" else {offload.DEVICE}), (mode, kinds)
    return jax.device_get(metrics), jax.device_get(state.params)


def test_offloaded_step_matches_the_cpu(record_property):
    """trainer.offload=optimizer_and_frozen on the device (pinned_host memory; the path runs
    on CPU too, where the recipes skip it) against the plain step on the CPU."""
    meshes = _meshes()
    resolved = offload.resolve("optimizer_and_frozen", meshes["device"])
    record_property("offload_resolved", resolved)
    assert resolved == ("none" if jax.default_backend() == "cpu" else "optimizer_and_frozen")
    results = {"cpu": _lora_steps(meshes["cpu"], "none"),
               "device": _lora_steps(meshes["device"], "optimizer_and_frozen")}
    _assert_same_step(results, record_property, "offload")


def _custom_calls(compiled_text: str) -> list[str]:
    return sorted(set(re.findall(r'custom_call_target="([^"]+)"', compiled_text)))


def test_attention_path_is_recorded(record_property):
    """Which attention kernel the compiled bf16 forward uses: a cuDNN fused-attention custom
    call (`__cudnn$fmha...`) or XLA's own dots and fusions. jax.nn.dot_product_attention's
    default is XLA; the probe records whether cuDNN's kernel (implementation="cudnn") would
    run on this device at the model's shapes, and how far its output is from XLA's."""
    device = jax.devices()[0]
    ids, mask = _prompts()
    model = _model(dataclasses.replace(TINY, dtype="bfloat16"), _meshes()["device"])
    calls = _custom_calls(jax.jit(lambda m, x, a: m(x, a)).lower(model, ids, mask).compile().as_text())
    path = "cudnn" if any("cudnn$fmha" in c for c in calls) else "xla"
    for key, value in (("platform", device.platform), ("device_kind", device.device_kind),
                       ("jax_version", jax.__version__), ("attention_path", path),
                       ("custom_calls", " ".join(calls) or "none"), ("cudnn_probe", _cudnn_probe())):
        record_property(key, value)
    assert path in ("cudnn", "xla")
    if device.platform == "cpu":
        assert path == "xla"


def _cudnn_probe() -> str:
    """'max |cudnn - xla| = ...' for one causal bf16 attention at the tiny model's shapes,
    or why cuDNN's kernel did not run (always 'not a GPU' off NVIDIA devices)."""
    if jax.devices()[0].platform != "gpu":
        return "not a GPU"
    B, T, N, K, H = 4, 128, TINY.num_attention_heads, TINY.num_key_value_heads, TINY.resolved_head_dim
    keys = jax.random.split(jax.random.key(0), 3)
    q_BTNH = jax.random.normal(keys[0], (B, T, N, H), jnp.bfloat16)
    k_BSKH, v_BSKH = (jax.random.normal(k, (B, T, K, H), jnp.bfloat16) for k in keys[1:])
    attend = {impl: jax.jit(lambda q, k, v, impl=impl: jax.nn.dot_product_attention(
        q, k, v, is_causal=True, implementation=impl)) for impl in ("xla", "cudnn")}
    try:
        out = {impl: np.asarray(f(q_BTNH, k_BSKH, v_BSKH).astype(jnp.float32)) for impl, f in attend.items()}
    except Exception as e:  # noqa: BLE001 - the record is the point: why the kernel did not run
        return f"unavailable: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return f"max |cudnn - xla| = {float(np.abs(out['cudnn'] - out['xla']).max()):.3g}"
