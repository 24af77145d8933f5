"""Hugging Face checkpoints in and out: config.json <-> ModelConfig, safetensors <-> params.

Llama, Qwen2 and Qwen3 share tensor names; they differ only in which optional tensors
exist (q/k/v biases, q/k norms, lm_head), so one key table, filtered by config flags,
serves all three. Loading places each tensor straight onto its target sharding, one
layer at a time, so host memory stays near one copy of the model.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import json
import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P, SingleDeviceSharding

from atlas_jax import parallel
from atlas_jax.config import ModelConfig, RopeScalingConfig, UsageError
from atlas_jax.models import lora, quant, safetensors_io
from atlas_jax.models.build import init_variables
from atlas_jax.models.decoder import Decoder
from atlas_jax.models.projections import INPUT_AXES


class ModelLoadError(UsageError):
    """A model directory or hub id that cannot be loaded; one line naming the path."""

FAMILIES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
# what the HF class assumes when config.json leaves the key out
_TIE_DEFAULT = {"llama": False, "qwen2": False, "qwen3": False}
_OVERRIDABLE = ("name", "model_name_or_path", "tokenizer", "dtype", "param_dtype", "remat",
                "scan_layers", "lora", "load_in_4bit")


def _rope_from_hf(hf: dict, where: str) -> tuple[float, RopeScalingConfig]:
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return theta, RopeScalingConfig(rope_type="none")
    if kind != "llama3":
        raise ModelLoadError(f"{where}: rope_type={kind!r} is not supported (default or llama3)")
    return theta, RopeScalingConfig(
        rope_type="llama3", factor=float(rope["factor"]), low_freq_factor=float(rope["low_freq_factor"]),
        high_freq_factor=float(rope["high_freq_factor"]),
        original_max_position_embeddings=int(rope["original_max_position_embeddings"]))


def config_from_hf(hf: dict, *, where: str = "config.json", base: Optional[ModelConfig] = None) -> ModelConfig:
    """HF config dict -> ModelConfig; numerics/training fields come from `base` when given."""
    family = hf.get("model_type")
    if family not in FAMILIES:
        raise ModelLoadError(f"{where}: model_type={family!r} is not supported (one of {', '.join(FAMILIES)})")
    if hf.get("auto_map"):
        raise ModelLoadError(f"{where}: declares remote code (auto_map); atlas_jax never runs checkpoint code")
    for key, ok in (("hidden_act", "silu"), ("mlp_bias", False), ("use_sliding_window", False)):
        if hf.get(key, ok) != ok:
            raise ModelLoadError(f"{where}: {key}={hf[key]!r} is not supported (expected {ok!r})")
    if family != "qwen2" and hf.get("attention_bias", False):
        raise ModelLoadError(f"{where}: attention_bias=true is not supported for {family} (it adds an o_proj bias)")
    theta, scaling = _rope_from_hf(hf, where)
    heads = int(hf["num_attention_heads"])
    arch = dict(
        family=family, vocab_size=int(hf["vocab_size"]), hidden_size=int(hf["hidden_size"]),
        intermediate_size=int(hf["intermediate_size"]), num_hidden_layers=int(hf["num_hidden_layers"]),
        num_attention_heads=heads, num_key_value_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=hf.get("head_dim"), rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=theta, rope_scaling=scaling,
        max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", _TIE_DEFAULT[family])),
        attention_bias=family == "qwen2", qk_norm=family == "qwen3")
    if base is None:
        return ModelConfig(name=hf.get("_name_or_path") or family, **arch)
    return dataclasses.replace(base, **arch)


def config_to_hf(cfg: ModelConfig) -> dict:
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None and cfg.rope_scaling.rope_type not in ("none", "default"):
        rope.update(dataclasses.asdict(cfg.rope_scaling))
    hf = {
        "architectures": [FAMILIES[cfg.family]], "model_type": cfg.family,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.resolved_head_dim, "hidden_act": "silu", "rms_norm_eps": cfg.rms_norm_eps,
        "max_position_embeddings": cfg.max_position_embeddings, "rope_parameters": rope,
        "tie_word_embeddings": cfg.tie_word_embeddings, "use_cache": True, "dtype": cfg.param_dtype,
    }
    if cfg.family != "qwen2":
        hf["attention_bias"] = False
    if cfg.family != "llama":
        hf["use_sliding_window"] = False
    return hf


def key_table(cfg: ModelConfig) -> list[tuple[str, str, Optional[int]]]:
    """(our attribute path, HF name with {i} for the layer, n_in) for every tensor.

    n_in is how many leading dims of our kernel are inputs: HF stores Linear weights as
    [out, in], so ours = hf.T.reshape(our shape) and hf = ours.reshape(in, out).T.
    0 marks biases (HF flattens the heads); None tensors are copied as they are.
    """
    a = "model.layers.{i}.self_attn."
    table = [("embed", "model.embed_tokens.weight", None), ("final_norm", "model.norm.weight", None),
             ("layers.input_norm", "model.layers.{i}.input_layernorm.weight", None),
             ("layers.post_attention_norm", "model.layers.{i}.post_attention_layernorm.weight", None)]
    for name, n_in in INPUT_AXES.items():
        module = "mlp" if name in ("gate_proj", "up_proj", "down_proj") else "self_attn"
        table.append((f"layers.{name}", f"model.layers.{{i}}.{module}.{name}.weight", n_in))
    if cfg.attention_bias:
        table += [(f"layers.{x}_bias", a + f"{x}_proj.bias", 0) for x in "qkv"]
    if cfg.qk_norm:
        table += [(f"layers.{x}_norm", a + f"{x}_norm.weight", None) for x in "qk"]
    if not cfg.tie_word_embeddings:
        table.append(("lm_head", "lm_head.weight", 1))
    return table


def _to_ours(hf_array: np.ndarray, shape: tuple[int, ...], n_in: Optional[int]) -> np.ndarray:
    return hf_array.reshape(shape) if not n_in else hf_array.T.reshape(shape)


def _to_hf(ours: np.ndarray, n_in: Optional[int]) -> np.ndarray:
    if n_in is None:
        return ours
    if n_in == 0:
        return ours.reshape(-1)
    return ours.reshape(int(np.prod(ours.shape[:n_in])), -1).T


def _resolve(path: str) -> str:
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise ModelLoadError(f"{path}: expected a model directory (config.json + *.safetensors), got a file")
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"])
    except Exception as e:  # offline, unknown id, auth: all end the same way for the user
        raise ModelLoadError(f"cannot fetch {path!r} from the Hugging Face hub ({type(e).__name__}); "
                      "offline, pass a local directory holding config.json and *.safetensors") from e


def _weight_files(path: str) -> dict[str, str]:
    """Tensor name -> safetensors file; pickle checkpoints are refused, never unpickled."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            return {k: os.path.join(path, v) for k, v in json.load(f)["weight_map"].items()}
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        pickles = [p for ext in ("bin", "pt", "pth", "ckpt") for p in glob.glob(os.path.join(path, f"*.{ext}"))]
        if pickles:
            raise ModelLoadError(f"{pickles[0]}: pickle checkpoints are refused (they can run code); "
                             "convert to safetensors first")
        raise ModelLoadError(f"{path}: no *.safetensors weights found")
    return {name: f for f in files for name in safetensors_io.SafetensorsFile(f).keys()}


