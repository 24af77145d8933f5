"""The shipped tokenizer: size, special tokens, ChatML template, regenerable bit for bit."""

import filecmp

from atlas_jax.data import build_tokenizer
from atlas_jax.data.build_tokenizer import ASSET_DIR, VOCAB_SIZE


def test_vocab_and_special_tokens(tokenizer):
    assert len(tokenizer) == VOCAB_SIZE == 1024
    for token in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"):
        ids = tokenizer.convert_tokens_to_ids([token])
        assert len(tokenizer(token, add_special_tokens=False)["input_ids"]) == 1, token
        assert ids[0] < VOCAB_SIZE
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token == "<|pad|>" and tokenizer.pad_token_id == 0
    assert sum(p.stat().st_size for p in ASSET_DIR.iterdir()) < 1_000_000


def test_chat_template_and_round_trip(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 12 + 30?"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 12 + 30?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert tokenizer.decode(ids) == prompt
    # Byte-level: text never seen in training still round-trips.
    text = "Ünïcode ∑ 1,234.5 $ \\boxed{-7}"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text


def test_digits_are_single_tokens(tokenizer):
    pieces = tokenizer.convert_ids_to_tokens(tokenizer("9876", add_special_tokens=False)["input_ids"])
    assert pieces == ["9", "8", "7", "6"]


def test_build_is_deterministic_and_matches_asset(tmp_path):
    build_tokenizer.write(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert filecmp.cmp(tmp_path / name, ASSET_DIR / name, shallow=False), name
