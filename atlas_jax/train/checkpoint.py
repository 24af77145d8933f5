"""Orbax checkpoints: train state + RNG + Grain iterator state (+ optional extra items).

Layout: <directory>/<step>/{state, data, extra, rows} and <directory>/best.json. Writes are
asynchronous and atomic (Orbax writes into a temporary directory and renames it on commit),
so a write that was interrupted part-way is never seen as a step. Restores go onto any mesh:
the target's shardings decide where each array lands, whatever mesh wrote it.

`rows` holds arrays whose leading dim is the global batch (RL: the updates a rollout still
serves, rl/updates.py); they come back sharded over the data axes of the restoring mesh.

The best checkpoint (HF Trainer's metric_for_best_model / greater_is_better): a saved step
that was evaluated and beat every earlier one is recorded in best.json once its write has
committed (so best.json only ever names a committed step), and is kept out of the
save_total_limit rotation. `checkpoint_step=best` (evaluate, export) reads it.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any, Optional, Union

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

from atlas_jax import parallel
from atlas_jax.config import TrainerConfig, UsageError
from atlas_jax.train.state import abstract_of

log = logging.getLogger(__name__)

STATE, DATA, EXTRA, ROWS = "state", "data", "extra", "rows"
BEST_FILE = "best.json"


class CheckpointError(UsageError):
    """A checkpoint that cannot be used; the message is one line naming the path."""


class _IteratorSnapshot:
    """A Grain iterator state frozen at save time (the live iterator keeps moving while an
    async write is in flight); quacks like an iterator for Grain's Orbax handler."""

    def __init__(self, state: Any = None):
        self.state = state

    def get_state(self) -> bytes:
        return json.dumps(self.state).encode()

    def set_state(self, state: bytes) -> None:
        self.state = json.loads(state)

    def start_prefetch(self) -> None:
        pass


def resolve(path: str) -> tuple[str, Optional[int]]:
    """'<run>/checkpoints' -> (dir, None = latest); '<run>/checkpoints/300' -> (dir, 300)."""
    path = os.path.abspath(path)
    base = os.path.basename(path.rstrip("/"))
    if base.isdigit() and os.path.isdir(path):
        return os.path.dirname(path), int(base)
    return path, None


def best_rule(trainer: TrainerConfig) -> tuple[Optional[str], bool]:
    """(metric, greater_is_better) as HF Trainer reads them: the metric gets the eval/ prefix
    when it lacks one; greater_is_better None means False for names ending in 'loss'."""
    metric = trainer.metric_for_best_model
    if metric is None:
        return None, True
    metric = metric if metric.startswith("eval/") else f"eval/{metric}"
    greater = trainer.greater_is_better
    return metric, (not metric.endswith("loss")) if greater is None else bool(greater)


