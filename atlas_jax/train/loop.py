"""The training loop shared by SFT and RL: the recipe writes the `for`, `Loop` does the rest.

Per step the recipe gets its batch (it may depend on the current state, e.g. on-policy
rollouts), dispatches the update and calls `end_step`, which only then fetches the PREVIOUS
step's metrics, so the host never waits on the device between steps. It synchronises only
where it must: logging, eval, checkpoint and the last step.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import threading
import time
from typing import Any, Callable, Optional

import jax
import numpy as np

from atlas_jax.config import TrainerConfig, UsageError
from atlas_jax.train import metrics as metrics_lib
from atlas_jax.train.checkpoint import Checkpointer


class NonFiniteLossError(FloatingPointError, UsageError):
    """Training produced a NaN/inf loss or gradient; the message (one line, printed by
    main.py without a traceback) names the step and the last good checkpoint."""


@dataclasses.dataclass
class LoopResult:
    state: Any
    step: int  # updates applied
    stopped_by: str  # "max_steps" | "sigterm"
    last_metrics: dict


def total_steps(cfg: TrainerConfig, examples_per_epoch: Optional[int], global_batch_size: int) -> int:
    """trainer.max_steps when > 0, else ceil(num_train_epochs * examples / global batch)."""
    if cfg.max_steps > 0:
        return cfg.max_steps
    if not examples_per_epoch:
        raise ValueError("trainer.max_steps is not set and the number of examples per epoch is unknown")
    return max(1, math.ceil(cfg.num_train_epochs * examples_per_epoch / global_batch_size))


class _Sigterm:
    """Turns SIGTERM into a flag the loop checks once per step (main thread only)."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


class Loop:
    """The steps of one run, which the recipe drives (no callbacks):

        with Loop(state, total_steps=..., writers=..., checkpointer=...) as steps:
            for step in steps:                       # state.step + 1 .. total_steps
                state, metrics = update(state, batch)
                steps.end_step(state, metrics, data_state=batches.get_state())
        steps.result

    end_step logs, evaluates (eval_fn(state) -> scalars, logged as eval/<key> every
    eval_steps and at the end), saves (every checkpointer.save_steps, at the end, and on
    SIGTERM, after which iteration stops with stopped_by="sigterm") and raises
    NonFiniteLossError, without saving, on a NaN/inf loss. data_state: the input iterator's
    JSON-able state right after the step's batch was taken, so a resumed run sees exactly the
    next batch. pending: what the step leaves to do that a resume needs (RL: the rest of a
    rollout's updates), an object with checkpoint_items() -> (JSON or None, row arrays or None).
    """

    def __init__(self, state, *, total_steps: int, writers: metrics_lib.Writers, logging_steps: int = 1,
                 eval_fn: Optional[Callable[[Any], dict]] = None, eval_steps: int = 0,
                 checkpointer: Optional[Checkpointer] = None, flops_per_token: Optional[float] = None,
                 peak_flops: Optional[float] = None):
        self.state, self.total_steps, self.writers = state, total_steps, writers
        self.logging_steps, self.eval_fn, self.eval_steps = logging_steps, eval_fn, eval_steps
        self.checkpointer, self.flops_per_token, self.peak_flops = checkpointer, flops_per_token, peak_flops
        self.step = int(jax.device_get(state.step))
        self.stopped_by: Optional[str] = None
        self.last_metrics: dict = {}
        self._sigterm = _Sigterm()
        self._unfinished: Optional[tuple[int, dict]] = None  # the previous step's device metrics
        # A step's time is the host interval between two end_step calls. With dispatch-ahead the
        # host is held back by at most one step, so in steady state this equals the device step
        # time; for host-bound steps (RL rollouts) it is rollout + update. Eval and checkpoint
        # time are excluded by restarting the clock after them.
        self._last_end = time.perf_counter()
        self._durations: dict[int, float] = {}
        self._window = {"seconds": 0.0, "tokens": 0.0, "steps": 0}

    def __enter__(self) -> "Loop":
        self._sigterm.__enter__()
        self._last_end = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        try:
            if self.checkpointer is not None:
                self.checkpointer.wait()
        finally:
            self._sigterm.__exit__(*exc)

    def __iter__(self):
        for step in range(self.step + 1, self.total_steps + 1):
            if self.stopped_by is not None:
                return
            yield step
        if self.stopped_by is None:
            self.stopped_by = "max_steps"

    @property
    def result(self) -> LoopResult:
        return LoopResult(self.state, self.step, self.stopped_by or "max_steps", dict(self.last_metrics))

    def end_step(self, state, device_metrics: dict, *, data_state: Any = None, pending: Any = None) -> None:
        """Step state.step is applied: log it (one step late, so the device stays busy), and
        evaluate / save / stop where due."""
        self.state, step = state, self.step + 1
        self.step = step
        now = time.perf_counter()
        self._durations[step] = now - self._last_end
        self._last_end = now
        if self._unfinished is not None:
            self._finish(*self._unfinished)
        self._unfinished = (step, device_metrics)
        last = step == self.total_steps
        sigterm = self._sigterm.requested
        evaluate = self.eval_fn is not None and (last or (self.eval_steps and step % self.eval_steps == 0))
        save = self.checkpointer is not None and (last or sigterm or self.checkpointer.should_save(step))
        if not (evaluate or save or sigterm or last):
            return
        self._finish(*self._unfinished)
        self._unfinished = None
        eval_metrics = None
        if evaluate:
            eval_metrics = {f"eval/{k}": v for k, v in self.eval_fn(state).items()}
            self.writers.write(step, eval_metrics)
        if save:
            extra, rows = pending.checkpoint_items() if pending is not None else (None, None)
            self.checkpointer.save(step, state, data_state=data_state, extra=extra, rows=rows, metrics=eval_metrics)
        self._last_end = time.perf_counter()  # eval and save time are not step time
        if sigterm:
            left = len(pending) if pending is not None else 0
            self.writers.message(f"SIGTERM: saved step {step}" + (f" with the {left} updates left of its rollout"
                                                                   if left else "") + ", stopping")
            self.stopped_by = "sigterm"

    def _finish(self, step: int, device_metrics: dict) -> None:
        host = {k: float(np.asarray(v)) for k, v in jax.device_get(device_metrics).items()}
        bad = [k for k in ("loss", "grad_norm") if k in host and not math.isfinite(host[k])]
        if bad:
            saved = self.checkpointer.latest_step() if self.checkpointer else None
            raise NonFiniteLossError(
                f"non-finite {bad[0]}={host[bad[0]]} at step {step}: stopping; this state is not saved "
                f"(last checkpoint: {saved if saved is not None else 'none'})")
        self.writers.advance()
        window = self._window
        window["seconds"] += self._durations.pop(step)
        window["tokens"] += host.get("tokens", 0.0)
        window["steps"] += 1
        self.last_metrics = host
        if step % self.logging_steps == 0 or step == self.total_steps:
            seconds = window["seconds"]
            rates = metrics_lib.throughput(window["tokens"], seconds, self.flops_per_token, jax.device_count(),
                                           self.peak_flops)
            self.writers.write(step, {**host, **rates, "step_time_s": seconds / max(window["steps"], 1)})
            window.update(seconds=0.0, tokens=0.0, steps=0)
