"""Shared fixtures for the data tests: the built-in tokenizer and small configs."""

import json

import pytest
from transformers import AutoTokenizer

from atlas_jax.config import DataConfig
from atlas_jax.data.build_tokenizer import ASSET_DIR


@pytest.fixture(scope="session")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(ASSET_DIR))


@pytest.fixture
def sft_cfg():
    return DataConfig(num_synthetic_examples=64, max_length=256, eval_split_ratio=0.125)


@pytest.fixture
def rl_cfg():
    return DataConfig(name="synthetic_math_rl", kind="rl", num_synthetic_examples=50, eval_split_ratio=0.2)


def _write_jsonl(path, rows):
    with open(path, "wb") as f:
        for row in rows:
            if isinstance(row, bytes):
                f.write(row + b"\n")
            elif isinstance(row, str):
                f.write(row.encode() + b"\n")
            else:
                f.write(json.dumps(row).encode() + b"\n")
    return path


@pytest.fixture
def write_jsonl():
    """write_jsonl(path, rows): dict rows as JSON, str/bytes rows written as they are."""
    return _write_jsonl
