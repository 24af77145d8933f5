"""The training loop shared by SFT and RL: a plain function, no hooks.

Per step: get the next batch (it may depend on the current state, e.g. on-policy
rollouts), dispatch the update, and only then fetch the PREVIOUS step's metrics, so the
host never waits on the device between steps. It synchronises only where it must: logging,
eval, checkpoint and the last step.
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


def train_loop(
    state,
    step_fn: Callable[[Any, Any], tuple[Any, dict]],
    next_batch: Callable[[Any], Any],
    *,
    total_steps: int,
    writers: metrics_lib.Writers,
    logging_steps: int = 1,
    eval_fn: Optional[Callable[[Any], dict]] = None,
    eval_steps: int = 0,
    checkpointer: Optional[Checkpointer] = None,
    data_state: Optional[Callable[[], Any]] = None,
    flops_per_token: Optional[float] = None,
    peak_flops: Optional[float] = None,
) -> LoopResult:
    """Runs `step_fn(state, next_batch(state))` from state.step up to `total_steps`.

    eval_fn(state) -> dict of scalars, logged as eval/<key> every eval_steps and at the end.
    data_state() -> the input iterator's JSON-able state right after the batch was taken;
    it is checkpointed with the step so a resumed run sees exactly the next batch.
    Checkpoints: every checkpointer.save_steps, at the end, and on SIGTERM (then returns
    stopped_by="sigterm"). Raises NonFiniteLossError, without saving, on a NaN/inf loss.
    """
    start = int(jax.device_get(state.step))
    num_devices = jax.device_count()
    # A step's time is the host interval between two step_fn returns. With dispatch-ahead the
    # host is held back by at most one step, so in steady state this equals the device step
    # time; for host-bound steps (RL rollouts) it is rollout + update. Eval and checkpoint
    # time are excluded by restarting the clock after them.
    clock = {"last_return": time.perf_counter()}
    durations: dict[int, float] = {}
    window = {"seconds": 0.0, "tokens": 0.0, "steps": 0}
    last: dict = {}

    def finish(step: int, device_metrics: dict) -> None:
        host = {k: float(np.asarray(v)) for k, v in jax.device_get(device_metrics).items()}
        bad = [k for k in ("loss", "grad_norm") if k in host and not math.isfinite(host[k])]
        if bad:
            saved = checkpointer.latest_step() if checkpointer else None
            raise NonFiniteLossError(
                f"non-finite {bad[0]}={host[bad[0]]} at step {step}: stopping; this state is not saved "
                f"(last checkpoint: {saved if saved is not None else 'none'})")
        writers.advance()
        window["seconds"] += durations.pop(step)
        window["tokens"] += host.get("tokens", 0.0)
        window["steps"] += 1
        last.clear()
        last.update(host)
        if step % logging_steps == 0 or step == total_steps:
            seconds = window["seconds"]
            rates = metrics_lib.throughput(window["tokens"], seconds, flops_per_token, num_devices, peak_flops)
            writers.write(step, {**host, **rates, "step_time_s": seconds / max(window["steps"], 1)})
            window.update(seconds=0.0, tokens=0.0, steps=0)

    pending = None
    step = start
    with _Sigterm() as sigterm:
        try:
            for step in range(start + 1, total_steps + 1):
                batch = next_batch(state)
                batch_state = data_state() if data_state is not None else None
                state, device_metrics = step_fn(state, batch)
                now = time.perf_counter()
                durations[step] = now - clock["last_return"]
                clock["last_return"] = now
                if pending is not None:
                    finish(*pending)
                pending = (step, device_metrics)
                evaluate = eval_fn is not None and (step == total_steps or (eval_steps and step % eval_steps == 0))
                save = checkpointer is not None and (
                    step == total_steps or sigterm.requested or checkpointer.should_save(step))
                if not (evaluate or save or sigterm.requested or step == total_steps):
                    continue
                finish(*pending)
                pending = None
                if evaluate:
                    writers.write(step, {f"eval/{k}": v for k, v in eval_fn(state).items()})
                if save:
                    checkpointer.save(step, state, data_state=batch_state)
                clock["last_return"] = time.perf_counter()  # eval and save time are not step time
                if sigterm.requested:
                    writers.message(f"SIGTERM: saved step {step}, stopping")
                    return LoopResult(state, step, "sigterm", dict(last))
            if pending is not None:
                finish(*pending)
        finally:
            if checkpointer is not None:
                checkpointer.wait()
    return LoopResult(state, step, "max_steps", dict(last))
