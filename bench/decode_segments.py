"""Long-budget decode with and without the growing cache (generate(grow_cache=...)).

    python bench/decode_segments.py [--batch 32 --prompt 256 --new 1024 --model tiny --reps 3]

Rollout-like shapes on a model preset (random weights, temperature 1, no EOS so every row
runs the whole budget): with grow_cache the budget is decoded in segments (a quarter, a
quarter, a half) whose attention reads only the cache slots the segment can fill. Prints
tokens/s (best of --reps, the first call apart) and the speed-up.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--new", type=int, default=1024)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    import jax
    import numpy as np

    from atlas_jax.config import ModelConfig, model_preset
    from atlas_jax.generation import generate
    from atlas_jax.generation.sampler import bucket, segment_ends
    from atlas_jax.models import init_model

    cfg = model_preset(args.model, numerics=ModelConfig())
    model = init_model(cfg)
    ids = np.random.default_rng(0).integers(3, cfg.vocab_size, (args.batch, args.prompt)).astype(np.int32)
    mask = np.ones_like(ids)

    def run(grow: bool, seed: int) -> float:
        start = time.perf_counter()
        jax.block_until_ready(generate(model, ids, mask, max_new_tokens=args.new, temperature=1.0, seed=seed,
                                       grow_cache=grow).tokens)
        return time.perf_counter() - start

    first = {grow: run(grow, 0) for grow in (False, True)}
    best = {grow: min(run(grow, s) for s in range(1, args.reps + 1)) for grow in (False, True)}
    tokens = args.batch * args.new
    print(f"model={args.model} (hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers), batch {args.batch}, "
          f"prompt {args.prompt}, {args.new} new tokens, segments end at {segment_ends(bucket(args.new))}; "
          f"best of {args.reps}")
    for grow in (False, True):
        print(f"grow_cache={grow!s:<5}  {tokens / best[grow]:>9,.0f} tok/s  first call {first[grow]:.1f} s")
    print(f"speed-up {best[False] / best[True]:.2f}x")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
