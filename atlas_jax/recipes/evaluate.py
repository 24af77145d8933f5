"""Teaching evaluation of a trained teacher, restored from an Orbax checkpoint.

  1. Restore only the teacher's parameters, onto the current mesh (any mesh): the latest
     step, checkpoint_step=N, or checkpoint_step=best (the step checkpoints/best.json names).
  2. Load the frozen student.
  3. On the eval split, greedily: student baseline, diagnostic, one guidance, student
     with guidance; check the answers.
  4. Write eval/report.json, eval/report.md and eval/outcomes.png.
"""

from __future__ import annotations

import pathlib

import jax
from flax import nnx
from tqdm.auto import tqdm

from atlas_jax.config import TrainConfig
from atlas_jax.data import rl_batches
from atlas_jax.models import Decoder, load_model, load_tokenizer, lora
from atlas_jax.parallel import param_shardings
from atlas_jax.rl import rollout
from atlas_jax.rl.student import load_student
from atlas_jax.rl.report import teaching_report, write_report
from atlas_jax.train.checkpoint import restore_params
from atlas_jax.train.state import abstract_of


def restore_teacher(cfg: TrainConfig, mesh) -> tuple[Decoder, int]:
    """The checkpoint's trained parameters in a model built from cfg.model, on `mesh`.

    A full fine-tuning checkpoint holds every parameter; a LoRA one holds the adapters, and
    the frozen base is loaded as training loaded it (model_name_or_path, or the seed).
    """
    if cfg.model.lora.rank > 0:
        graphdef, adapters, frozen = lora.split_trainable(load_model(cfg.model, mesh=mesh, seed=cfg.seed))
        params, step = restore_params(cfg.checkpoint, cfg.checkpoint_step, abstract_of(adapters))
        return nnx.merge(graphdef, lora.combine(params, frozen)), step
    abstract = nnx.eval_shape(lambda: Decoder(cfg.model, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract, nnx.Param)
    shardings = param_shardings(state, mesh)
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
    params, step = restore_params(cfg.checkpoint, cfg.checkpoint_step, target)
    return nnx.merge(graphdef, params), step


def run(cfg: TrainConfig, mesh) -> dict:
    out = pathlib.Path(cfg.output_dir) / "eval"

    # 1-2. Teacher from the checkpoint, frozen student.
    teacher, step = restore_teacher(cfg, mesh)
    tokenizer = load_tokenizer(cfg.model)
    student, student_tok = load_student(cfg, mesh, *reference_teacher(cfg, mesh), tokenizer)

    # 3. Greedy episodes over the eval split.
    batches = rl_batches(cfg.data, split="eval", batch_size=cfg.batch.eval_batch_size, seed=cfg.seed,
                         num_epochs=1, process_index=0, process_count=1)  # one global rollout
    records = [r for batch in batches for r in batch][: cfg.data.max_eval_samples or None]
    episodes = []
    size = cfg.batch.eval_batch_size
    for start in tqdm(range(0, len(records), size), desc="evaluate", unit="batch", dynamic_ncols=True):
        episodes.append(rollout.teaching_episode(
            teacher, student, tokenizer, student_tok, records[start:start + size], trainer=cfg.trainer,
            reward=cfg.reward, num_generations=1, temperature=0.0, seed=cfg.seed, mesh=mesh,
            teacher_system=rollout.teacher_system(cfg.data)))

    # 4. Report.
    report = {**teaching_report(episodes), "checkpoint": str(cfg.checkpoint), "checkpoint_step": step}
    paths = write_report(report, out, title=f"Teaching evaluation, step {step}")
    print(f"evaluate: {report['num_scored']} problems; baseline {report['baseline_accuracy']:.3f} -> "
          f"with guidance {report['accuracy_with_guidance']:.3f}; report in {paths['json']}, "
          f"{paths['markdown']}, chart {paths['chart']}", flush=True)
    return {"report": report, **paths}


def reference_teacher(cfg: TrainConfig, mesh):
    """The teacher before training (graphdef, params): the student when none is named."""
    if cfg.trainer.student_model is not None:
        return None, None
    return nnx.split(load_model(cfg.model, mesh=mesh, seed=cfg.seed), nnx.Param)
