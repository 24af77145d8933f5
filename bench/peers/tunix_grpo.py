"""Tunix's side of bench/grpo_step.py: one GRPO step (rollout + update) with Google's Tunix, on CPU.

Runs inside bench/peers/tunix-venv (bash bench/peers/setup_tunix.sh); it never imports atlas_jax.

    tunix-venv/bin/python bench/peers/tunix_grpo.py --vocab-size 1024 --hidden-size 128 \
        --intermediate-size 384 --num-layers 4 --num-heads 4 --num-kv-heads 2 --head-dim 32 \
        --rope-theta 10000 --rms-norm-eps 1e-6 --tie-word-embeddings true \
        --prompts 4 --G 8 --prompt-len 64 --new 64 --steps 3 --eos-id -1 [--mode generate] [--threads 1]

Model: Tunix's own `tunix.models.qwen3.model.Qwen3` built from the flags with random weights
(nnx.Rngs(0)), on a 1x1 ("fsdp", "tp") mesh of one CPU device. Prompts: random ids in
[3, vocab) (numpy seed 0), the same P prompts every step, each exactly --prompt-len tokens, so
no prompt padding.

grpo mode: `tunix.rl.grpo.grpo_learner.GRPOLearner` on an `tunix.rl.rl_cluster.RLCluster` with
the "vanilla" rollout engine (Tunix's own `generate.sampler.Sampler`), actor and rollout on the
same mesh (they share one model, as in Tunix's colocated setup), a reference model that is an
`nnx.clone` of the policy, GRPOConfig(num_generations=G, beta, num_iterations=1, epsilon 0.2),
sampling at --temperature with top_p 1 (no top-k), optimizer clip_by_global_norm(1.0) ->
AdamW(lr, b1 0.9, b2 0.99, eps 1e-8, no decay), as atlas_jax's grpo run. Reward: the share of
even token ids in the completion (parsed back from the text the learner hands reward functions).

Tokenizer: Tunix's learner works on strings, and no Hugging Face hub is reachable, so an
identity tokenizer stands in (text = space-separated ids; Tunix's TokenizerAdapter accepts any
object with encode/decode/bos_id/eos_id/pad_id): pad id 0 (never in a prompt), bos id 0, which
Tunix reads as "no BOS", so nothing is prepended.

EOS: Tunix's vanilla sampler has no logit-bias hook (only `forbidden_tokens`, which
VanillaRollout does not pass through), so the rollout sampler instance's `_sample` method (the
one place both its jitted prefill and its decode loop turn logits into a token) is wrapped
before its first trace: with --eos-id >= 0 it adds --eos-bias to the EOS column of the logits,
and it always sets the pad column to -inf (a random model would otherwise sample the pad id
~1/vocab of the time, and Tunix's learner reads every pad id as padding). The bias is on the
sampler only, as ours (`logit_bias`) and TRL (`sequence_bias`); the reference and training
log-probs see the model's plain logits. With --eos-id -1 the sampler's stop token is vocab_size,
an id the model cannot emit, so every completion runs the full --new budget. Tunix cuts a
completion *before* its EOS (the EOS token is not in the completion, nor in the loss); the
reported lengths add the EOS back (len + 1 for a row that stopped early) so they count the same
tokens as ours and TRL's.

Split: rollout = `GRPOLearner._generate_and_compute_advantage` (sampling, reward, advantages,
reference log-probs, blocked on its outputs), update = `RLCluster.update_actor` (the optimizer
step, blocked on the new parameters); both are timed by wrapping those methods. Tunix prepares
the rollout in a worker thread, but with actor and rollout on one mesh it is not overlapped with
the update (Tunix only enables async rollout on disaggregated meshes), so the two add up to the
step. Steady-state times are the median over --steps steps after a first one (the first step's
time, compile included, is first_step_s).

generate mode (bench/generate.py's "Tunix" rows): only Tunix's vanilla sampler
(`Sampler.__call__`) on P*G rows (each prompt repeated G times), greedy (temperature 0), no EOS
(stop token vocab_size), every row the full budget, for each budget in --budgets (default
--new). Its decode loop is a jitted while_loop over buffers sized prompt + budget, so each
budget compiles once: one warm-up call per budget, then --steps calls each, the budgets
interleaved round by round, the best call per budget kept (as bench/generate.py times ours).

The last stdout line is `JSON {...}`: grpo mode rollout_s, update_s, completions_per_s
(= P*G / (rollout_s + update_s)), first_step_s, lengths (every step's), tunix_version;
generate mode best_s ({budget: best seconds}), first_call_s ({budget: seconds of the warm-up
call, compile included}), rows, tunix_version.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time


def parse_args():
    p = argparse.ArgumentParser()
    bool_ = lambda s: s.lower() in ("1", "true", "yes")  # noqa: E731
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--hidden-size", type=int, required=True)
    p.add_argument("--intermediate-size", type=int, required=True)
    p.add_argument("--num-layers", type=int, required=True)
    p.add_argument("--num-heads", type=int, required=True)
    p.add_argument("--num-kv-heads", type=int, required=True)
    p.add_argument("--head-dim", type=int, required=True)
    p.add_argument("--rope-theta", type=float, default=10000.0)
    p.add_argument("--rms-norm-eps", type=float, default=1e-6)
    p.add_argument("--tie-word-embeddings", type=bool_, default=True)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--G", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--steps", type=int, default=3, help="timed steps after the first")
    p.add_argument("--eos-id", type=int, default=-1, help="-1: no EOS, every completion runs the budget")
    p.add_argument("--eos-bias", type=float, default=0.0)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--beta", type=float, default=0.04)
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--mode", choices=("grpo", "generate"), default="grpo")
    p.add_argument("--budgets", default="", help="generate mode: comma-separated budgets (default --new)")
    p.add_argument("--threads", type=int, default=0, help="1: XLA without Eigen threads")
    return p.parse_args()


class IdTokenizer:
    """Text is space-separated token ids; pad 0, no BOS (Tunix skips a falsy bos id)."""

    def __init__(self, eos: int):
        self._eos = eos

    def encode(self, text, **_):
        return [int(t) for t in text.split()]

    def decode(self, ids, **_):
        return " ".join(str(int(i)) for i in ids)

    def bos_id(self):
        return 0

    def eos_id(self):
        return self._eos

    def pad_id(self):
        return 0


def build_model(args, mesh):
    from flax import nnx
    from tunix.models.qwen3 import model as qwen3

    cfg = qwen3.ModelConfig(
        num_layers=args.num_layers, vocab_size=args.vocab_size, embed_dim=args.hidden_size,
        hidden_dim=args.intermediate_size, num_heads=args.num_heads, head_dim=args.head_dim,
        num_kv_heads=args.num_kv_heads, rope_theta=int(args.rope_theta), norm_eps=args.rms_norm_eps,
        use_tied_embedding=args.tie_word_embeddings)
    with mesh:
        return qwen3.Qwen3(cfg, rngs=nnx.Rngs(0))


def patch_sampler(sampler, eos_id: int, eos_bias: float, pad_id: int):
    """Wrap the sampler's logits -> token step: EOS bias and a never-sampled pad id."""
    import jax.numpy as jnp

    inner = sampler._sample

    def _sample(logits, *a, **k):
        if eos_id >= 0:
            logits = logits.at[..., eos_id].add(eos_bias)
        logits = logits.at[..., pad_id].set(-jnp.inf)
        return inner(logits, *a, **k)

    sampler._sample = _sample


