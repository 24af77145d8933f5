"""The teaching effect on a CPU in minutes: student SFT -> teacher SFT -> teacher RCL ->
both teachers evaluated with the same frozen student on the same held-out problems.

Each phase is an ordinary run composed from the configs a user would type (+run=teacher_sft,
+run=teacher_rcl, +run=evaluate, with the configs/quickstart/ phase files on top), written
to its own sub-directory, so a second run resumes every phase from its checkpoints.
"""

from __future__ import annotations

import dataclasses
import pathlib
import time

from atlas_jax.config import TrainConfig, compose
from atlas_jax.recipes import evaluate, sft, teacher_rcl
from atlas_jax.rl.report import write_comparison


def run(cfg: TrainConfig, mesh) -> dict:
    out = pathlib.Path(cfg.output_dir)
    started = time.perf_counter()
    common = [f"seed={cfg.seed}", *cfg.phase_overrides]

    # 1. The student: an ordinary SFT run on the teaching world's student traces, then frozen.
    student = sft.run(compose(["+run=teacher_sft", "+quickstart=student", *common, f"output_dir={out / 'student'}"]),
                      mesh)
    # 2. The teacher's SFT on imperfect teaching traces.
    teacher = sft.run(compose(["+run=teacher_sft", "+quickstart=teacher", *common, f"output_dir={out / 'sft'}"]),
                      mesh)
    # 3. RCL from the SFT teacher, rewarded by the student's accuracy with its guidance.
    rcl_cfg = compose(["+run=teacher_rcl", "+quickstart=rcl", *common, f"output_dir={out / 'rcl'}",
                       f"model.model_name_or_path={teacher['hf_dir']}",
                       f"trainer.student_model={student['hf_dir']}"])
    rcl = teacher_rcl.run(rcl_cfg, mesh)

    # 4. Both teachers, greedy, on every held-out problem, with the same student.
    reports = {}
    for name, checkpoints in (("sft_teacher", teacher["checkpoints"]), ("rcl_teacher", rcl["checkpoints"])):
        eval_cfg = dataclasses.replace(rcl_cfg, run="evaluate", checkpoint=checkpoints,
                                       output_dir=str(out / "eval" / name))
        reports[name] = evaluate.run(eval_cfg, mesh)["report"]
    paths = write_comparison(reports, out, rewards_from=out / "rcl" / "metrics.jsonl")

    minutes = (time.perf_counter() - started) / 60
    sft_r, rcl_r = reports["sft_teacher"], reports["rcl_teacher"]
    print("\n".join([
        f"quickstart finished in {minutes:.1f} min:",
        f"  student (frozen, Hugging Face dir)  {student['hf_dir']}",
        f"  SFT teacher                         {teacher['hf_dir']}",
        f"  RCL teacher metrics, checkpoints    {out / 'rcl'}/metrics.jsonl, {rcl['checkpoints']}",
        f"  comparison                          {paths['json']}, {paths['markdown']}, {paths['chart']}",
        f"accuracy on {rcl_r['num_scored']} held-out problems: student alone {sft_r['baseline_accuracy']:.2f}"
        f" | with the SFT teacher {sft_r['accuracy_with_guidance']:.2f}"
        f" | with the RCL teacher {rcl_r['accuracy_with_guidance']:.2f}",
    ]), flush=True)
    return {"student": student, "sft": teacher, "rcl": rcl, "reports": reports, **paths}