def _get(obj, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _target(mesh: Optional[Mesh], var: nnx.Variable, drop_leading: bool = False):
    if mesh is None:
        return SingleDeviceSharding(jax.devices()[0])
    spec = parallel.spec_for(mesh, var.get_metadata("out_sharding"), var.shape)
    return NamedSharding(mesh, P(*spec[1:]) if drop_leading else spec)


@functools.lru_cache(maxsize=None)
def _layer_writer(sharding):
    # donating the stacked buffer makes each layer's write in place: no second copy
    return jax.jit(lambda stacked, layer, i: jax.lax.dynamic_update_index_in_dim(stacked, layer, i, 0),
                   donate_argnums=0, out_shardings=sharding)


def from_pretrained(path: str, *, dtype: str = "float32", mesh: Optional[Mesh] = None,
                    config: Optional[ModelConfig] = None, seed: int = 0) -> Decoder:
    """Loads a Llama 3 / Qwen2 / Qwen2.5 / Qwen3 HF directory (or hub id, when online).

    With config.lora.rank > 0 the adapters start fresh from `seed` (B = 0: the model's output
    is the checkpoint's until they train).
    """
    path = _resolve(path)
    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):
        raise ModelLoadError(f"{config_path} not found: expected a Hugging Face model directory")
    with open(config_path) as f:
        hf = json.load(f)
    base = config or ModelConfig(param_dtype=dtype)
    cfg = dataclasses.replace(config_from_hf(hf, where=config_path, base=base), dtype=dtype,
                              model_name_or_path=base.model_name_or_path or path)
    files = _weight_files(path)
    readers: dict[str, safetensors_io.SafetensorsFile] = {}

    def read(name: str) -> np.ndarray:
        if name not in files:
            raise ModelLoadError(f"{path}: tensor {name!r} missing from the checkpoint")
        reader = readers.setdefault(files[name], safetensors_io.SafetensorsFile(files[name]))
        return reader.read(name)

    model = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
    pdtype = jnp.dtype(cfg.param_dtype)
    for ours, hf_name, n_in in key_table(cfg):
        var = _get(model, ours)
        if ours.startswith("layers."):
            sharding = _target(mesh, var)
            stacked = jax.jit(lambda: jnp.zeros(var.shape, pdtype), out_shardings=sharding)()
            layer_sharding = _target(mesh, var, drop_leading=True)
            for i in range(cfg.num_hidden_layers):
                host = _to_ours(read(hf_name.format(i=i)), var.shape[1:], n_in).astype(pdtype)
                stacked = _layer_writer(sharding)(stacked, jax.device_put(host, layer_sharding), i)
            var.set_value(stacked)
        else:
            host = _to_ours(read(hf_name), var.shape, n_in).astype(pdtype)
            var.set_value(jax.device_put(host, _target(mesh, var)))
    if cfg.lora.rank > 0:  # no HF checkpoint holds our adapters: fresh ones (B = 0) change nothing
        nnx.update(model, init_variables(cfg, lora.LoraParam, mesh=mesh, seed=seed))
    return model


