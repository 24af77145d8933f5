"""Decoder benchmarks: forward tokens/s, compile time vs depth, host RSS while loading.

    python bench/model.py [--skip-load]

Prints a table. Targets (issue 3): 32 layers compile in <= 1.5x the 4-layer time (scanned
layers); peak host RSS while loading a ~1 GB safetensors checkpoint onto 8 simulated
devices <= 1.3x the file size (measured above the process's RSS before loading).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

BENCH_CFG = dict(vocab_size=8192, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                 num_attention_heads=8, num_key_value_heads=4, qk_norm=True)
# ~285M params, ~1.1 GB in float32
LOAD_CFG = dict(vocab_size=32000, hidden_size=1024, intermediate_size=4096, num_hidden_layers=16,
                num_attention_heads=16, num_key_value_heads=8, qk_norm=True, tie_word_embeddings=True)


def forward_tokens_per_s(batch=8, length=256, repeats=5):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from atlas_jax.config import ModelConfig
    from atlas_jax.models import init_model

    model = init_model(ModelConfig(**BENCH_CFG))
    graphdef, params = nnx.split(model)
    fwd = jax.jit(lambda p, ids: nnx.merge(graphdef, p)(ids))
    ids = jnp.ones((batch, length), jnp.int32)
    fwd(params, ids).block_until_ready()
    start = time.perf_counter()
    for _ in range(repeats):
        fwd(params, ids).block_until_ready()
    return batch * length * repeats / (time.perf_counter() - start)


def compile_seconds(layers: int, batch=4, length=128) -> float:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from atlas_jax.config import ModelConfig
    from atlas_jax.models import Decoder

    cfg = ModelConfig(**{**BENCH_CFG, "num_hidden_layers": layers})
    abstract = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
    graphdef, params = nnx.split(abstract)

    def loss(p, ids):  # forward + backward: what a training step compiles
        return jnp.mean(nnx.merge(graphdef, p)(ids) ** 2)

    ids = jax.ShapeDtypeStruct((batch, length), jnp.int32)
    start = time.perf_counter()
    jax.jit(jax.grad(loss)).lower(params, ids).compile()
    return time.perf_counter() - start


def _write_checkpoint(path: str) -> int:
    """A synthetic HF directory with random float32 weights, written tensor by tensor."""
    import numpy as np

    from atlas_jax.config import ModelConfig
    from atlas_jax.models import hf

    cfg = ModelConfig(family="qwen3", **LOAD_CFG)
    model = _abstract(cfg)
    os.makedirs(path, exist_ok=True)
    rng = np.random.default_rng(0)
    specs = {}
    for ours, name, n_in in hf.key_table(cfg):
        var = hf._get(model, ours)
        shape = var.shape[1:] if ours.startswith("layers.") else var.shape
        shape = hf._to_hf(np.empty(shape, np.int8), n_in).shape
        for i in range(cfg.num_hidden_layers) if ours.startswith("layers.") else [None]:
            specs[name.format(i=i)] = (shape, np.dtype(np.float32))
    file = os.path.join(path, "model.safetensors")
    hf.safetensors_io.write(file, specs, lambda n: rng.standard_normal(specs[n][0], np.float32) * 0.02)
    import json
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf.config_to_hf(cfg), f)
    return os.path.getsize(file)


def _abstract(cfg):
    from flax import nnx

    from atlas_jax.models import Decoder
    return nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))


def _load_child(path: str) -> None:
    """Runs in a fresh process with 8 CPU devices; prints baseline and peak RSS in bytes."""
    import resource

    import jax

    from atlas_jax.config import MeshConfig
    from atlas_jax.models import from_pretrained
    from atlas_jax.parallel import make_mesh

    mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
    jax.device_put(0.0).block_until_ready()  # backend up before the baseline
    with open("/proc/self/statm") as f:
        baseline = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    start = time.perf_counter()
    model = from_pretrained(path, mesh=mesh)
    jax.block_until_ready(model.embed[...])
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"RESULT {baseline} {peak} {seconds}")


def load_rss(path: str):
    size = _write_checkpoint(path)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    out = subprocess.run([sys.executable, __file__, "--load-child", path], env=env, check=True,
                         capture_output=True, text=True).stdout
    baseline, peak, seconds = [float(x) for x in out.split("RESULT")[1].split()]
    return size, baseline, peak, seconds


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--skip-load", action="store_true")
    parser.add_argument("--load-child")
    parser.add_argument("--checkpoint-dir", default="/tmp/atlas_jax_bench_1gb")
    args = parser.parse_args()
    if args.load_child:
        return _load_child(args.load_child)
    import jax
    rows = [("device", jax.devices()[0].device_kind, "")]
    rows.append(("forward tokens/s (B=8, T=256, D=256, 4 layers)", f"{forward_tokens_per_s():,.0f}", ""))
    compile_seconds(2)  # first compile in a process pays one-time tracing/backend costs
    c4, c32 = compile_seconds(4), compile_seconds(32)
    rows.append(("compile s, fwd+bwd, 4 layers", f"{c4:.2f}", ""))
    rows.append(("compile s, fwd+bwd, 32 layers", f"{c32:.2f}", f"ratio {c32 / c4:.2f} (target <= 1.5)"))
    if not args.skip_load:
        size, baseline, peak, seconds = load_rss(args.checkpoint_dir)
        rows.append(("checkpoint file GB", f"{size / 1e9:.2f}", ""))
        rows.append(("load seconds onto 8 devices (fsdp4 x tensor2)", f"{seconds:.1f}", ""))
        rows.append(("peak RSS GB (baseline before load)", f"{peak / 1e9:.2f} ({baseline / 1e9:.2f})", ""))
        rows.append(("(peak - baseline) / file size", f"{(peak - baseline) / size:.2f}", "target <= 1.3"))
    width = max(len(r[0]) for r in rows)
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:>16}  {note}")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
