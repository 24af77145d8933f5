"""What QLoRA's 4-bit base costs in accuracy: NF4 against the bf16 model it replaces.

    python bench/quant_error.py [model=tiny] [--checkpoint HF_DIR]

For every projection the relative error of the dequantised weights, then the relative
error of the whole forward on random tokens: logits, and the next-token distribution
(softmax), both as ||quantised - bf16|| / ||bf16||. Two scale rules side by side: plain
absmax per group of 64 (bitsandbytes' NF4) and the searched clipping factor atlas_jax
uses (models/quant.py). Random initial weights by default; --checkpoint measures a
trained model (a Hugging Face directory, e.g. a quickstart export).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # a plain checkout too

from atlas_jax.config import LoraConfig, compose  # noqa: E402
from atlas_jax.models import from_pretrained, load_model, quant  # noqa: E402


def _model(cfg, checkpoint, four_bit: bool):
    cfg = dataclasses.replace(cfg, load_in_4bit=four_bit)
    return from_pretrained(checkpoint, config=cfg) if checkpoint else load_model(cfg, seed=0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", default=["model=tiny"], help="Hydra overrides (model=...)")
    p.add_argument("--checkpoint", default=None, help="a Hugging Face directory to quantise instead")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--length", type=int, default=128)
    args = p.parse_args()
    model_cfg = compose(["+run=teacher_sft", *args.overrides]).model
    # QLoRA needs adapters; fresh ones (B = 0) leave the forward exactly the base's
    model_cfg = dataclasses.replace(model_cfg, dtype="bfloat16", param_dtype="bfloat16",
                                    model_name_or_path=args.checkpoint,
                                    lora=LoraConfig(rank=8, target_modules=tuple(quant.INPUT_AXES)))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, model_cfg.vocab_size, (args.batch, args.length)))
    reference = _model(model_cfg, args.checkpoint, False)
    ref_logits = reference(tokens).astype(jnp.float32)
    ref_probs = jax.nn.softmax(ref_logits)
    rel = lambda a, b: float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))  # noqa: E731

    start = time.perf_counter()
    q_model = _model(model_cfg, args.checkpoint, True)  # searched scales, as training loads it
    load_s = time.perf_counter() - start
    requantize = jax.jit(quant.quantize, static_argnums=(1, 2))
    rows = {}
    for rule, factors in (("absmax", (1.0,)), ("searched", quant.CLIP_FACTORS)):
        weights = {}
        for name in quant.INPUT_AXES:
            w = getattr(reference.layers, name)[...].astype(jnp.float32)
            codes, scale = requantize(w, name, factors)
            getattr(q_model.layers, name).set_value(codes)
            getattr(q_model.layers, name + quant.SCALE_SUFFIX).set_value(scale)
            deq = jax.vmap(lambda c, s: quant.dequantize(c, s, jnp.float32))(codes, scale)
            weights[name] = rel(deq, w)
        logits = q_model(tokens).astype(jnp.float32)
        rows[rule] = (weights, rel(logits, ref_logits), rel(jax.nn.softmax(logits), ref_probs))

    print(f"NF4 vs bf16: {model_cfg.name or args.checkpoint}, "
          f"{'checkpoint ' + args.checkpoint if args.checkpoint else 'random init'}, "
          f"{args.batch} x {args.length} random tokens; relative errors ||q - ref|| / ||ref||")
    print(f"{'':28}" + "".join(f"{rule:>12}" for rule in rows))
    for name in quant.INPUT_AXES:
        print(f"{'weights ' + name:28}" + "".join(f"{r[0][name]:12.2%}" for r in rows.values()))
    print(f"{'logits':28}" + "".join(f"{r[1]:12.2%}" for r in rows.values()))
    print(f"{'next-token distribution':28}" + "".join(f"{r[2]:12.2%}" for r in rows.values()))
    print(f"load with 4-bit base (searched scales): {load_s:.1f} s")


if __name__ == "__main__":
    main()