def prompt_texts(args):
    import numpy as np

    ids = np.random.default_rng(0).integers(3, args.vocab_size, (args.prompts, args.prompt_len))
    return [" ".join(map(str, row)) for row in ids]


def run_generate(args, mesh):
    import jax
    from tunix.generate import sampler as sampler_lib

    budgets = [int(b) for b in args.budgets.split(",")] if args.budgets else [args.new]
    model = build_model(args, mesh)
    tokenizer = IdTokenizer(eos=args.vocab_size)  # unreachable stop token: full budget
    sampler = sampler_lib.Sampler(model, tokenizer, sampler_lib.CacheConfig(
        cache_size=args.prompt_len + max(budgets), num_layers=args.num_layers,
        num_kv_heads=args.num_kv_heads, head_dim=args.head_dim))
    patch_sampler(sampler, -1, 0.0, tokenizer.pad_id())
    prompts = [p for p in prompt_texts(args) for _ in range(args.G)]

    def call(n):
        start = time.perf_counter()
        out = sampler(prompts, max_generation_steps=n, max_prompt_length=args.prompt_len,
                      temperature=0.0, eos_tokens=[args.vocab_size])
        jax.block_until_ready(out.tokens)
        seconds = time.perf_counter() - start
        lengths = [len(t) for t in out.tokens]
        if any(length != n for length in lengths):
            raise RuntimeError(f"budget {n}: completions of lengths {sorted(set(lengths))}, expected all {n}")
        return seconds

    with mesh:
        first = {n: call(n) for n in budgets}
        times = {n: [] for n in budgets}
        for _ in range(args.steps):
            for n in budgets:
                times[n].append(call(n))
    return {"best_s": {str(n): min(t) for n, t in times.items()}, "first_call_s": {str(n): s for n, s in first.items()},
            "rows": len(prompts)}


