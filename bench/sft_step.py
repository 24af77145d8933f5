"""SFT update step: our jitted step vs transformers + torch.optim.AdamW, and MFU.

    python bench/sft_step.py                                   # qwen3_33m, batch 8 x 256, CPU
    python bench/sft_step.py --model qwen3_1_7b --length 4096 --batch 8 --dtype bfloat16 \
        --micro-batch 1 --remat save_layer_inputs --skip-torch             # the H100 target (issue 6)

Prints one table: tokens/s of a full optimizer step (forward, backward, AdamW update) for
each implementation on the same config and batch, our achieved FLOP/s (6N + attention per
token) over a matmul FLOP/s measured on the same devices (the best of 5 timings before
and 5 after the steps: the ceiling, not one lucky or unlucky probe), and MFU against the device
table (or --peak-flops). Targets (issue 6): >= 1.0x PyTorch on CPU; >= 45% MFU for
qwen3_1_7b at length 4096 in bf16 on an H100.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen3_33m", help="a configs/model preset")
    p.add_argument("--batch", type=int, default=8, help="global batch (sequences)")
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=-1, help="per data shard; -1 = no accumulation")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--remat", default="none")
    p.add_argument("--scan-layers", choices=("preset", "true", "false"), default="preset",
                   help="run the layers under lax.scan or unrolled; preset = the model yaml's scan_layers")
    p.add_argument("--steps", type=int, default=5, help="timed steps (after 2 warm-up steps)")
    p.add_argument("--peak-flops", type=float, default=None, help="per-device peak, overrides the table")
    p.add_argument("--skip-torch", action="store_true")
    p.add_argument("--huge-pages", choices=("true", "false"), default="true",
                   help="glibc's huge pages for large blocks, as +run=teacher_sft sets (huge_pages; "
                        "atlas_jax/hostmem.py); both sides run under it (one process)")
    return p.parse_args()


def synthetic_rows(batch: int, length: int, vocab: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, vocab, (batch, length)).astype(np.int32)


def ours(args, model_cfg, tokens_BT) -> float:
    """Steady-state seconds per optimizer step of make_train_step on all devices (fsdp)."""
    import jax
    from flax import nnx

    from atlas_jax import parallel
    from atlas_jax.config import MeshConfig, TrainerConfig, accumulation_steps
    from atlas_jax.data import Batch, to_global
    from atlas_jax.models import load_model
    from atlas_jax.train import optim, sft, state as state_lib, step as step_lib

    mesh = parallel.make_mesh(MeshConfig())
    trainer = TrainerConfig(learning_rate=1e-5, weight_decay=1e-4, adam_beta2=0.95, warmup_ratio=0.05)
    total = 1000
    graphdef, params = nnx.split(load_model(model_cfg, mesh=mesh, seed=0), nnx.Param)
    tx = optim.make_optimizer(trainer, total)
    state, shardings = state_lib.create_train_state(params, tx, mesh, seed=0)
    accum = accumulation_steps(args.batch, args.micro_batch, parallel.data_parallel_size(mesh))
    train_step = step_lib.make_train_step(sft.make_sft_loss(graphdef), tx, accum_steps=accum, mesh=mesh,
                                          state_shardings=shardings)
    B, T = tokens_BT.shape
    ones = np.ones((B, T), np.int32)
    mask = np.ones((B, T), np.float32)
    mask[:, 0] = 0.0
    batch = to_global(Batch(tokens=tokens_BT, positions=np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy(),
                            segment_ids=ones, loss_mask=mask), mesh)
    for _ in range(2):
        state, metrics = train_step(state, batch)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(args.steps):  # dispatch-ahead, as the loop does; one sync at the end
        state, metrics = train_step(state, batch)
    jax.block_until_ready((state, metrics))
    return (time.perf_counter() - start) / args.steps


def torch_reference(args, model_cfg, tokens_BT) -> float:
    """Steady-state seconds per step of transformers' Qwen3 + torch.optim.AdamW (CPU)."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    hf = Qwen3Config(vocab_size=model_cfg.vocab_size, hidden_size=model_cfg.hidden_size,
                     intermediate_size=model_cfg.intermediate_size, num_hidden_layers=model_cfg.num_hidden_layers,
                     num_attention_heads=model_cfg.num_attention_heads,
                     num_key_value_heads=model_cfg.num_key_value_heads, head_dim=model_cfg.resolved_head_dim,
                     rms_norm_eps=model_cfg.rms_norm_eps, rope_theta=model_cfg.rope_theta,
                     max_position_embeddings=model_cfg.max_position_embeddings,
                     tie_word_embeddings=model_cfg.tie_word_embeddings)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    model = Qwen3ForCausalLM(hf).to(dtype).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), eps=1e-8, weight_decay=1e-4)
    ids = torch.from_numpy(tokens_BT.astype(np.int64))

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    return (time.perf_counter() - start) / args.steps


