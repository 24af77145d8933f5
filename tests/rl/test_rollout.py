"""The rollout's host-side assembly: left padding, training rows, correctness."""

from __future__ import annotations

import pathlib

import logging

import numpy as np
import pytest
from transformers import AutoTokenizer

from atlas_jax.models import init_model
from atlas_jax.rl.rollout import Completions, encode_left_padded, eos_ids, sample, training_batch
from tests.tiny import tiny_config

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


def test_sampling_stays_inside_the_model_window(tokenizer, caplog):
    """The recipe's 4096 + 4096 budgets on a model with a 160-token window: prompts keep their
    end, the budget shrinks to the room left, and a warning says so."""
    model = init_model(tiny_config(vocab_size=len(tokenizer), num_hidden_layers=1, max_position_embeddings=160),
                       seed=0)
    prompts = ["word " * 300, "What is 2 + 3?"]
    with caplog.at_level(logging.WARNING, logger="atlas_jax.rl.rollout"):
        out = sample(model, tokenizer, prompts, max_prompt_length=4096, max_new_tokens=4096, temperature=1.0)
    longest = int(out.prompt_mask.sum(1).max())
    assert longest == 80  # the window minus min(budget, window / 2)
    assert out.tokens.shape[1] == 160 - longest and out.lengths.max() <= 160 - longest
    assert "max_position_embeddings=160" in caplog.text


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
