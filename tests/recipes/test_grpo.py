"""Plain GRPO (+run=grpo) with LoRA, one rollout serving several updates."""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
import numpy as np

from atlas_jax import parallel
from atlas_jax.config import compose
from atlas_jax.recipes import teacher_rcl
from atlas_jax.train.checkpoint import Checkpointer


def test_lora_grpo_one_rollout_serves_aggregation_x_iterations_updates(tmp_path, export_and_compare):
    cfg = compose(["+run=grpo", "model=tiny", "data=synthetic_math_rl", "batch=quickstart", "model.lora.rank=4",
                   "trainer.max_steps=4", "trainer.num_generations=4", "trainer.num_iterations=2",
                   "trainer.generation_aggregation_steps=2", "trainer.max_prompt_length=128",
                   "trainer.max_completion_length=8", "trainer.learning_rate=1e-2", "trainer.eval_steps=100",
                   "data.eval_split_ratio=0", f"output_dir={tmp_path}"])
    result = teacher_rcl.run(cfg, parallel.make_mesh(cfg.mesh, jax.devices()[:1]))
    assert result["steps"] == 4
    rows = [json.loads(l) for l in (pathlib.Path(tmp_path) / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    # one rollout for all four updates: its statistics repeat, the updates do not
    assert len({r["rollout_time_s"] for r in rows}) == 1
    assert len({r["reward"] for r in rows}) == 1
    assert all(r["num_sequences"] == cfg.batch.global_batch_size for r in rows)
    # chunk 0 twice, then chunk 1 twice (the two sampled chunks hold different numbers of tokens)
    assert rows[0]["num_tokens"] == rows[1]["num_tokens"] != rows[2]["num_tokens"] == rows[3]["num_tokens"]
    # the second pass over a chunk sees the same tokens from a policy that has moved
    assert rows[1]["entropy"] != rows[0]["entropy"] and rows[1]["grad_norm"] != rows[0]["grad_norm"]
    assert np.isfinite([r["loss"] for r in rows]).all()
    # with LoRA the reference is the base with adapters off: KL starts at exactly 0 and grows
    assert rows[0]["kl"] == 0.0 and rows[-1]["kl"] > 0.0
    saved = Checkpointer(str(tmp_path / "checkpoints"), save_steps=1, max_to_keep=None, read_only=True)
    assert saved.latest_step() == 4

    # the LoRA checkpoint holds adapters only; export merges them into the base
    export_cfg = dataclasses.replace(cfg, checkpoint=str(tmp_path / "checkpoints"))
    assert export_and_compare(export_cfg, tmp_path / "hf") == 4
