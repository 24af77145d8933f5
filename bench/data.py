"""Input pipeline throughput vs what training consumes: `python bench/data.py [--examples N]`.

Measures, on this host, (1) the one-off preparation (render through the chat template +
tokenize) and (2) the steady-state Grain iterator (shuffle, pack at max_length 2048, stack
into Batch rows) in tokens per second, and prints them next to the tokens per second an
SFT step of the Llama-3.2-1B preset consumes on one accelerator at a stated utilisation.
The input never stalls training while (2) stays well above the consumer's rate per host.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import yaml
from transformers import AutoTokenizer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # a plain checkout too

from atlas_jax.config import DataConfig  # noqa: E402
from atlas_jax.data import sft  # noqa: E402
from atlas_jax.data.build_tokenizer import ASSET_DIR  # noqa: E402

# Dense bf16 peak FLOP/s per device, and the model-FLOPs utilisation a good SFT step reaches.
PEAK_FLOPS = {"H100/H200 (bf16)": 989e12, "A100 (bf16)": 312e12, "TPU v5p (bf16)": 459e12}
MFU = 0.4


def llama_params(model_yaml: str) -> float:
    """Parameter count from a model preset (embeddings counted once when tied)."""
    m = yaml.safe_load(open(model_yaml))
    d, f, layers, v = m["hidden_size"], m["intermediate_size"], m["num_hidden_layers"], m["vocab_size"]
    head_dim = m.get("head_dim") or d // m["num_attention_heads"]
    attn = d * head_dim * (2 * m["num_attention_heads"] + 2 * m["num_key_value_heads"])
    per_layer = attn + 3 * d * f + 2 * d
    return layers * per_layer + v * d * (1 if m.get("tie_word_embeddings") else 2) + d


def consumed_tokens_per_s(params: float, seq_len: int, layers: int, d: int, peak: float) -> float:
    # 6N per token for the dense part plus 12 L T D for attention scores (fwd + bwd).
    flops_per_token = 6 * params + 12 * layers * seq_len * d
    return peak * MFU / flops_per_token


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--examples", type=int, default=20_000)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(str(ASSET_DIR))
    rows = []
    for packing, strategy in ((True, "first_fit"), (True, "best_fit"), (False, "first_fit")):
        cfg = DataConfig(num_synthetic_examples=args.examples, max_length=2048, packing=packing,
                         packing_strategy=strategy, eval_split_ratio=0.0)
        sft.prepare.cache_clear()
        start = time.perf_counter()
        examples = sft.prepare(cfg, tokenizer, "train")
        prep_s = time.perf_counter() - start
        it = sft.sft_batches(cfg, tokenizer, split="train", batch_size=args.batch_size, seed=0)
        next(it)  # first-batch set-up is not steady state
        start, real_tokens, slots = time.perf_counter(), 0, 0
        for _ in range(args.steps):
            batch = next(it)
            real_tokens += int((batch.segment_ids > 0).sum())
            slots += batch.tokens.size
        iter_s = time.perf_counter() - start
        name = f"packed {strategy}" if packing else "unpacked (padded rows)"
        rows.append((name, examples.num_tokens / prep_s, real_tokens / iter_s, real_tokens / slots))

    print(f"\nSFT input pipeline, built-in tokenizer, max_length 2048, batch {args.batch_size}, "
          f"{args.examples} synthetic examples, 1 host process")
    print(f"{'pipeline':<26}{'prepare tok/s':>16}{'iterate tok/s':>16}{'non-pad share':>15}")
    for name, prep, it_rate, fill in rows:
        print(f"{name:<26}{prep:>16,.0f}{it_rate:>16,.0f}{fill:>15.1%}")

    preset = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "model",
                          "llama3_2_1b.yaml")
    with open(preset) as f:
        m = yaml.safe_load(f)
    params = llama_params(preset)
    print(f"\nConsumption: SFT step of llama3_2_1b ({params / 1e9:.2f} B params), seq 2048, MFU {MFU:.0%}")
    print(f"{'device':<22}{'tok/s per device':>18}{'x8 devices':>14}{'pipeline margin (8)':>21}")
    best = max(r[2] for r in rows if r[0].startswith("packed"))
    for device, peak in PEAK_FLOPS.items():
        rate = consumed_tokens_per_s(params, 2048, m["num_hidden_layers"], m["hidden_size"], peak)
        print(f"{device:<22}{rate:>18,.0f}{8 * rate:>14,.0f}{best / (8 * rate):>20.1f}x")
    print("\nPreparation runs once per run before step 0; only the iterate column gates training.")


if __name__ == "__main__":
    main()