def read_best(directory: str) -> Optional[dict]:
    """best.json of a checkpoints directory ({"step", "metric", "value", "greater_is_better"}), or None."""
    try:
        with open(os.path.join(directory, BEST_FILE)) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def _write_json_atomically(path: str, value: dict) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(value, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # readers see the old file or the new one, never half of one


class Checkpointer:
    """Saves every `save_steps` steps (and when forced), keeps the newest `max_to_keep` plus
    the best step when `best_metric` is set.

    Rotation and best.json happen when the previous write has committed (at the next save,
    wait() or close()): between two saves the directory may hold max_to_keep + 1 steps.
    """

    def __init__(self, directory: str, *, save_steps: int, max_to_keep: Optional[int],
                 async_save: bool = True, read_only: bool = False, best_metric: Optional[str] = None,
                 greater_is_better: bool = True):
        self.directory = os.path.abspath(directory)
        self.save_steps = save_steps
        self.max_to_keep = max_to_keep if max_to_keep and max_to_keep > 0 else None
        self.best_metric, self.greater_is_better = best_metric, greater_is_better
        self.read_only = read_only
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None,  # rotated here (_settle), so the best step can be kept out of it
            enable_async_checkpointing=async_save,
            create=not read_only,
            read_only=read_only,
            cleanup_tmp_directories=not read_only,
        )
        self._manager = ocp.CheckpointManager(epath.Path(self.directory), options=options)
        # a resumed run keeps ranking against its best so far (by the same metric only)
        best = read_best(self.directory) if best_metric else None
        self.best = best if best and best.get("metric") == best_metric and best["step"] in self.all_steps() else None
        self._candidate: Optional[dict] = None  # a new best whose write has not committed yet

    def latest_step(self) -> Optional[int]:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def should_save(self, step: int) -> bool:
        return step > 0 and step % self.save_steps == 0

    def save(self, step: int, state, *, data_state: Any = None, extra: Optional[dict] = None,
             rows: Any = None, metrics: Optional[dict] = None) -> None:
        """Starts an async write of `state` (a pytree of jax.Arrays) at `step`.

        data_state: the Grain iterator's get_state() after the step's batch (JSON-able);
        extra: a JSON dict; rows: a pytree of global-batch arrays (leading dim sharded over
        the data axes); metrics: the step's eval metrics ("eval/<name>"), when it was
        evaluated: they rank it for the best checkpoint.
        """
        ranked = self.best_metric is not None and metrics is not None
        if ranked and self.best_metric not in metrics:
            raise UsageError(f"trainer.metric_for_best_model={self.best_metric} is not an eval metric of this "
                             f"run (it logs {', '.join(sorted(metrics))})")
        self._settle()
        items = {STATE: ocp.args.StandardSave(state)}
        if data_state is not None:
            items[DATA] = grain.checkpoint.CheckpointSave(_IteratorSnapshot(data_state))
        if extra is not None:
            items[EXTRA] = ocp.args.JsonSave(extra)
        if rows is not None and jax.tree.leaves(rows):
            items[ROWS] = ocp.args.StandardSave(rows)
        self._manager.save(step, args=ocp.args.Composite(**items), force=True)
        if ranked and self._beats_best(float(metrics[self.best_metric])):
            self._candidate = {"step": step, "metric": self.best_metric, "value": float(metrics[self.best_metric]),
                               "greater_is_better": self.greater_is_better}

    def _beats_best(self, value: float) -> bool:
        """HF's rule: strictly better than the best so far (a NaN never is)."""
        if not math.isfinite(value):
            return False
        best = self.best
        return best is None or (value > best["value"] if self.greater_is_better else value < best["value"])

    def _settle(self) -> None:
        """After the in-flight write commits: record a new best, then rotate old steps."""
        if self.read_only:
            return
        self._manager.wait_until_finished()
        steps = sorted(self.all_steps())
        if self._candidate is not None and self._candidate["step"] in steps:
            if jax.process_index() == 0:
                _write_json_atomically(os.path.join(self.directory, BEST_FILE), self._candidate)
            self.best = self._candidate
        self._candidate = None
        if self.max_to_keep is None:
            return
        keep = set(steps[-self.max_to_keep:]) | ({self.best["step"]} if self.best else set())
        for old in steps:
            if old not in keep:
                self._manager.delete(old)

    def restore(self, abstract_state, *, step: Optional[int] = None, data: bool = True,
                extra: bool = False, rows_mesh=None) -> dict:
        """Restores onto the shardings of `abstract_state` (ShapeDtypeStructs with shardings).

        Returns {"step", "state", "data_state" (or None), "extra" (when asked), "rows" (when
        `rows_mesh` is given: the saved rows sharded over its data axes, or None)}.
        """
        step = self.latest_step() if step is None else step
        if step is None or step not in self.all_steps():
            have = ", ".join(map(str, self.all_steps())) or "none"
            where = f"at step {step} " if step is not None else ""
            raise CheckpointError(f"no committed checkpoint {where}in {self.directory} (steps: {have})")
        step_dir = os.path.join(self.directory, str(step))
        saved = set(os.listdir(step_dir)) if os.path.isdir(step_dir) else set()
        items = {STATE: ocp.args.StandardRestore(abstract_state)}
        if data and DATA in saved:
            items[DATA] = grain.checkpoint.CheckpointRestore(_IteratorSnapshot())
        if extra and EXTRA in saved:
            items[EXTRA] = ocp.args.JsonRestore()
        if rows_mesh is not None and ROWS in saved:
            items[ROWS] = ocp.args.StandardRestore(_rows_target(os.path.join(step_dir, ROWS), rows_mesh))
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        out = {"step": step, "state": restored[STATE],
               "data_state": restored[DATA].state if DATA in items else None}
        if extra:
            out["extra"] = restored[EXTRA] if EXTRA in items else None
        if rows_mesh is not None:
            out["rows"] = restored[ROWS] if ROWS in items else None
        return out

    def wait(self) -> None:
        """Blocks until in-flight writes are committed (then records the best step and rotates)."""
        self._manager.wait_until_finished()
        self._settle()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._settle()
        self._manager.close()


