"""Decode throughput of `generate` against transformers' PyTorch `generate`, Tunix's vanilla
sampler, and the roofline.

    python bench/generate.py [--batch 8 --prompt 32 --new 64 --reps 5]
    bash bench/peers/setup_tunix.sh   # once: Tunix in its own venv, for the "Tunix" rows

Same Qwen3 config for both (hidden 512, 8 layers, 8 heads / 4 kv heads, vocab 8192),
random weights, greedy, float32, every row forced to run the full budget (no EOS).

Decode time is separated from prefill by a fit: `generate` runs for 5 budgets from
new/2 + 1 to new (one shape bucket, so one compiled program), and the slope of the least
squares line through (tokens, seconds) is the time of one decode step. Both libraries are
measured the same way, interleaved in one process, keeping the best of --reps per budget
(the machine's cores are shared: interference only ever adds time; the difference of two
budgets' medians, this bench's first method, moved by 40% between runs). Compile time is
reported apart.

Tunix (Google's JAX RL library, google-tunix, in bench/peers/tunix-venv: its pins conflict
with ours): bench/peers/tunix_grpo.py --mode generate runs its `generate.sampler.Sampler` on
Tunix's own Qwen3 built from the same config with random weights, as a subprocess, greedy,
the same batch, prompt length and budgets, every row the full budget, best of --reps calls
per budget, and its decode rate comes from the same fit. It runs between two halves of our
and PyTorch's reps, so the three see the same stretch of the machine; without the venv its
rows are left out (--skip-tunix leaves them out too).

Roofline: a decode step must read every weight once (the tied embedding table in full,
for the logits) and the K/V of the filled cache prefix; tokens/s <= batch x bandwidth /
bytes per step, with the bytes of the measured steps and the best read bandwidth measured
here (numpy sums over a 1 GiB array, on one thread and on every core).
Targets (issue 4): >= 80% of the roofline, >= 1.6x PyTorch.

The "matmul floor" row times the decode step's weight matmuls alone (the same weights, a
[batch, in] input, one jitted call: q/k/v, o, gate/up, down per layer, then the head): what
XLA's dot kernels reach on this machine, so the rest of the step is what it adds on top.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

PEERS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "peers")
TUNIX_PYTHON = os.path.join(PEERS, "tunix-venv", "bin", "python")
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
    """(generate(n) -> seconds, the model)."""
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

    return run, model


def matmul_floor(model, batch: int, reps: int) -> float:
    """Best seconds of one decode step's weight matmuls alone, chained layer by layer as in the model."""
    import jax
    import jax.numpy as jnp

    layers = model.layers
    L, D = layers.q_proj.shape[0], model.config.hidden_size
    weights = {name: getattr(layers, name)[...].reshape(L, -1, getattr(layers, name).shape[-1])
               for name in ("o_proj", "gate_proj", "up_proj", "down_proj")}
    weights.update({name: getattr(layers, name)[...].reshape(L, D, -1) for name in ("q_proj", "k_proj", "v_proj")})

    @jax.jit
    def step(x, w, head):
        for l in range(L):
            q, k, v = (x @ w[n][l] for n in ("q_proj", "k_proj", "v_proj"))
            x = x + (q + jnp.sum(k) + jnp.sum(v)) @ w["o_proj"][l]
            x = x + (jax.nn.silu(x @ w["gate_proj"][l]) * (x @ w["up_proj"][l])) @ w["down_proj"][l]
        return x @ head.T

    weights = jax.tree.map(lambda a: list(a), weights)  # per-layer arrays, sliced once, outside the timing
    args = (jnp.ones((batch, D), jnp.float32), weights, model.embed[...])
    jax.block_until_ready(step(*args))
    return min(_timed(lambda: jax.block_until_ready(step(*args))) for _ in range(20 * reps))


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