def save_pretrained(model: Decoder, path: str, *, tokenizer=None, max_shard_bytes: int = 5 * 2**30) -> None:
    """Writes config.json + safetensors (sharded above max_shard_bytes) that transformers loads:
    the weights the model computes with, so LoRA adapters are merged into their projections
    and 4-bit ones dequantised (lora.merge_adapters) rather than dropped or written packed."""
    if lora.has_adapters(model) or quant.is_quantized(model):
        model = lora.merge_adapters(model)
    cfg = model.config
    tensors: dict[str, tuple] = {}  # hf name -> (variable, layer or None, n_in)
    for ours, hf_name, n_in in key_table(cfg):
        var = _get(model, ours)
        layers = range(cfg.num_hidden_layers) if ours.startswith("layers.") else [None]
        for i in layers:
            tensors[hf_name.format(i=i)] = (var, i, n_in)

    def hf_shape(var, i, n_in):
        shape = var.shape[1:] if i is not None else var.shape
        return _to_hf(np.empty(shape, np.int8), n_in).shape

    def fetch(name):
        var, i, n_in = tensors[name]
        value = var[...] if i is None else var[...][i]
        return _to_hf(parallel.to_host(value), n_in)

    if jax.process_index() != 0:
        for name in tensors:  # every process takes part in the gathers
            fetch(name)
        return
    os.makedirs(path, exist_ok=True)
    dtype = np.dtype(model.param_dtype)
    shards, size = [[]], 0
    for name, (var, i, n_in) in tensors.items():
        nbytes = int(np.prod(hf_shape(var, i, n_in))) * dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))])
    for file_name, members in zip(names, shards):
        specs = {n: (hf_shape(*tensors[n]), dtype) for n in members}
        safetensors_io.write(os.path.join(path, file_name), specs, fetch)
    if len(shards) > 1:
        total = sum(int(np.prod(hf_shape(*t))) * dtype.itemsize for t in tensors.values())
        index = {"metadata": {"total_size": total},
                 "weight_map": {n: f for f, members in zip(names, shards) for n in members}}
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)
    hf = config_to_hf(cfg)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
        hf.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
