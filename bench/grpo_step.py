"""One GRPO step (rollout + update) of ours against TRL's GRPOTrainer and Tunix's GRPOLearner,
same model and shapes.

    python bench/grpo_step.py [--models tiny qwen3_33m --prompts 4 --G 8 --prompt-len 64 --new 64 --steps 3]
    python bench/grpo_step.py --threads 1    # one thread each: steadier on a shared, busy CPU host
    python bench/grpo_step.py --threads 1 --lengths varied   # completions end at an EOS, lengths spread
    bash bench/peers/setup_tunix.sh   # once: Tunix in its own venv, for the "Tunix GRPO" rows

Ours: `generation.generate` (G samples per prompt, one prefill), `rl.rollout.training_batch`,
reference log-probs (beta 0.04), `rl.policy.make_grpo_loss` on `train.step.make_train_step`,
on one CPU device. TRL: `GRPOTrainer` (PyTorch, CPU) on the same architecture built from
transformers' Qwen3Config with random weights, same G, prompts, lengths, temperature, beta
and learning rate. Tunix (Google's JAX RL library, `google-tunix`): bench/peers/tunix_grpo.py run
in its own venv (bench/peers/tunix-venv; its pins conflict with ours) as a subprocess, with
Tunix's own Qwen3 (tunix.models.qwen3) built from the same config with random weights,
`GRPOLearner` on an `RLCluster` with its vanilla sampler for rollout, the same G, prompt ids,
lengths, temperature, beta and learning rate; that script's docstring says how it is wired.
With --lengths fixed (the default) every completion runs the full budget (no EOS: ours
eos_token_id=None, TRL min_new_tokens, Tunix a stop id the model cannot emit), so all process
the same tokens. With --lengths varied all stop at the tokenizer's EOS, whose logit
gets the same --eos-bias in every sampler (ours `logit_bias`, transformers' `sequence_bias`
through TRL's generation_kwargs, Tunix a wrap of its sampler's logits-to-token step, which has
no bias hook), so lengths spread the same way; each side's length histogram is printed. The
reward is the share of even token ids (any cheap host reward; it only has to vary within a
group).

rollout = sampling + reward + reference log-probs; update = the optimizer step. Steady-state
times are the median over --steps steps after a first one; for ours and Tunix (both JAX) the
first step's excess over steady state is reported as compile time. TRL is a bench-only
dependency (`pip install trl`) and Tunix a bench-only venv (bash bench/peers/setup_tunix.sh);
without one, its rows are left out.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PEERS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "peers")
TUNIX_PYTHON = os.path.join(PEERS, "tunix-venv", "bin", "python")

BETA, TEMPERATURE, LR = 0.04, 0.7, 1e-6


def reward_even_share(tokens_BT: np.ndarray) -> np.ndarray:
    return (tokens_BT % 2 == 0).mean(axis=1).astype(np.float32)


def ours(preset: str, args) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from atlas_jax import parallel
    from atlas_jax.config import compose
    from atlas_jax.generation import generate
    from atlas_jax.models import load_model
    from atlas_jax.rl import packing, policy
    from atlas_jax.rl.grpo import group_advantages
    from atlas_jax.rl.rollout import Completions, training_batch
    from atlas_jax.train.optim import make_optimizer
    from atlas_jax.train.step import make_train_step

    G, P = args.G, args.prompts
    cfg = compose(["+run=grpo", f"model={preset}", "mesh=cpu", f"trainer.num_generations={G}",
                   f"trainer.max_completion_length={args.new}", f"trainer.max_prompt_length={args.prompt_len}",
                   f"trainer.beta={BETA}", f"trainer.temperature={TEMPERATURE}", f"trainer.learning_rate={LR}",
                   f"batch.global_batch_size={P * G}", "batch.micro_batch_size=-1",
                   f"trainer.padding_free={args.padding_free}"])
    t = cfg.trainer
    mesh = parallel.make_mesh(cfg.mesh, jax.devices()[:1])
    graphdef, params = nnx.split(load_model(cfg.model, mesh=mesh, seed=0), nnx.Param)
    optimizer = make_optimizer(t, args.steps + 1)
    state, shardings = policy.create_rl_state(params, optimizer, mesh, seed=0, with_ref=True)
    update = make_train_step(policy.make_grpo_loss(graphdef, t), optimizer, accum_steps=1, mesh=mesh,
                             state_shardings=shardings, totals_fn=policy.grpo_totals)
    ref_logprobs = policy.make_logprob_fn(graphdef, mesh, shardings.params, t.temperature)
    ids_PT = np.random.default_rng(0).integers(3, cfg.model.vocab_size, (P, args.prompt_len)).astype(np.int32)
    mask_PT = np.ones_like(ids_PT)
    eos = eos_id(cfg.model) if args.lengths == "varied" else None
    bias = {eos: eos_bias(args, cfg.model)} if eos is not None else None
    lengths_seen, update_shapes = [], []

    def rollout(state, seed):
        out = generate(nnx.merge(graphdef, state.params), jnp.asarray(ids_PT), jnp.asarray(mask_PT),
                       max_new_tokens=args.new, temperature=t.temperature, eos_token_id=eos, seed=seed,
                       num_samples=G, mesh=mesh, logit_bias=bias, drop_finished=args.drop_finished == "true")
        tokens, logprobs, lengths = (np.asarray(x) for x in (out.tokens, out.logprobs, out.lengths))
        lengths_seen.extend(lengths.tolist())
        ended = tokens[np.arange(len(tokens)), np.maximum(lengths - 1, 0)] == (-1 if eos is None else eos)
        c = Completions(np.repeat(ids_PT, G, 0), np.repeat(mask_PT, G, 0), tokens, logprobs, lengths,
                        [""] * len(tokens), ~ended)
        batch_np, _ = training_batch(c, mask_truncated=False)  # as TRL: truncated rows keep their loss
        advantages, _ = group_advantages(reward_even_share(tokens), G, t.scale_rewards)
        extras_np = {"advantages": np.asarray(advantages)}
        if t.padding_free:  # as the recipe's updates (rl/updates.py): rows packed for the update
            batch_np, extras_np = packing.pack_rollout(batch_np, extras_np["advantages"])
        update_shapes.append("x".join(map(str, batch_np.tokens.shape)))
        batch = jax.tree.map(lambda x: parallel.shard_rows(x, mesh), batch_np)
        extras = {k: parallel.shard_rows(v, mesh) for k, v in extras_np.items()}
        extras["ref_logp"] = ref_logprobs(state.ref_params, batch)
        jax.block_until_ready(extras)
        return batch, extras

    rollouts, updates = [], []
    for step in range(args.steps + 1):
        start = time.perf_counter()
        batch, extras = rollout(state, seed=step)
        rollouts.append(time.perf_counter() - start)
        start = time.perf_counter()
        state, metrics = update(state, batch, extras)
        jax.block_until_ready(metrics)
        updates.append(time.perf_counter() - start)
    row = summary(rollouts, updates, P * G, compile_s=rollouts[0] + updates[0] - np.median(rollouts[1:])
                  - np.median(updates[1:]))
    row["lengths"], row["update_rows"] = lengths_seen, update_shapes
    return row


def eos_bias(args, model_cfg) -> float:
    """--eos-bias, else the bias that puts a random model's mean length near a third of the
    budget: its next-token distribution is near uniform, so P(EOS) ~ exp(bias / T) / vocab."""
    if args.eos_bias is not None:
        return args.eos_bias
    return float(TEMPERATURE * np.log(model_cfg.vocab_size * 3 / args.new))


def eos_id(model_cfg) -> int:
    from atlas_jax.models import load_tokenizer

    return int(load_tokenizer(model_cfg).eos_token_id)


def trl_step(preset: str, args) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, Qwen3Config, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from atlas_jax.config import compose
    from atlas_jax.models import load_tokenizer

    m = compose(["+run=grpo", f"model={preset}"]).model
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Qwen3Config(
        vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
        num_hidden_layers=m.num_hidden_layers, num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_key_value_heads, head_dim=m.resolved_head_dim, rms_norm_eps=m.rms_norm_eps,
        rope_theta=m.rope_theta, max_position_embeddings=m.max_position_embeddings,
        tie_word_embeddings=m.tie_word_embeddings))
    tokenizer = load_tokenizer(m)
    tokenizer.padding_side = "left"
    rng = np.random.default_rng(0)
    prompts = [text_of_length(tokenizer, rng, args.prompt_len) for _ in range(args.prompts * (args.steps + 1))]
    prompt_lens = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]

    lengths_seen = []

    def reward(completion_ids, **_):
        lengths_seen.extend(len(c) for c in completion_ids)
        return [float(np.mean(np.asarray(c) % 2 == 0)) for c in completion_ids]

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.starts, self.steps = [], []

        def on_step_begin(self, *a, **k):
            self.starts.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            self.steps.append(time.perf_counter() - self.starts[-1])

    with tempfile.TemporaryDirectory() as out:
        # TRL builds its reference model from the policy's path, so the random model goes to disk.
        model.save_pretrained(f"{out}/model")
        tokenizer.save_pretrained(f"{out}/model")
        config = GRPOConfig(
            output_dir=f"{out}/run", per_device_train_batch_size=args.prompts * args.G, gradient_accumulation_steps=1,
            num_generations=args.G, max_completion_length=args.new, temperature=TEMPERATURE, beta=BETA,
            learning_rate=LR, lr_scheduler_type="constant", max_steps=args.steps + 1, logging_steps=1,
            save_strategy="no", report_to=[], use_cpu=True, seed=0, shuffle_dataset=False,
            generation_kwargs=({"min_new_tokens": args.new} if args.lengths == "fixed" else
                               {"sequence_bias": {(eos_id(m),): eos_bias(args, m)}}),
            dataloader_num_workers=0, disable_tqdm=True)
        times = StepTimes()
        trainer = GRPOTrainer(model=f"{out}/model", reward_funcs=reward, args=config, processing_class=tokenizer,
                              train_dataset=Dataset.from_dict({"prompt": prompts}), callbacks=[times])
        rollouts = []
        generate_and_score = trainer._generate_and_score_completions

        def timed(*a, **k):
            start = time.perf_counter()
            result = generate_and_score(*a, **k)
            rollouts.append(time.perf_counter() - start)
            return result

        trainer._generate_and_score_completions = timed
        trainer.train()
    updates = [s - r for s, r in zip(times.steps, rollouts)]
    row = summary(rollouts, updates, args.prompts * args.G, compile_s=None)
    row["prompt_tokens"] = float(np.mean(prompt_lens))
    row["lengths"], row["update_rows"] = lengths_seen, None  # TRL pads to the longest row
    return row


def tunix_step(preset: str, args) -> dict:
    """Tunix's GRPOLearner on the same config, in bench/peers/tunix-venv (bench/peers/tunix_grpo.py)."""
    from atlas_jax.config import compose

    m = compose(["+run=grpo", f"model={preset}"]).model
    eos = (eos_id(m), eos_bias(args, m)) if args.lengths == "varied" else (-1, 0.0)
    command = [TUNIX_PYTHON, os.path.join(PEERS, "tunix_grpo.py"), "--mode", "grpo",
               "--vocab-size", m.vocab_size, "--hidden-size", m.hidden_size,
               "--intermediate-size", m.intermediate_size, "--num-layers", m.num_hidden_layers,
               "--num-heads", m.num_attention_heads, "--num-kv-heads", m.num_key_value_heads,
               "--head-dim", m.resolved_head_dim, "--rope-theta", m.rope_theta, "--rms-norm-eps", m.rms_norm_eps,
               "--tie-word-embeddings", m.tie_word_embeddings, "--prompts", args.prompts, "--G", args.G,
               "--prompt-len", args.prompt_len, "--new", args.new, "--steps", args.steps,
               "--eos-id", eos[0], "--eos-bias", eos[1], "--temperature", TEMPERATURE, "--beta", BETA,
               "--lr", LR, "--threads", args.threads]
    done = subprocess.run([str(c) for c in command], capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("JSON ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"tunix_grpo.py exited {done.returncode}:\n{(done.stdout + done.stderr)[-3000:]}")
    r = json.loads(lines[-1][len("JSON "):])
    row = {k: r[k] for k in ("rollout_s", "update_s", "completions_per_s", "first_step_s")}  # as summary()
    row["compile_s"] = r["first_step_s"] - r["rollout_s"] - r["update_s"]  # as ours: first step's excess
    row["lengths"], row["update_rows"], row["prompt_tokens"] = r["lengths"], None, args.prompt_len
    return row


def text_of_length(tokenizer, rng, n: int, tries: int = 100) -> str:
    """Random text that re-tokenizes to n tokens (decoding merges some ids), else the closest."""
    best = ""
    for _ in range(tries):
        ids = rng.integers(3, len(tokenizer), n + n // 4)
        ids = tokenizer(tokenizer.decode(ids, skip_special_tokens=True), add_special_tokens=False)["input_ids"][:n]
        text = tokenizer.decode(ids, skip_special_tokens=True)
        length = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        if length == n:
            return text
        if abs(length - n) < abs(len(tokenizer(best, add_special_tokens=False)["input_ids"]) - n):
            best = text
    return best


def summary(rollouts, updates, completions: int, *, compile_s) -> dict:
    rollout, update = float(np.median(rollouts[1:])), float(np.median(updates[1:]))  # robust to a busy host
    return {"rollout_s": rollout, "update_s": update, "completions_per_s": completions / (rollout + update),
            "first_step_s": rollouts[0] + updates[0], "compile_s": compile_s}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["tiny", "qwen3_33m"])
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--G", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3, help="timed steps after the first")
    parser.add_argument("--impls", nargs="+", default=["atlas_jax", "trl", "tunix"])
    parser.add_argument("--lengths", choices=("fixed", "varied"), default="fixed",
                        help="fixed: every completion runs the budget; varied: they end at a biased EOS")
    parser.add_argument("--eos-bias", type=float, default=None,
                        help="--lengths varied: the EOS logit's bias (default: a random model's mean length "
                             "near a third of the budget)")
    parser.add_argument("--padding-free", choices=("true", "false"), default="true",
                        help="ours: pack the rollout's rows for the update (trainer.padding_free)")
    parser.add_argument("--drop-finished", choices=("true", "false"), default="true",
                        help="ours: finished rows leave the decode batch (generate's drop_finished)")
    parser.add_argument("--threads", type=int, default=0,
                        help="1: one CPU thread for both (XLA without Eigen threads, torch 1 thread); "
                             "on a shared, busy host PyTorch's OpenMP threads stall each other badly")
    args = parser.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if args.threads == 1:  # before jax is imported
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false"
                                   " intra_op_parallelism_threads=1").strip()
    have_trl = importlib.util.find_spec("trl") is not None
    if not have_trl:
        print("trl is not installed (pip install trl): no TRL rows", flush=True)
    have_tunix = os.path.exists(TUNIX_PYTHON)
    if not have_tunix and "tunix" in args.impls:
        print("Tunix: not set up (bash bench/peers/setup_tunix.sh)", flush=True)

    print(f"GRPO step: {args.prompts} prompts x G={args.G} = {args.prompts * args.G} completions, "
          f"prompt {args.prompt_len} tokens, {args.new} new tokens "
          f"({'no EOS' if args.lengths == 'fixed' else 'EOS with a logit bias'}), beta {BETA}, 1 CPU device; "
          f"median of {args.steps} steps after the first; threads: {args.threads or 'library default'}; "
          f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r} (atlas_jax/hostmem.py)", flush=True)
    rows = []
    for preset in args.models:
        if "atlas_jax" in args.impls:
            rows.append((preset, "atlas_jax", ours(preset, args)))
            print(f"  done: {preset} atlas_jax", flush=True)
        if have_trl and "trl" in args.impls:
            rows.append((preset, "TRL GRPOTrainer", trl_step(preset, args)))
            print(f"  done: {preset} TRL", flush=True)
        if have_tunix and "tunix" in args.impls:
            rows.append((preset, "Tunix GRPO", tunix_step(preset, args)))
            print(f"  done: {preset} Tunix", flush=True)
    head = f"{'model':<10} {'impl':<16} {'rollout s':>10} {'update s':>9} {'compl/s':>8} {'1st step s':>11} {'compile s':>10}"
    print(head)
    print("-" * len(head))
    for preset, impl, r in rows:
        compile_s = f"{r['compile_s']:.1f}" if r["compile_s"] is not None else "-"
        print(f"{preset:<10} {impl:<16} {r['rollout_s']:>10.3f} {r['update_s']:>9.3f} "
              f"{r['completions_per_s']:>8.1f} {r['first_step_s']:>11.1f} {compile_s:>10}")
    if args.lengths == "varied":
        print(f"completion lengths (tokens, bins of {args.new // 8}; counts over every step):")
        for preset, impl, r in rows:
            print(f"  {preset:<10} {impl:<16} {histogram(r['lengths'], args.new)}")

    for preset, impl, r in rows:
        if r["update_rows"]:
            print(f"  {preset:<10} {impl:<16} update rows x width, step by step: {' '.join(r['update_rows'])}")
    for preset in args.models:
        mine, trl, tunix = (next((r for p, i, r in rows if p == preset and i == impl), None)
                            for impl in ("atlas_jax", "TRL GRPOTrainer", "Tunix GRPO"))
        parts = [f"{mine['completions_per_s'] / r['completions_per_s']:.2f}x {name}"
                 for name, r in (("TRL", trl), ("Tunix", tunix)) if mine and r]
        if parts:
            label = f"{preset} varied lengths" if args.lengths == "varied" else preset
            note = f" (TRL prompts averaged {trl['prompt_tokens']:.0f} tokens)" if trl else ""
            print(f"{label}: atlas_jax {', '.join(parts)} completions/s{note}")


def histogram(lengths, budget: int) -> str:
    """'mean M | c1 c2 ... c8' over 8 equal bins of 1..budget."""
    counts, _ = np.histogram(lengths, bins=8, range=(0.5, budget + 0.5))
    return f"mean {np.mean(lengths):5.1f} | " + " ".join(f"{c:4d}" for c in counts)


if __name__ == "__main__":
    main()