def matmul_flops_per_s(dtype: str, n: int = 2048, repeats: int = 5, trials: int = 5) -> float:
    """Measured dense matmul FLOP/s of ONE device (the ceiling a step could reach): the best of
    `trials`, since one short timing on a CPU host moves by 10-20% run to run."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(trials):
        start = time.perf_counter()
        for _ in range(repeats):
            out = f(a)
        out.block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 * repeats / best


def main() -> None:
    args = parse()
    if args.huge_pages == "true":  # before jax: re-executes this process once with glibc's tunable
        from atlas_jax import hostmem

        hostmem.use_huge_pages(__file__)
    import jax

    from omegaconf import OmegaConf

    from atlas_jax.config import CONFIG_DIR, ModelConfig, model_preset
    from atlas_jax.models import param_count
    from atlas_jax.train import metrics as metrics_lib

    preset = CONFIG_DIR / "model" / f"{args.model}.yaml"
    scan = (OmegaConf.load(preset).get("scan_layers", ModelConfig.scan_layers) if args.scan_layers == "preset"
            else args.scan_layers == "true")
    numerics = ModelConfig(dtype=args.dtype, param_dtype="float32", remat=args.remat, scan_layers=scan)
    model_cfg = model_preset(args.model, numerics=numerics)
    tokens_BT = synthetic_rows(args.batch, args.length, model_cfg.vocab_size)
    tokens = args.batch * args.length
    n_dev = jax.device_count()
    fpt = metrics_lib.flops_per_token(model_cfg, args.length, param_count(model_cfg))
    peak = metrics_lib.peak_flops_per_device(jax.devices()[0], args.peak_flops)
    mm_before = matmul_flops_per_s(args.dtype)

    rows = [("atlas_jax (jit step)", ours(args, model_cfg, tokens_BT))]
    if not args.skip_torch:
        rows.append(("transformers + torch AdamW", torch_reference(args, model_cfg, tokens_BT)))
    mm_after = matmul_flops_per_s(args.dtype)
    mm = max(mm_before, mm_after)  # the ceiling: the better of the probes before and after the steps

    print(f"\nSFT step: {args.model} ({param_count(model_cfg) / 1e6:.1f}M params), batch {args.batch} x "
          f"{args.length}, {args.dtype}, {'scanned' if scan else 'unrolled'} layers, {n_dev} x {jax.devices()[0].device_kind}")
    print(f"measured matmul: {mm / 1e9:.1f} GFLOP/s per device (before the steps {mm_before / 1e9:.1f}, "
          f"after {mm_after / 1e9:.1f}); table peak: "
          f"{'%.0f TFLOP/s' % (peak / 1e12) if peak else 'unknown'}; "
          f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r} (atlas_jax/hostmem.py)")
    print(f"{'implementation':28s} {'s/step':>8s} {'tokens/s':>10s} {'vs torch':>9s} {'GFLOP/s':>9s} "
          f"{'of matmul':>10s} {'MFU':>6s}")
    torch_s = rows[1][1] if len(rows) > 1 else None
    for name, sec in rows:
        achieved = fpt * tokens / sec / n_dev
        rel = f"{torch_s / sec:8.2f}x" if torch_s else "      n/a"
        mfu = f"{achieved / peak:6.1%}" if peak else "   n/a"
        print(f"{name:28s} {sec:8.3f} {tokens / sec:10.0f} {rel:>9s} {achieved / 1e9:9.1f} "
              f"{achieved / mm:10.1%} {mfu:>6s}")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
