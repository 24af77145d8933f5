"""The rollout's host-side assembly: left padding, training rows, correctness."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
from transformers import AutoTokenizer

from atlas_jax.rl.rollout import Completions, encode_left_padded, eos_ids, training_batch

TOKENIZER_DIR = pathlib.Path(__file__).resolve().parents[2] / "atlas_jax" / "assets" / "tokenizer"


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


def test_left_padding_keeps_the_end_and_buckets(tokenizer):
    ids, mask = encode_left_padded(tokenizer, ["What is 2 + 3?", "Hi"], max_length=512)
    assert ids.shape[1] % 64 == 0 and ids.shape == mask.shape
    assert mask[:, -1].all() and not mask[1, 0]
    row = ids[1][mask[1].astype(bool)]
    assert tokenizer.decode(row) == "Hi"
    short, short_mask = encode_left_padded(tokenizer, ["a b c d e f g h"], max_length=3)
    assert short_mask.sum() == 3  # over-long prompts keep their last tokens
    assert tokenizer.decode(short[0][short_mask[0].astype(bool)]).endswith("h")


def test_eos_ids_include_the_chat_turn_end(tokenizer):
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in eos_ids(tokenizer)
    assert tokenizer.pad_token_id not in eos_ids(tokenizer)


def _completions(lengths, truncated):
    B, Tp, Tc = len(lengths), 4, 5
    prompt_ids = np.arange(B * Tp).reshape(B, Tp).astype(np.int32) + 10
    prompt_mask = np.ones((B, Tp), np.int32)
    prompt_mask[0, :2] = 0  # row 0 is left-padded by 2
    tokens = np.arange(B * Tc).reshape(B, Tc).astype(np.int32) + 100
    logprobs = -np.ones((B, Tc), np.float32)
    return Completions(prompt_ids, prompt_mask, tokens, logprobs, np.asarray(lengths, np.int32),
                       ["" for _ in lengths], np.asarray(truncated))


def test_training_batch_masks_exactly_the_sampled_tokens():
    batch, old = training_batch(_completions([3, 5], [False, True]), mask_truncated=False)
    assert batch.tokens.shape == (2, 9)
    np.testing.assert_array_equal(batch.loss_mask[0], [0, 0, 0, 0, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(batch.loss_mask[1], [0, 0, 0, 0, 1, 1, 1, 1, 1])
    np.testing.assert_array_equal(batch.positions[0, 2:7], [0, 1, 2, 3, 4])  # left pad shifts positions
    np.testing.assert_array_equal(batch.segment_ids[0], [0, 0, 1, 1, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(old, np.where(batch.loss_mask > 0, -1.0, 0.0))


def test_truncated_completions_can_be_masked_out():
    batch, _ = training_batch(_completions([3, 5], [False, True]), mask_truncated=True)
    assert batch.loss_mask[1].sum() == 0 and batch.loss_mask[0].sum() == 3
