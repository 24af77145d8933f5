"""Metric writers and throughput accounting."""

import json
import os
import sys
import types

import pytest

from atlas_jax.config import ModelConfig
from atlas_jax.train import metrics


def test_writers_fan_out_to_jsonl_and_tensorboard_and_survive_missing_wandb(tmp_path, monkeypatch, caplog):
    broken = types.ModuleType("wandb")
    broken.init = lambda **_: (_ for _ in ()).throw(RuntimeError("network unreachable"))
    monkeypatch.setitem(sys.modules, "wandb", broken)
    w = metrics.Writers(str(tmp_path), ("tensorboard", "wandb"), total_steps=4, console=False)
    assert "continuing without it" in caplog.text
    w.write(1, {"loss": 2.5, "mfu": None, "grad_norm": float("nan")})
    w.write(2, {"eval/loss": 1.0})
    w.close()
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert rows == [{"step": 1, "loss": 2.5, "mfu": None, "grad_norm": "nan"}, {"step": 2, "eval/loss": 1.0}]
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path))


def test_flops_peak_table_and_mfu():
    cfg = ModelConfig(num_hidden_layers=2, num_attention_heads=4, head_dim=8)
    assert metrics.flops_per_token(cfg, 16, 1000) == 6 * 1000 + 12 * 2 * 4 * 8 * 16
    h100 = types.SimpleNamespace(device_kind="NVIDIA H100 80GB HBM3")
    v5e = types.SimpleNamespace(device_kind="TPU v5 lite")
    cpu = types.SimpleNamespace(device_kind="cpu")
    assert metrics.peak_flops_per_device(h100) == 989e12
    assert metrics.peak_flops_per_device(v5e) == 197e12
    assert metrics.peak_flops_per_device(cpu) is None
    assert metrics.peak_flops_per_device(cpu, override=1e11) == 1e11
    rates = metrics.throughput(tokens=1000, seconds=2.0, flops_per_token_=1e9, num_devices=2, peak=1e12)
    assert rates == pytest.approx({"tokens_per_s": 500, "tokens_per_s_per_device": 250, "mfu": 0.25})
    assert metrics.throughput(1000, 2.0, 1e9, 2, None)["mfu"] is None
