"""Orbax checkpoints: train state + RNG + Grain iterator state (+ optional extra items).

Layout: <directory>/<step>/{state, data, extra, ...}. Writes are asynchronous and atomic
(Orbax writes into a temporary directory and renames it on commit), so a write that was
interrupted part-way is never seen as a step. Restores go onto any mesh: the target's
shardings decide where each array lands, whatever mesh wrote it.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Optional

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

from atlas_jax.config import UsageError
from atlas_jax.train.state import abstract_of

log = logging.getLogger(__name__)

STATE, DATA, EXTRA = "state", "data", "extra"


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


class Checkpointer:
    """Saves every `save_steps` steps (and when forced), keeps the newest `max_to_keep`."""

    def __init__(self, directory: str, *, save_steps: int, max_to_keep: Optional[int],
                 async_save: bool = True, read_only: bool = False):
        self.directory = os.path.abspath(directory)
        self.save_steps = save_steps
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep if max_to_keep and max_to_keep > 0 else None,
            enable_async_checkpointing=async_save,
            create=not read_only,
            read_only=read_only,
            cleanup_tmp_directories=not read_only,
        )
        self._manager = ocp.CheckpointManager(epath.Path(self.directory), options=options)

    def latest_step(self) -> Optional[int]:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def should_save(self, step: int) -> bool:
        return step > 0 and step % self.save_steps == 0

    def save(self, step: int, state, *, data_state: Any = None, extra: Optional[dict] = None) -> None:
        """Starts an async write of `state` (a pytree of jax.Arrays) at `step`.

        data_state: the Grain iterator's get_state() after the step's batch (JSON-able);
        extra: a JSON dict.
        """
        items = {STATE: ocp.args.StandardSave(state)}
        if data_state is not None:
            items[DATA] = grain.checkpoint.CheckpointSave(_IteratorSnapshot(data_state))
        if extra is not None:
            items[EXTRA] = ocp.args.JsonSave(extra)
        self._manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(self, abstract_state, *, step: Optional[int] = None, data: bool = True,
                extra: bool = False) -> dict:
        """Restores onto the shardings of `abstract_state` (ShapeDtypeStructs with shardings).

        Returns {"step", "state", "data_state" (or None), "extra" (when asked)}.
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
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        out = {"step": step, "state": restored[STATE],
               "data_state": restored[DATA].state if DATA in items else None}
        if extra:
            out["extra"] = restored[EXTRA] if EXTRA in items else None
        return out

    def wait(self) -> None:
        """Blocks until in-flight writes are committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def resume(checkpointer: Checkpointer, resume_from: Optional[str], state, iterator):
    """The state to start from: the run's own latest checkpoint, else `resume_from`, else `state`.

    The input iterator is moved to where the restored step left it, so the resumed run sees
    exactly the batches it would have seen.
    """
    if checkpointer.latest_step() is not None:
        directory, step = checkpointer.directory, None
    elif resume_from:
        directory, step = resolve(resume_from)
    else:
        return state
    source = Checkpointer(directory, save_steps=checkpointer.save_steps, max_to_keep=None, read_only=True)
    try:
        restored = source.restore(abstract_of(state), step=step)
    finally:
        source.close()  # an unclosed manager's async machinery outlives its event loop
    if restored["data_state"] is not None:
        iterator.set_state(restored["data_state"])
    print(f"resumed from {directory} at step {restored['step']}", flush=True)
    return restored["state"]


def _flat_shapes(tree) -> dict:
    """{('layers', 'q_proj', 'value'): shape} for arrays, ShapeDtypeStructs and Orbax metadata."""
    name = lambda k: str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))  # noqa: E731
    return {tuple(name(k) for k in path): tuple(getattr(leaf, "shape", ()))
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _check_shapes(step_dir: str, abstract_params) -> None:
    """Compares the stored parameters' shapes with the model's before any array is read: a
    restore that fails half-way leaves Orbax reads in flight that outlive their event loop."""
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
        if key not in have:
            raise CheckpointError(f"checkpoint {step_dir} does not match this model: it has no "
                                  f"{'/'.join(key[:-1] if key[-1] == 'value' else key)}")
        if have[key] != shape:
            raise CheckpointError(f"checkpoint {step_dir} does not match this model: "
                                  f"{'/'.join(key[:-1] if key[-1] == 'value' else key)} is {have[key]} there, "
                                  f"{shape} here (check model=, or the run's config.yaml)")


def restore_params(checkpoint_dir: str, step: Optional[int], abstract_params) -> tuple[Any, int]:
    """Params only (no optimizer state is read), onto `abstract_params`' shardings.

    checkpoint_dir: a run's checkpoints directory (or one step's directory); step None =
    latest. Returns (params, step). For evaluation and export.
    """
    directory, dir_step = resolve(checkpoint_dir)
    if not os.path.isdir(directory):
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
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
