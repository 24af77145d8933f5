"""What SFT and RL runs start from, and how they end: one set-up path for both recipes.

`abstract_run`: the run's arrays as ShapeDtypeStructs on their shardings (the model, the
LoRA split into trained adapters and a frozen base, the optimizer state, offload applied),
with nothing allocated, so the update step can be compiled and its memory checked before
any weight is loaded (memory.report); a run that would resume a checkpoint of another model
is refused there, before anything is written. `start`: the same arrays for real, on those
shardings (so the step compiled for the shapes is the step that runs), the checkpointer
(rotation, best checkpoint), the resume from the latest checkpoint (or `resume_from`),
output_dir's config.yaml (written once the state is restored, so a resume that fails leaves
the run's own) and the metric writers. `export_final`: the Hugging Face directory written
at the end of a run.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from atlas_jax import parallel
from atlas_jax.config import TrainConfig, to_yaml
from atlas_jax.models import load_model, lora, save_pretrained
from atlas_jax.train import checkpoint, metrics as metrics_lib, offload
from atlas_jax.train.checkpoint import Checkpointer
from atlas_jax.train.loop import LoopResult
from atlas_jax.train.optim import make_optimizer, make_schedule
from atlas_jax.train.state import TrainState, abstract_of, create_train_state, shardings_of, state_shardings


@dataclasses.dataclass(frozen=True)
class AbstractRun:
    """A training run before allocation: every array a ShapeDtypeStruct on its sharding."""

    graphdef: nnx.GraphDef
    state: Any  # TrainState (or RLState) of ShapeDtypeStructs
    shardings: Any  # the state's shardings (optimizer state in host memory when offloaded)
    frozen: Any  # the LoRA base as ShapeDtypeStructs, or None
    optimizer: optax.GradientTransformation
    schedule: optax.Schedule
    offload: str  # the trainer.offload that runs on this mesh


def abstract_train_state(params, optimizer: optax.GradientTransformation, mesh) -> tuple[TrainState, TrainState]:
    """create_train_state's (state, shardings) as ShapeDtypeStructs: nothing allocated."""
    shardings = state_shardings(shardings_of(params), optimizer, params, mesh)
    shapes = jax.eval_shape(lambda p: TrainState(params=p, opt_state=optimizer.init(p), step=jnp.zeros((), jnp.int32),
                                                 rng=jax.random.key_data(jax.random.key(0))), params)
    return _on(shapes, shardings), shardings


def _on(shapes, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)


def _abstract_variables(state, mesh):
    """An nnx state of ShapeDtypeStructs on the shardings its variables' logical axes give."""
    return _on(state, parallel.param_shardings(state, mesh))


def abstract_run(cfg: TrainConfig, mesh, *, total_steps: int,
                 abstract_state: Callable = abstract_train_state) -> AbstractRun:
    """The run's arrays on `mesh`, nothing allocated. A Hugging Face checkpoint has the shapes
    of its architecture (cfg.model), so none of its weights is read. A run that would resume a
    checkpoint of another model is refused here, in one line, before anything is written.

    abstract_state(params, optimizer, mesh) -> (state, shardings): the ShapeDtypeStruct
    twin of the `create_state` that `start` is given (RL adds the reference policy).
    """
    m = dataclasses.replace(cfg.model, model_name_or_path=None)
    model = nnx.eval_shape(lambda: load_model(m, mesh=mesh, seed=cfg.seed))
    graphdef, params, frozen = lora.split_trainable(model)
    params = _abstract_variables(params, mesh)
    frozen = None if frozen is None else _abstract_variables(frozen, mesh)
    optimizer, schedule = make_optimizer(cfg.trainer, total_steps), make_schedule(cfg.trainer, total_steps)
    state, shardings = abstract_state(params, optimizer, mesh)
    mode = offload.resolve(cfg.trainer.offload, mesh)
    shardings = offload.state_shardings(shardings, mode)
    if mode == "optimizer_and_frozen" and frozen is not None:
        frozen = _on(frozen, offload.on_host(shardings_of(frozen)))
    checkpoint.check_resume(str(pathlib.Path(cfg.output_dir) / "checkpoints"), cfg.resume_from, params)
    return AbstractRun(graphdef, _on(state, shardings), shardings, frozen, optimizer, schedule, mode)


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

    def bind(self, update: Callable) -> Callable:
        """`step(state, batch, extras=None)` of a make_train_step built on the AbstractRun: its
        jitted program (the one memory.report compiled) called with this run's frozen base."""
        return lambda state, batch, extras=None: update.jitted(state, batch, extras, self.frozen)

    def __enter__(self) -> "Job":
        return self

    def __exit__(self, *exc) -> None:
        self.writers.close()
        self.checkpointer.close()


def start(cfg: TrainConfig, mesh, run: AbstractRun, *, total_steps: int, batches,
          create_state: Callable = create_train_state) -> Job:
    """Builds (or resumes) the run `run` describes; `batches` is the input iterator a resume
    repositions.

    create_state(params, optimizer, mesh, *, seed) -> (state, shardings); RL passes one that
    adds the reference policy. `params` are donated into the state. config.yaml is written
    once the state is restored, so a resume that fails leaves the run's own intact.
    """
    t, out = cfg.trainer, pathlib.Path(cfg.output_dir)
    metric, greater = checkpoint.best_rule(t)
    checkpointer = Checkpointer(str(out / "checkpoints"), save_steps=t.save_steps, max_to_keep=t.save_total_limit,
                                best_metric=metric, greater_is_better=greater)
    try:
        # with LoRA only the adapters are trained; the frozen base rides along, never copied
        graphdef, params, frozen = lora.split_trainable(load_model(cfg.model, mesh=mesh, seed=cfg.seed))
        state, shardings = create_state(params, run.optimizer, mesh, seed=cfg.seed)
        state, shardings, frozen = offload.apply(state, shardings, frozen, run.offload)
        # the compiled step expects exactly the planned shardings (a no-op when they agree)
        state = jax.device_put(state, run.shardings)
        frozen = None if frozen is None else jax.device_put(frozen, shardings_of(run.frozen))
        state, carried = checkpoint.resume(checkpointer, cfg.resume_from, state, batches, mesh=mesh)
    except BaseException:
        checkpointer.close()
        raise
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(to_yaml(cfg))
    writers = metrics_lib.Writers(str(out), t.report_to, total_steps=total_steps, initial_step=int(state.step),
                                  run_name=cfg.run, config=json.loads(json.dumps(dataclasses.asdict(cfg), default=str)))
    return Job(cfg, out, graphdef, state, run.shardings, frozen, run.optimizer, run.schedule, checkpointer, writers,
               carried)


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
    save_pretrained(model, hf_dir, tokenizer=tokenizer)  # adapters merged there
    return hf_dir


def finish(job: Job, result: LoopResult, tokenizer, outputs: str) -> dict:
    """The final export, the run's closing line (naming `outputs`, its files), and the
    result every recipe returns."""
    hf_dir = export_final(job, result, tokenizer)
    print(f"{job.cfg.run}: {result.step} steps ({result.stopped_by}); outputs in {job.out} "
          f"({outputs}{', hf/' if hf_dir else ''})", flush=True)
    return {"output_dir": str(job.out), "checkpoints": str(job.out / "checkpoints"), "hf_dir": hf_dir,
            "steps": result.step, "stopped_by": result.stopped_by, "metrics": result.last_metrics}
