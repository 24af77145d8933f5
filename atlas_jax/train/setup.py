"""What SFT and RL runs start from, and how they end: one set-up path for both recipes.

`start`: output_dir with its config.yaml, the model straight onto the mesh (with LoRA split
into trained adapters and a frozen base), optimizer and schedule, the train state (its
shardings; offload applied), the checkpointer (rotation, best checkpoint), the resume from
the latest checkpoint (or `resume_from`) and the metric writers. `export_final`: the
Hugging Face directory written at the end of a run.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Callable, Optional

import optax
from flax import nnx

from atlas_jax.config import TrainConfig, to_yaml
from atlas_jax.models import load_model, lora, save_pretrained
from atlas_jax.train import checkpoint, metrics as metrics_lib, offload
from atlas_jax.train.checkpoint import Checkpointer
from atlas_jax.train.loop import LoopResult
from atlas_jax.train.optim import make_optimizer, make_schedule
from atlas_jax.train.state import abstract_of, create_train_state


@dataclasses.dataclass
class Job:
    """A training run's pieces; `with job:` closes its writers and checkpointer at the end."""

    cfg: TrainConfig
    out: pathlib.Path
    graphdef: nnx.GraphDef
    state: Any  # TrainState (or RLState), sharded, possibly restored
    shardings: Any
    frozen: Any  # the LoRA base (never trained), or None
    optimizer: optax.GradientTransformation
    schedule: optax.Schedule
    checkpointer: Checkpointer
    writers: metrics_lib.Writers
    carried: dict  # what the restored step saved besides the state: {"extra": JSON, "rows": arrays}

    def full(self, params):
        """What the forward needs: the trained params plus the frozen base when there is one."""
        return lora.full_params(params, self.frozen)

    def __enter__(self) -> "Job":
        return self

    def __exit__(self, *exc) -> None:
        self.writers.close()
        self.checkpointer.close()


def start(cfg: TrainConfig, mesh, *, total_steps: int, batches, create_state: Callable = create_train_state) -> Job:
    """Builds (or resumes) a run; `batches` is the input iterator a resume repositions.

    create_state(params, optimizer, mesh, *, seed) -> (state, shardings); RL passes one that
    adds the reference policy. `params` are donated into the state.
    """
    t, out = cfg.trainer, pathlib.Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(to_yaml(cfg))
    # with LoRA only the adapters are trained; the frozen base rides along, never copied
    graphdef, params, frozen = lora.split_trainable(load_model(cfg.model, mesh=mesh, seed=cfg.seed))
    optimizer, schedule = make_optimizer(t, total_steps), make_schedule(t, total_steps)
    state, shardings = create_state(params, optimizer, mesh, seed=cfg.seed)
    state, shardings, frozen = offload.apply(state, shardings, frozen, offload.resolve(t.offload, mesh))
    metric, greater = checkpoint.best_rule(t)
    checkpointer = Checkpointer(str(out / "checkpoints"), save_steps=t.save_steps, max_to_keep=t.save_total_limit,
                                best_metric=metric, greater_is_better=greater)
    state, carried = checkpoint.resume(checkpointer, cfg.resume_from, state, batches, mesh=mesh)
    writers = metrics_lib.Writers(str(out), t.report_to, total_steps=total_steps, initial_step=int(state.step),
                                  run_name=cfg.run, config=json.loads(json.dumps(dataclasses.asdict(cfg), default=str)))
    return Job(cfg, out, graphdef, state, shardings, frozen, optimizer, schedule, checkpointer, writers, carried)


def export_final(job: Job, result: LoopResult, tokenizer) -> Optional[str]:
    """<output_dir>/hf when trainer.save_final_model and the run reached max_steps, else None.

    With trainer.load_best_model_at_end the best checkpoint's parameters are exported (HF
    Trainer's behaviour), else the final ones. Call after the job is closed (best.json is
    written once the best step's write has committed).
    """
    t = job.cfg.trainer
    if not (t.save_final_model and result.stopped_by == "max_steps"):
        return None
    params = result.state.params
    best = job.checkpointer.best
    if t.load_best_model_at_end and best is not None:
        params, _ = checkpoint.restore_params(job.checkpointer.directory, best["step"], abstract_of(params))
        print(f"load_best_model_at_end: exporting step {best['step']} ({best['metric']}={best['value']:.6g})",
              flush=True)
    hf_dir = str(job.out / "hf")
    model = nnx.merge(job.graphdef, job.full(params))
    save_pretrained(lora.merge_adapters(model) if job.frozen is not None else model, hf_dir, tokenizer=tokenizer)
    return hf_dir


def finish(job: Job, result: LoopResult, tokenizer, outputs: str) -> dict:
    """The final export, the run's closing line (naming `outputs`, its files), and the
    result every recipe returns."""
    hf_dir = export_final(job, result, tokenizer)
    print(f"{job.cfg.run}: {result.step} steps ({result.stopped_by}); outputs in {job.out} "
          f"({outputs}{', hf/' if hf_dir else ''})", flush=True)
    return {"output_dir": str(job.out), "checkpoints": str(job.out / "checkpoints"), "hf_dir": hf_dir,
            "steps": result.step, "stopped_by": result.stopped_by, "metrics": result.last_metrics}
