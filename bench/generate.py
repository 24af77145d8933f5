"""Decode throughput of `generate` against transformers' PyTorch `generate`, and roofline.

    python bench/generate.py [--batch 8 --prompt 32 --new 64]

Same Qwen3 config for both (hidden 512, 8 layers, 8 heads / 4 kv heads, vocab 8192),
random weights, greedy, every row forced to run the full budget (no EOS). Compile time is
reported apart. The roofline is memory-bound decode: each step must read all weights
plus the KV cache slots it attends over, so tokens/s <= bandwidth / bytes_per_step x batch,
with bandwidth measured here by a large streaming read. Targets (issue 4): >= 80% of the
roofline, >= 1.6x PyTorch.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

QWEN3_BENCH = dict(vocab_size=8192, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                   num_attention_heads=8, num_key_value_heads=4, head_dim=64, tie_word_embeddings=True)


def read_bandwidth(gigabytes: float = 1.0, repeats: int = 3) -> float:
    """Bytes/s of one large streaming read (numpy sum over a float32 array), best of N."""
    a = np.ones(int(gigabytes * 2**30) // 4, np.float32)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a.sum()
        best = min(best, time.perf_counter() - start)
    return a.nbytes / best


def ours(batch: int, prompt: int, new: int):
    import jax

    from atlas_jax.config import ModelConfig
    from atlas_jax.generation import bucket, generate
    from atlas_jax.models import init_model

    cfg = ModelConfig(family="qwen3", qk_norm=True, **QWEN3_BENCH)
    model = init_model(cfg)
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, prompt)).astype(np.int32)
    mask = np.ones_like(ids)
    start = time.perf_counter()
    jax.block_until_ready(generate(model, ids, mask, max_new_tokens=new).tokens)
    first = time.perf_counter() - start
    start = time.perf_counter()
    jax.block_until_ready(generate(model, ids, mask, max_new_tokens=new).tokens)
    run = time.perf_counter() - start
    # what one decode step reads: every weight, and K and V over all cache slots
    weights = sum(x.nbytes for x in jax.tree.leaves(model))
    slots = bucket(prompt) + bucket(new)
    cache = 2 * cfg.num_hidden_layers * batch * slots * cfg.num_key_value_heads * cfg.resolved_head_dim * 4
    return batch * new / run, first - run, weights + cache


def pytorch(batch: int, prompt: int, new: int) -> float:
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Qwen3Config(**QWEN3_BENCH)).eval()
    ids = torch.randint(0, QWEN3_BENCH["vocab_size"], (batch, prompt))
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        model.generate(ids, **kw)  # warm-up
        start = time.perf_counter()
        model.generate(ids, **kw)
    return batch * new / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--skip-torch", action="store_true")
    args = parser.parse_args()
    import jax

    bandwidth = read_bandwidth()
    tps, compile_s, step_bytes = ours(args.batch, args.prompt, args.new)
    roofline = bandwidth / step_bytes * args.batch
    rows = [("device", jax.devices()[0].device_kind, ""),
            ("measured read bandwidth GB/s", f"{bandwidth / 1e9:.1f}", ""),
            ("bytes read per decode step MB", f"{step_bytes / 1e6:.1f}", "weights + KV cache"),
            ("roofline tokens/s", f"{roofline:,.0f}", ""),
            ("atlas_jax generate tokens/s", f"{tps:,.0f}", f"{tps / roofline:.0%} of roofline (target >= 80%)"),
            ("atlas_jax compile s (apart)", f"{compile_s:.1f}", "")]
    if not args.skip_torch:
        torch_tps = pytorch(args.batch, args.prompt, args.new)
        rows.append(("transformers generate tokens/s", f"{torch_tps:,.0f}",
                     f"atlas_jax / torch = {tps / torch_tps:.2f}x (target >= 1.6x)"))
    width = max(len(r[0]) for r in rows)
    print(f"batch {args.batch}, prompt {args.prompt}, new tokens {args.new}, greedy, float32")
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:>14}  {note}")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