def run_grpo(args, mesh):
    import jax
    import numpy as np
    import optax
    from flax import nnx
    from tunix.rl import rl_cluster as rl_cluster_lib
    from tunix.rl.grpo import grpo_learner
    from tunix.rl.rollout import base_rollout

    P, G = args.prompts, args.G
    eos = args.eos_id if args.eos_id >= 0 else args.vocab_size  # vocab_size: never sampled
    tokenizer = IdTokenizer(eos=eos)
    policy = build_model(args, mesh)
    reference = nnx.clone(policy)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0),
                            optax.adamw(args.lr, b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.0))
    cluster_config = rl_cluster_lib.ClusterConfig(
        role_to_mesh={rl_cluster_lib.Role.ACTOR: mesh, rl_cluster_lib.Role.REFERENCE: mesh,
                      rl_cluster_lib.Role.ROLLOUT: mesh},
        rollout_engine="vanilla", offload_to_cpu=False,
        training_config=rl_cluster_lib.RLTrainingConfig(
            actor_optimizer=optimizer, eval_every_n_steps=10 ** 9, max_steps=args.steps + 1,
            mini_batch_size=P, train_micro_batch_size=P, pbar_description=None),
        rollout_config=base_rollout.RolloutConfig(
            max_tokens_to_generate=args.new, max_prompt_length=args.prompt_len,
            kv_cache_size=args.prompt_len + args.new, temperature=args.temperature, top_p=1.0,
            top_k=None, eos_tokens=[eos]))
    cluster = rl_cluster_lib.RLCluster(actor=policy, reference=reference, tokenizer=tokenizer,
                                       cluster_config=cluster_config)
    patch_sampler(cluster.rollout._sampler, args.eos_id, args.eos_bias, tokenizer.pad_id())

    def reward_even_share(prompts, completions, **_):
        out = []
        for text in completions:
            ids = np.asarray([int(t) for t in text.split()], dtype=np.int64)
            out.append(float(np.mean(ids % 2 == 0)) if ids.size else 0.0)
        return out

    learner = grpo_learner.GRPOLearner(
        rl_cluster=cluster, reward_fns=reward_even_share,
        algo_config=grpo_learner.GRPOConfig(num_generations=G, num_iterations=1, beta=args.beta,
                                            epsilon=0.2))

    rollouts, updates, lengths = [], [], []
    generate_and_advantage = learner._generate_and_compute_advantage
    update_actor = cluster.update_actor

    def timed_rollout(*a, **k):
        # Tunix's sampler reuses RolloutConfig.seed (None: PRNGKey(0)) every step; vary it per step
        # as ours (seed=step) and TRL do, else every step samples the same completions.
        cluster_config.rollout_config.seed = len(rollouts)
        start = time.perf_counter()
        example = generate_and_advantage(*a, **k)
        jax.block_until_ready(example)
        rollouts.append(time.perf_counter() - start)
        n = np.asarray(example.completion_mask).sum(axis=1)  # tokens before the EOS
        lengths.extend(int(x) + 1 if x < args.new else int(x) for x in n)  # count the EOS, as ours
        return example

    def timed_update(*a, **k):
        start = time.perf_counter()
        result = update_actor(*a, **k)
        jax.block_until_ready(nnx.state(cluster.actor_trainer.model, nnx.Param))
        updates.append(time.perf_counter() - start)
        return result

    learner._generate_and_compute_advantage = timed_rollout
    cluster.update_actor = timed_update
    prompts = prompt_texts(args)
    dataset = [{"prompts": np.asarray(prompts)} for _ in range(args.steps + 1)]  # Tunix repeats arrays by G
    learner.train(dataset)
    if len(rollouts) != args.steps + 1 or len(updates) != args.steps + 1:
        raise RuntimeError(f"expected {args.steps + 1} steps, saw {len(rollouts)} rollouts, {len(updates)} updates")
    if args.eos_id < 0:
        assert all(n == args.new for n in lengths), "a completion stopped short without an EOS"
    rollout, update = statistics.median(rollouts[1:]), statistics.median(updates[1:])
    return {"rollout_s": rollout, "update_s": update, "completions_per_s": P * G / (rollout + update),
            "first_step_s": rollouts[0] + updates[0], "lengths": lengths}


def main():
    args = parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    # before jax is imported; grpo_step.py --threads 1 has set them in our environment already
    if args.threads == 1 and "xla_cpu_multi_thread_eigen" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false"
                                   " intra_op_parallelism_threads=1").strip()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import importlib.metadata
    import warnings

    import jax

    warnings.filterwarnings("ignore", message=".*context manager has been deprecated")  # Tunix's `with mesh:`

    # Auto axes: Tunix's models are written for implicit sharding (newer jax defaults to Explicit).
    mesh = jax.make_mesh((1, 1), ("fsdp", "tp"), devices=jax.devices()[:1],
                         axis_types=(jax.sharding.AxisType.Auto,) * 2)
    row = run_generate(args, mesh) if args.mode == "generate" else run_grpo(args, mesh)
    row["tunix_version"] = importlib.metadata.version("google-tunix")
    print("JSON " + json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