def tunix(batch: int, prompt: int, budgets: list, reps: int) -> dict:
    """Tunix's vanilla sampler in its venv (bench/peers/tunix_grpo.py --mode generate):
    {"best_s": {budget: seconds}, "first_call_s": {...}, "tunix_version": ...}."""
    c = QWEN3_BENCH
    cmd = [TUNIX_PYTHON, os.path.join(PEERS, "tunix_grpo.py"), "--mode", "generate",
           "--vocab-size", str(c["vocab_size"]), "--hidden-size", str(c["hidden_size"]),
           "--intermediate-size", str(c["intermediate_size"]), "--num-layers", str(c["num_hidden_layers"]),
           "--num-heads", str(c["num_attention_heads"]), "--num-kv-heads", str(c["num_key_value_heads"]),
           "--head-dim", str(c["head_dim"]), "--rope-theta", "1000000", "--tie-word-embeddings", "true",
           "--prompts", str(batch), "--G", "1", "--prompt-len", str(prompt),
           "--budgets", ",".join(map(str, budgets)), "--steps", str(reps)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("JSON ")]
    if done.returncode or not lines:
        raise SystemExit(f"Tunix sampler run failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
    return json.loads(lines[-1][5:])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--skip-torch", action="store_true")
    parser.add_argument("--skip-tunix", action="store_true")
    args = parser.parse_args()
    import jax

    from atlas_jax.generation import bucket

    B, new = args.batch, args.new
    short = bucket(new) // 2 + 1
    assert bucket(short) == bucket(new) and short < new, "--new must leave room for a shorter run in its bucket"
    budgets = np.linspace(short, new, 5).round().astype(int).tolist()
    run_ours, model = ours(B, args.prompt)
    cfg, weight_bytes = model.config, sum(x.nbytes for x in jax.tree.leaves(model))
    start = time.perf_counter()
    first = run_ours(new)
    run_torch = None if args.skip_torch else pytorch(B, args.prompt)
    if run_torch:
        run_torch(short)  # warm-up
    runs = {"ours": run_ours, "torch": run_torch} if run_torch else {"ours": run_ours}
    t = {(name, n): [] for name in runs for n in budgets}
    # bandwidth before and after the timed runs, not between them: freeing its 1 GiB array
    # hands pages back to the OS, and the next generate call's buffers would fault them in
    bw1, bwn = [read_bandwidth(1, repeats=2)], [read_bandwidth(os.cpu_count() or 1, repeats=2)]
    with_tunix = not args.skip_tunix and os.path.exists(TUNIX_PYTHON)
    peer = None
    for rep in range(args.reps):  # interleaved: both see the same share of the machine
        if with_tunix and rep == args.reps // 2:  # Tunix's calls in the middle of ours
            peer = tunix(B, args.prompt, budgets, args.reps)
        for name, n in t:
            t[name, n].append(runs[name](n))
    bw1.append(read_bandwidth(1, repeats=2))
    bwn.append(read_bandwidth(os.cpu_count() or 1, repeats=2))
    best = {k: min(v) for k, v in t.items()}
    compile_s = first - best["ours", new]
    bandwidth = max(max(bw1), max(bwn))
    # bytes per measured step: all weights + K and V of the filled prefix, averaged over steps short..new-1
    kv_per_slot = 2 * cfg.num_hidden_layers * B * cfg.num_key_value_heads * cfg.resolved_head_dim * 4
    filled = args.prompt + (short + new - 1) / 2
    step_bytes = weight_bytes + kv_per_slot * filled
    roofline = B * bandwidth / step_bytes

    def decode(name):  # rows / (seconds per step: the slope over the budgets)
        return B / np.polyfit(budgets, [best[name, n] for n in budgets], 1)[0]

    tps = decode("ours")
    floor_tps = B / matmul_floor(model, B, args.reps)
    rows = [("device", f"{jax.devices()[0].device_kind} x{os.cpu_count()} cores", ""),
            ("read bandwidth GB/s, 1 thread / all", f"{max(bw1) / 1e9:.1f} / {max(bwn) / 1e9:.1f}",
             "best of reps; the higher sets the roofline"),
            ("bytes read per decode step MB", f"{step_bytes / 1e6:.1f}",
             f"weights {weight_bytes / 1e6:.1f} + KV of {filled:.0f} filled slots"),
            ("roofline decode tokens/s", f"{roofline:,.0f}", ""),
            ("atlas_jax decode tokens/s", f"{tps:,.0f}", f"{tps / roofline:.0%} of roofline (target >= 80%)"),
            ("matmul floor tokens/s", f"{floor_tps:,.0f}",
             f"{floor_tps / roofline:.0%} of roofline: the step's weight matmuls alone (XLA dots)"),
            ("atlas_jax end-to-end tokens/s", f"{B * new / best['ours', new]:,.0f}", "prefill + decode"),
            ("atlas_jax compile s (apart)", f"{compile_s:.1f}", "")]
    if run_torch:
        torch_tps = decode("torch")
        rows += [("transformers decode tokens/s", f"{torch_tps:,.0f}",
                  f"atlas_jax / torch = {tps / torch_tps:.2f}x (target >= 1.6x)"),
                 ("transformers end-to-end tokens/s", f"{B * new / best['torch', new]:,.0f}",
                  f"atlas_jax / torch = {best['torch', new] / best['ours', new]:.2f}x")]
    if peer:
        tunix_best = {int(n): sec for n, sec in peer["best_s"].items()}
        tunix_tps = B / np.polyfit(budgets, [tunix_best[n] for n in budgets], 1)[0]
        rows += [(f"Tunix {peer['tunix_version']} decode tokens/s", f"{tunix_tps:,.0f}",
                  f"atlas_jax / Tunix = {tps / tunix_tps:.2f}x (vanilla sampler)"),
                 ("Tunix end-to-end tokens/s", f"{B * new / tunix_best[new]:,.0f}",
                  f"atlas_jax / Tunix = {tunix_best[new] / best['ours', new]:.2f}x"),
                 ("Tunix compile s (apart)", f"{peer['first_call_s'][str(new)] - tunix_best[new]:.1f}",
                  "its decode loop compiles once per budget")]
    width = max(len(r[0]) for r in rows)
    print(f"batch {B}, prompt {args.prompt}, new tokens {new} (decode: slope over budgets {budgets}), "
          f"greedy, float32, best of {args.reps} interleaved reps; load average {os.getloadavg()[0]:.1f}")
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:>14}  {note}")
    print(f"total bench time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
