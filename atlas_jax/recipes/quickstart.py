"""The whole pipeline on a CPU in minutes: teacher SFT -> RCL -> teaching evaluation.

Each phase is an ordinary run, composed from the same configs a user would type
(+run=teacher_sft / teacher_rcl / evaluate) and written to its own sub-directory.
"""

from __future__ import annotations

import dataclasses
import pathlib
import time

from atlas_jax.config import TrainConfig, compose
from atlas_jax.recipes import evaluate, sft, teacher_rcl


def run(cfg: TrainConfig, mesh) -> dict:
    out = pathlib.Path(cfg.output_dir)
    started = time.perf_counter()

    # 1. Teacher SFT on synthetic teaching traces (this run's own config).
    sft_cfg = dataclasses.replace(cfg, run="teacher_sft", output_dir=str(out / "sft"))
    sft_result = sft.run(sft_cfg, mesh)
    teacher_dir = sft_result["hf_dir"]

    # 2. A few RCL steps, starting from the SFT teacher.
    phase = ["model=tiny", "data=synthetic_math_rl", "batch=quickstart", "+quickstart=rcl",
             f"model.model_name_or_path={teacher_dir}", f"seed={cfg.seed}"]
    rcl_cfg = compose(["+run=teacher_rcl", *phase, f"output_dir={out / 'rcl'}"])
    rcl_result = teacher_rcl.run(rcl_cfg, mesh)

    # 3. Teaching evaluation of the RCL checkpoint.
    eval_cfg = compose(["+run=evaluate", *phase, f"output_dir={out / 'rcl'}",
                        f"checkpoint={rcl_result['checkpoints']}"])
    eval_result = evaluate.run(eval_cfg, mesh)

    minutes = (time.perf_counter() - started) / 60
    print("\n".join([
        f"quickstart finished in {minutes:.1f} min:",
        f"  SFT teacher (Hugging Face dir)   {teacher_dir}",
        f"  SFT metrics, checkpoints         {out / 'sft'}/metrics.jsonl, {out / 'sft'}/checkpoints",
        f"  RCL metrics, checkpoints         {out / 'rcl'}/metrics.jsonl, {rcl_result['checkpoints']}",
        f"  evaluation report and chart      {eval_result['json']}, {eval_result['chart']}",
    ]), flush=True)
    return {"sft": sft_result, "rcl": rcl_result, "eval": eval_result}
