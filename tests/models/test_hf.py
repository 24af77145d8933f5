"""Checkpoint import/export: logit parity with transformers, round trips, refusals."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from atlas_jax.config import MeshConfig
from atlas_jax.models import from_pretrained, save_pretrained
from atlas_jax.models.hf import ModelLoadError
from atlas_jax.parallel import make_mesh


def _torch_logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=torch.as_tensor(ids, dtype=torch.long),
                     attention_mask=torch.as_tensor(mask, dtype=torch.long)).logits.numpy()


def _max_diff_on_real_tokens(a, b, mask):
    return float(np.abs(a - b)[mask.astype(bool)].max())


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_logits_match_transformers_and_round_trip(family, hf_checkpoints, left_padded_batch, tmp_path):
    from transformers import AutoModelForCausalLM

    torch_model, path = hf_checkpoints[family]
    ids, mask = left_padded_batch
    model = from_pretrained(path)
    assert model.config.family == family and model.config.num_key_value_heads < model.config.num_attention_heads
    ours = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    assert ours.dtype == np.float32 and ours.shape == (3, 9, 128)
    assert _max_diff_on_real_tokens(ours, _torch_logits(torch_model, ids, mask), mask) <= 1e-4

    save_pretrained(model, str(tmp_path))
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    assert _max_diff_on_real_tokens(ours, _torch_logits(reloaded, ids, mask), mask) <= 1e-4


def test_llama3_rope_scaling_and_tying_are_read(hf_checkpoints):
    llama = from_pretrained(hf_checkpoints["llama"][1]).config
    assert llama.rope_scaling.rope_type == "llama3" and llama.rope_scaling.factor == 8.0
    assert not llama.tie_word_embeddings
    assert from_pretrained(hf_checkpoints["qwen2"][1]).config.tie_word_embeddings


def test_sharded_checkpoint_files_load(hf_checkpoints, left_padded_batch, tmp_path):
    ids, mask = left_padded_batch
    model = from_pretrained(hf_checkpoints["qwen3"][1])
    save_pretrained(model, str(tmp_path), max_shard_bytes=20_000)
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    again = from_pretrained(str(tmp_path))
    np.testing.assert_array_equal(np.asarray(again(ids, mask)), np.asarray(model(ids, mask)))


def test_sharded_equals_unsharded(hf_checkpoints, left_padded_batch):
    ids, mask = left_padded_batch
    path = hf_checkpoints["qwen3"][1]
    single = from_pretrained(path)
    mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
    sharded = from_pretrained(path, mesh=mesh)
    q = sharded.layers.q_proj[...]  # [L, D=32, N=4, H=8] over embed=fsdp, heads=tensor
    assert q.addressable_shards[0].data.shape == (2, 8, 2, 8)
    assert sharded.embed[...].addressable_shards[0].data.shape == (64, 8)
    out = jax.jit(lambda m, i, a: m(i, a))(sharded, jnp.asarray(ids), jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(out), np.asarray(single(ids, mask)), atol=1e-5)


def test_bf16_on_disk_loads_and_bf16_compute_is_close(hf_checkpoints, left_padded_batch, tmp_path):
    ids, mask = left_padded_batch
    f32 = from_pretrained(hf_checkpoints["llama"][1])
    torch_model = hf_checkpoints["llama"][0]
    torch_model.to(torch.bfloat16).save_pretrained(tmp_path, safe_serialization=True)
    torch_model.to(torch.float32)
    bf16 = from_pretrained(str(tmp_path), dtype="bfloat16")
    assert bf16.embed[...].dtype == jnp.bfloat16
    ref = np.asarray(f32(ids, mask))
    out = np.asarray(bf16(ids, mask))
    assert out.dtype == np.float32 and np.isfinite(out).all()
    rel = np.abs(out - ref)[mask.astype(bool)].max() / np.abs(ref).max()
    assert rel <= 2e-2


def test_refuses_pickle_and_unknown_architectures(tmp_path, hf_checkpoints):
    (tmp_path / "config.json").write_text(open(os.path.join(hf_checkpoints["llama"][1], "config.json")).read())
    (tmp_path / "pytorch_model.bin").write_bytes(b"not really")
    with pytest.raises(ValueError, match="pickle"):
        from_pretrained(str(tmp_path))
    hf = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**hf, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="model_type='gpt2'"):
        from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({**hf, "auto_map": {"AutoModel": "x.Y"}}))
    with pytest.raises(ValueError, match="remote code"):
        from_pretrained(str(tmp_path))


def test_hub_id_offline_fails_with_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="pass a local directory"):
        from_pretrained("some-org/not-a-local-dir")
