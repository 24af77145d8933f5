"""completions.jsonl: what the policy wrote, with its context and reward, for reading later."""

from __future__ import annotations

import json
import pathlib

import jax
import numpy as np

from atlas_jax.rl import rewards as rewards_lib
from atlas_jax.rl.rollout import TeachingEpisode


def sample_records(ep, records: list[dict], G: int) -> list[dict]:
    """One JSON-able record per trained sample (rows prompt-major, G per problem)."""
    rows = []
    for i, text in enumerate(ep.policy.texts):
        source = records[i // G]
        row = {"prompt": source["prompt"], "ground_truth": source.get("ground_truth"),
               "completion": text, "reward": float(ep.rewards[i])}
        if isinstance(ep, TeachingEpisode):
            row.update(approach=ep.probe.texts[i // G], guidance=rewards_lib.extract_teaching(text),
                       solution_with_guidance=ep.with_teaching.texts[i],
                       solution_baseline=ep.baseline.texts[i // G])
        rows.append(row)
    return rows


class SampleWriter:
    """Appends samples with reward >= 1, and a random share of the rest, to a JSONL file."""

    def __init__(self, path: pathlib.Path, probability: float, seed: int):
        self.path, self.probability = path, probability
        self.rng = np.random.default_rng(seed)

    def write(self, rows: list[dict]) -> None:
        keep = [r for r in rows if r["reward"] >= 1.0 or self.rng.random() < self.probability]
        if keep and jax.process_index() == 0:
            with self.path.open("a") as f:
                f.writelines(json.dumps(r) + "\n" for r in keep)
