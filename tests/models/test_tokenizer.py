"""Tokenizer loading: built-in default, pad token never equal to EOS, chat rendering."""

import pytest

from atlas_jax.config import ModelConfig
from atlas_jax.models import load_tokenizer, render_chat
from atlas_jax.models.tokenizer import BUILTIN_TOKENIZER, ensure_pad_token


@pytest.mark.skipif(not __import__("os").path.isdir(BUILTIN_TOKENIZER), reason="built-in tokenizer asset missing")
def test_builtin_tokenizer_has_distinct_pad_and_renders_chat():
    tok = load_tokenizer(ModelConfig())
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    text = render_chat(tok, [{"role": "user", "content": "2+2?"}])
    assert "2+2?" in text


def test_pad_is_chosen_when_missing_or_equal_to_eos():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, "<|im_end|>": 1, "a": 2, "b": 3}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="a"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|im_end|>", pad_token="<|im_end|>")
    ensure_pad_token(tok)
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id != tok.eos_token_id
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|endoftext|>")
    ensure_pad_token(tok)
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
