"""Metric writers (console bar, metrics.jsonl, TensorBoard, W&B) and throughput / MFU."""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Optional, Sequence

import jax

from atlas_jax.config import ModelConfig

log = logging.getLogger(__name__)

# Dense bf16 peak FLOP/s per device, from vendor spec sheets (no sparsity).
PEAK_FLOPS = (
    ("h200", 989e12),
    ("h100", 989e12),
    ("a100", 312e12),
    ("tpu v5 lite", 197e12),  # v5e reports itself as "TPU v5 lite"
    ("tpu v5e", 197e12),
    ("tpu v5p", 459e12),
    ("tpu v5", 459e12),
    ("tpu v4", 275e12),
)


def peak_flops_per_device(device: Optional[jax.Device] = None, override: Optional[float] = None) -> Optional[float]:
    """`override` (trainer.peak_flops_per_device) wins; else the table by device kind; else None."""
    if override:
        return float(override)
    kind = (device or jax.devices()[0]).device_kind.lower()
    return next((peak for name, peak in PEAK_FLOPS if name in kind), None)


def flops_per_token(cfg: ModelConfig, seq_len: int, num_params: int) -> float:
    """Training FLOPs per token: 6N for the matmuls with weights, plus attention scores and
    values (12 * L * heads * head_dim * T, as in the PaLM paper's MFU accounting)."""
    attention = 12 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.resolved_head_dim * seq_len
    return 6.0 * num_params + attention


def throughput(tokens: float, seconds: float, flops_per_token_: Optional[float], num_devices: int,
               peak: Optional[float]) -> dict:
    """tokens/s, per-device tokens/s and MFU (None when the peak is unknown)."""
    tps = tokens / max(seconds, 1e-9)
    mfu = None
    if peak and flops_per_token_:
        mfu = tps * flops_per_token_ / (num_devices * peak)
    return {"tokens_per_s": tps, "tokens_per_s_per_device": tps / num_devices, "mfu": mfu}


class Writers:
    """Fans one metrics dict per step out to every sink; only process 0 writes."""

    def __init__(self, output_dir: str, report_to: Sequence[str], *, total_steps: int, initial_step: int = 0,
                 run_name: Optional[str] = None, config: Optional[dict] = None, console: bool = True):
        self.enabled = jax.process_index() == 0
        self._bar = self._jsonl = self._tb = self._wandb = None
        if not self.enabled:
            return
        os.makedirs(output_dir, exist_ok=True)
        self._jsonl = open(os.path.join(output_dir, "metrics.jsonl"), "a")
        if console:
            from tqdm.auto import tqdm
            self._bar = tqdm(total=total_steps, initial=initial_step, desc="train", dynamic_ncols=True)
        if "tensorboard" in report_to:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(logdir=output_dir)
        if "wandb" in report_to:
            self._wandb = _start_wandb(output_dir, run_name, config)

    def advance(self, steps: int = 1) -> None:
        """Moves the progress bar (its rate gives the ETA)."""
        if self._bar is not None:
            self._bar.update(steps)

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        clean = {k: _scalar(v) for k, v in metrics.items()}
        self._jsonl.write(json.dumps({"step": step, **clean}) + "\n")
        self._jsonl.flush()
        numeric = {k: v for k, v in clean.items() if isinstance(v, (int, float)) and v is not None}
        if self._tb is not None:
            for key, value in numeric.items():
                self._tb.add_scalar(key, value, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(numeric, step=step)
        if self._bar is not None and "loss" in clean:
            self._bar.set_postfix({k: f"{clean[k]:.4g}" for k in ("loss", "grad_norm", "learning_rate")
                                   if isinstance(clean.get(k), float)}, refresh=False)

    def message(self, text: str) -> None:
        """A line on the console that does not break the progress bar."""
        if self._bar is not None:
            self._bar.write(text)
        elif self.enabled:
            print(text, flush=True)

    def close(self) -> None:
        for sink in (self._bar, self._jsonl, self._tb):
            if sink is not None:
                sink.close()
        if self._wandb is not None:
            self._wandb.finish()
        self._bar = self._jsonl = self._tb = self._wandb = None


def _scalar(value):
    try:
        value = float(value)
    except (TypeError, ValueError):
        return value
    return value if math.isfinite(value) else str(value)


def _start_wandb(output_dir: str, run_name: Optional[str], config: Optional[dict]):
    """W&B when installed and reachable; otherwise one warning and the run goes on without it."""
    try:
        import wandb
        return wandb.init(dir=output_dir, name=run_name, config=config or {},
                          mode=os.environ.get("WANDB_MODE", "online"))
    except Exception as error:  # noqa: BLE001 - a logging sink must never stop training
        log.warning("report_to has wandb but W&B is unavailable (%s); continuing without it",
                    str(error).splitlines()[0] if str(error) else type(error).__name__)
        return None