def _rows_target(item_dir: str, mesh):
    """Restore targets for a `rows` item: its stored shapes, rows over `mesh`'s data axes."""
    with ocp.PyTreeCheckpointer() as reader:
        stored = reader.metadata(item_dir).item_metadata.tree
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype,
                                                       sharding=parallel.batch_sharding(mesh, len(m.shape))), stored)


def check_resume(directory: str, resume_from: Optional[str], abstract_params) -> None:
    """Refuses, in one line naming both shapes, a run that would resume (from its own
    checkpoints `directory`, else `resume_from`) a checkpoint of another model. Nothing is
    loaded or written: an Orbax restore would fail half-way, with a traceback, after the set-up
    had already overwritten the run's config.yaml."""
    own = os.path.isdir(directory) and _latest(directory) is not None
    if not own and not resume_from:
        return
    source, step = (os.path.abspath(directory), None) if own else resolve(resume_from)
    step = _latest(source) if step is None else step
    if step is None:
        raise CheckpointError(f"resume_from={resume_from}: no committed checkpoint in {source}")
    if own:
        subject = f"output_dir {os.path.dirname(source)} holds a checkpoint of another model (step {step})"
        remedy = "; resume with the model its config.yaml names, or start this run in another output_dir"
    else:
        subject = f"resume_from={resume_from} is a checkpoint of another model (step {step})"
        remedy = "; resume with the model named by the config.yaml beside it"
    _check_shapes(os.path.join(source, str(step)), abstract_params, subject=subject, remedy=remedy, exact=True)


def _latest(directory: str) -> Optional[int]:
    reader = Checkpointer(directory, save_steps=1, max_to_keep=None, read_only=True)
    try:
        return reader.latest_step()
    finally:
        reader.close()


def resume(checkpointer: Checkpointer, resume_from: Optional[str], state, iterator, *,
           mesh=None) -> tuple[Any, dict]:
    """(state, carried) to start from: the run's own latest checkpoint, else `resume_from`,
    else (`state`, {}).

    The input iterator is moved to where the restored step left it, so the resumed run sees
    exactly the batches it would have seen. carried = {"extra": the step's JSON, "rows": its
    row arrays sharded over `mesh`} (each None when the step saved none).
    """
    if checkpointer.latest_step() is not None:
        directory, step = checkpointer.directory, None
    elif resume_from:
        directory, step = resolve(resume_from)
    else:
        return state, {}
    source = Checkpointer(directory, save_steps=checkpointer.save_steps, max_to_keep=None, read_only=True)
    try:
        restored = source.restore(abstract_of(state), step=step, extra=True, rows_mesh=mesh)
    finally:
        source.close()  # an unclosed manager's async machinery outlives its event loop
    if restored["data_state"] is not None:
        iterator.set_state(restored["data_state"])
    print(f"resumed from {directory} at step {restored['step']}", flush=True)
    return restored["state"], {"extra": restored["extra"], "rows": restored.get("rows")}


