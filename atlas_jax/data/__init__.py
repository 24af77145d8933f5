"""Grain input pipelines: SFT token batches and RL prompt batches from the built-in
synthetic set, a local jsonl/json/parquet file, or a Hugging Face hub dataset."""

from atlas_jax.data.batch import Batch, to_global
from atlas_jax.data.formatting import ADAPTIVE_TEACHING_SYSTEM_PROMPT
from atlas_jax.data.rl import rl_batches, rl_num_examples
from atlas_jax.data.sft import row_length, sft_batches, sft_num_examples
from atlas_jax.data.sources import DataError

__all__ = [
    "ADAPTIVE_TEACHING_SYSTEM_PROMPT",
    "Batch",
    "DataError",
    "rl_batches",
    "rl_num_examples",
    "row_length",
    "sft_batches",
    "sft_num_examples",
    "to_global",
]
