"""Decode throughput of `generate` against transformers' PyTorch `generate`, and roofline.

    python bench/generate.py [--batch 8 --prompt 32 --new 64 --reps 5]

Same Qwen3 config for both (hidden 512, 8 layers, 8 heads / 4 kv heads, vocab 8192),
random weights, greedy, float32, every row forced to run the full budget (no EOS).

Decode time is separated from prefill by difference: generating `new` tokens minus
generating `short` (= new/2 + 1, the same shape bucket, so the same compiled program) is
the time of the last new - short decode steps. Both libraries are measured the same way,
interleaved in one process, and the medians over --reps are reported (the machine's cores
are shared, so a single timing says little). Compile time is reported apart.

Roofline: a decode step must read every weight once (the tied embedding table in full,
for the logits) and the K/V of the filled cache prefix; tokens/s <= batch x bandwidth /
bytes per step, with the bytes of the measured steps and the best read bandwidth measured
here (numpy sums over a 1 GiB array, on one thread and on every core).
Targets (issue 4): >= 80% of the roofline, >= 1.6x PyTorch.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

QWEN3_BENCH = dict(vocab_size=8192, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                   num_attention_heads=8, num_key_value_heads=4, head_dim=64, tie_word_embeddings=True)


def read_bandwidth(threads: int, gigabytes: float = 1.0, repeats: int = 5) -> float:
    """Bytes/s of a streaming read (numpy sums over `threads` chunks of a float32 array), best of N."""
    a = np.ones(int(gigabytes * 2**30) // 4, np.float32)
    chunks = np.array_split(a, threads)
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats):
            start = time.perf_counter()
            list(pool.map(np.sum, chunks))
            best = min(best, time.perf_counter() - start)
    return a.nbytes / best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def ours(batch: int, prompt: int):
    """(generate(n) -> seconds, bytes of weights, compile seconds)."""
    import jax

    from atlas_jax.config import ModelConfig
    from atlas_jax.generation import generate
    from atlas_jax.models import init_model

    cfg = ModelConfig(family="qwen3", qk_norm=True, **QWEN3_BENCH)
    model = init_model(cfg)
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, prompt)).astype(np.int32)
    mask = np.ones_like(ids)

    def run(n):
        return _timed(lambda: jax.block_until_ready(generate(model, ids, mask, max_new_tokens=n).tokens))

    return run, sum(x.nbytes for x in jax.tree.leaves(model)), cfg


def pytorch(batch: int, prompt: int):
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Qwen3Config(**QWEN3_BENCH)).eval()
    ids = torch.randint(0, QWEN3_BENCH["vocab_size"], (batch, prompt))

    def run(n):
        with torch.no_grad():
            return _timed(lambda: model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                                 pad_token_id=0))

    return run


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--skip-torch", action="store_true")
    args = parser.parse_args()
    import jax

    from atlas_jax.generation import bucket

    B, new = args.batch, args.new
    short = bucket(new) // 2 + 1
    assert bucket(short) == bucket(new) and short < new, "--new must leave room for a shorter run in its bucket"
    run_ours, weight_bytes, cfg = ours(B, args.prompt)
    start = time.perf_counter()
    first = run_ours(new)
    run_torch = None if args.skip_torch else pytorch(B, args.prompt)
    if run_torch:
        run_torch(short)  # warm-up
    t = {k: [] for k in ("ours_new", "ours_short", "torch_new", "torch_short")}
    bw1, bwn = [], []
    for _ in range(args.reps):  # interleaved: both see the same share of the machine
        t["ours_new"].append(run_ours(new))
        t["ours_short"].append(run_ours(short))
        if run_torch:
            t["torch_new"].append(run_torch(new))
            t["torch_short"].append(run_torch(short))
        bw1.append(read_bandwidth(1, repeats=2))
        bwn.append(read_bandwidth(os.cpu_count() or 1, repeats=2))
    med = {k: float(np.median(v)) for k, v in t.items() if v}
    compile_s = first - med["ours_new"]
    bandwidth = max(max(bw1), max(bwn))
    # bytes per measured step: all weights + K and V of the filled prefix, averaged over steps short..new-1
    kv_per_slot = 2 * cfg.num_hidden_layers * B * cfg.num_key_value_heads * cfg.resolved_head_dim * 4
    filled = args.prompt + (short + new - 1) / 2
    step_bytes = weight_bytes + kv_per_slot * filled
    roofline = B * bandwidth / step_bytes

    def decode(prefix):
        return B * (new - short) / (med[f"{prefix}_new"] - med[f"{prefix}_short"])

    tps = decode("ours")
    rows = [("device", f"{jax.devices()[0].device_kind} x{os.cpu_count()} cores", ""),
            ("read bandwidth GB/s, 1 thread / all", f"{max(bw1) / 1e9:.1f} / {max(bwn) / 1e9:.1f}",
             "best of reps; the higher sets the roofline"),
            ("bytes read per decode step MB", f"{step_bytes / 1e6:.1f}",
             f"weights {weight_bytes / 1e6:.1f} + KV of {filled:.0f} filled slots"),
            ("roofline decode tokens/s", f"{roofline:,.0f}", ""),
            ("atlas_jax decode tokens/s", f"{tps:,.0f}", f"{tps / roofline:.0%} of roofline (target >= 80%)"),
            ("atlas_jax end-to-end tokens/s", f"{B * new / med['ours_new']:,.0f}", "prefill + decode"),
            ("atlas_jax compile s (apart)", f"{compile_s:.1f}", "")]
    if run_torch:
        torch_tps = decode("torch")
        rows += [("transformers decode tokens/s", f"{torch_tps:,.0f}",
                  f"atlas_jax / torch = {tps / torch_tps:.2f}x (target >= 1.6x)"),
                 ("transformers end-to-end tokens/s", f"{B * new / med['torch_new']:,.0f}",
                  f"atlas_jax / torch = {med['torch_new'] / med['ours_new']:.2f}x")]
    width = max(len(r[0]) for r in rows)
    print(f"batch {B}, prompt {args.prompt}, new tokens {new} (decode timed over steps {short}..{new - 1}), "
          f"greedy, float32, medians of {args.reps} interleaved reps; load average {os.getloadavg()[0]:.1f}")
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:>14}  {note}")
    print(f"total bench time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