def _flat_shapes(tree) -> dict:
    """{('layers', 'q_proj', 'value'): shape} for arrays, ShapeDtypeStructs and Orbax metadata."""
    name = lambda k: str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))  # noqa: E731
    return {tuple(name(k) for k in path): tuple(getattr(leaf, "shape", ()))
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _check_shapes(step_dir: str, abstract_params, *, subject: Optional[str] = None,
                  remedy: str = " (check model=, or the run's config.yaml)", exact: bool = False) -> None:
    """Compares the stored parameters' shapes with the model's before any array is read: a
    restore that fails half-way leaves Orbax reads in flight that outlive their event loop.
    `subject` starts the mismatch line (default: the checkpoint does not match this model);
    `exact` also refuses stored parameters this model lacks (a resume restores the whole tree)."""
    subject = subject or f"checkpoint {step_dir} does not match this model"
    try:
        with ocp.PyTreeCheckpointer() as reader:
            stored = reader.metadata(os.path.join(step_dir, STATE)).item_metadata.tree.get("params")
    except Exception as error:  # noqa: BLE001 - any unreadable metadata is one line
        raise CheckpointError(f"checkpoint {step_dir} is unreadable (half-written or not an atlas_jax "
                              f"checkpoint): {str(error).splitlines()[0] if str(error) else type(error).__name__}"
                              ) from None
    if stored is None:
        raise CheckpointError(f"checkpoint {step_dir} holds no parameters")
    have, want = _flat_shapes(stored), _flat_shapes(abstract_params)
    for key, shape in want.items():
        name = "/".join(key[:-1] if key[-1] == "value" else key)
        if key not in have:
            raise CheckpointError(f"{subject}: it has no {name}{remedy}")
        if have[key] != shape:
            raise CheckpointError(f"{subject}: {name} is {have[key]} there, {shape} here{remedy}")
    extra = sorted(set(have) - set(want))
    if extra and exact:
        name = "/".join(extra[0][:-1] if extra[0][-1] == "value" else extra[0])
        raise CheckpointError(f"{subject}: it has {name}, this model has none{remedy}")


def best_step(directory: str) -> int:
    """The step best.json names; one line when the run recorded none."""
    best = read_best(directory)
    if best is None:
        raise CheckpointError(f"no best checkpoint recorded in {directory} (no {BEST_FILE}: the run had no "
                              f"trainer.metric_for_best_model)")
    return int(best["step"])


def restore_params(checkpoint_dir: str, step: Union[int, str, None], abstract_params) -> tuple[Any, int]:
    """Params only (no optimizer state is read), onto `abstract_params`' shardings.

    checkpoint_dir: a run's checkpoints directory (or one step's directory); step None =
    latest, "best" = the step best.json names. Returns (params, step). For evaluation and export.
    """
    directory, dir_step = resolve(checkpoint_dir)
    if not os.path.isdir(directory):
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    step = best_step(directory) if step == "best" else (int(step) if step is not None else None)
    ckpt = Checkpointer(directory, save_steps=1, max_to_keep=None, async_save=False, read_only=True)
    try:
        step = step if step is not None else dir_step
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"checkpoint directory {directory} holds no committed checkpoint")
        if step not in ckpt.all_steps():
            have = ", ".join(map(str, ckpt.all_steps())) or "none"
            raise CheckpointError(f"no committed checkpoint at step {step} in {directory} (steps: {have})")
        _check_shapes(os.path.join(directory, str(step)), abstract_params)
        target = {"params": abstract_params}
        restore_args = ocp.checkpoint_utils.construct_restore_args(target)
        args = ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True)
        try:
            restored = ckpt._manager.restore(step, args=ocp.args.Composite(**{STATE: args}))
        except (ValueError, KeyError) as error:
            raise CheckpointError(f"checkpoint {directory}/{step} does not match this model: "
                                  f"{str(error).splitlines()[0]}") from None
    finally:
        ckpt.close()  # closed before any error leaves: no async noise after the message
    return restored[STATE]["params"], step
